"""What an export accumulates, and the manifest and JSON summary made from it.

Kept apart from the conversion loop so that the published record - every
number rounded the same way, tool versions, the seam contract of each format
- is assembled in one place from one ``ExportRecord``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.manifest import (SINGLE_STAGE_SCHEMA_VERSION, STAGED_SCHEMA_VERSION, Fragment, Manifest,
                                   Preprocessing)

from .agreement import VariantAgreement
from .backends import get_backend, list_formats
from .latency import LATENCY_CONDITIONS
from .onnx_export import OPSET

if TYPE_CHECKING:
    from pool_builder.pool.format import PoolMetadata

TOOLS = ("torch", "onnx", "onnxruntime", "onnx2tf", "tensorflow", "ai-edge-litert")
SEAM = {"tensor": "features = library output = every expert's input",
        **{fmt: get_backend(fmt).seam for fmt in sorted(list_formats())}}


@dataclass
class ExportRecord:
    """Everything one export has produced so far; variants (``format.precision``) are added as they pass."""

    fragments: list[Fragment] = field(default_factory=list)
    agreements: dict[str, VariantAgreement] = field(default_factory=dict)
    chosen_schemes: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    latencies: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportResult:
    """The published manifest (None when a gate failed) and the JSON summary, written pass or fail."""

    manifest: Manifest | None
    summary: dict[str, Any]


def build_manifest(meta: PoolMetadata, tasks: dict[str, tuple[int, ...]], record: ExportRecord,
                   staged: bool) -> Manifest:
    """The manifest of a passed export: fragments with their agreement and latency, composites, tools."""
    fragments = []
    for frag in record.fragments:
        variant = record.agreements[f"{frag.format}.{frag.precision}"]
        agreement = dict(variant.fragments[frag.id])
        agreement.update(frag.agreement)
        if frag.role == "expert":
            agreement["input_matches_library_output"] = variant.seam_passthrough[frag.task]
        fragments.append(Fragment(**{**asdict(frag), "inputs": frag.inputs, "outputs": frag.outputs,
                                     "agreement": rounded(agreement),
                                     "latency": rounded(record.latencies.get(frag.id))}))
    dataset = meta.dataset
    c, h, w = dataset.input_shape
    return Manifest(
        pool_id=meta.pool_id,
        preprocessing=Preprocessing(input_shape=(h, w, c), mean=tuple(dataset.mean), std=tuple(dataset.std)),
        class_names=tuple(dataset.class_names), tasks=tasks, fragments=tuple(fragments),
        seam=SEAM, composites={k: {"scheme": record.chosen_schemes[k]["scheme"],
                                   "attempts": record.chosen_schemes[k]["attempts"],
                                   "queries": rounded(v.queries),
                                   "int8_passthrough": all(v.seam_passthrough.values())}
                               for k, v in sorted(record.agreements.items())},
        tools={**{name: _version(name) for name in TOOLS}, "opset": str(OPSET),
               **({"latency": LATENCY_CONDITIONS} if record.latencies else {})},
        schema_version=STAGED_SCHEMA_VERSION if staged or record.latencies else SINGLE_STAGE_SCHEMA_VERSION)


def build_summary(pool_id: str, out: Path, record: ExportRecord, failures: list[str]) -> dict[str, Any]:
    """The JSON summary: pass/fail, failures, bytes and size ratios per variant, schemes, timings, fragments."""
    by_variant: dict[str, int] = {}
    for frag in record.fragments:
        key = f"{frag.format}.{frag.precision}"
        by_variant[key] = by_variant.get(key, 0) + frag.bytes
    ratios = {f"{fmt}.{p}/{fmt}.fp32": round(by_variant[f"{fmt}.{p}"] / by_variant[f"{fmt}.fp32"], 4)
              for fmt in list_formats() for p in ("fp16", "int8")
              if f"{fmt}.{p}" in by_variant and f"{fmt}.fp32" in by_variant}
    return {"ok": not failures, "pool_id": pool_id, "out": str(out),
            "failures": failures, "variant_bytes": by_variant, "size_ratios": ratios,
            "schemes": record.chosen_schemes, "stage_seconds": record.timings,
            "fragments": [{"id": f.id, "file": f.file, "bytes": f.bytes, "sha256": f.sha256,
                           "agreement": rounded({**record.agreements[f"{f.format}.{f.precision}"].fragments[f.id],
                                                 **f.agreement})}
                          for f in record.fragments],
            "composites": {k: rounded(v.queries) for k, v in sorted(record.agreements.items())},
            **({"latency_ms": rounded(record.latencies)} if record.latencies else {})}


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to 6 places and non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, float):
        return round(value, 6) if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value
