"""Pool -> fragment directory: every fragment converted, checked, measured, gated, then published at once.

All files are written into a hidden staging directory beside ``--out``; only
when every gate has passed is the manifest written and the directory renamed
into place, so a failed or killed export never leaves half a fragment set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_runtime.atomic_io import LockBusyError, atomic_write_json, exclusive_lock, sha256_bytes
from edge_runtime.manifest import (FORMATS, MANIFEST_NAME, PRECISIONS, SINGLE_STAGE_SCHEMA_VERSION,
                                   STAGED_SCHEMA_VERSION, Fragment, Manifest, ManifestError, Preprocessing, TensorSpec,
                                   check_choice, fragment_id, write_manifest)
from edge_runtime.runners import dequantize, open_runner, quantize, to_layout
from pool_builder.models import ProgressiveExpert
from pool_builder.pool import Pool

from .agreement import TOLERANCES, Reference, VariantAgreement, gate_failures, measure_variant, query_names
from .calibration import calibration_images, evaluation_images, torch_outputs
from .checks import check_onnx, check_tflite_ops, run_in_tflite_runtime
from .errors import ConvertError, GateError
from .latency import LATENCY_CONDITIONS, fragment_latencies
from .stages import ExpertUnit, expert_units
from .onnx_export import OPSET, OnnxSource, export_expert, export_library
from .onnx_quantize import quantize_onnx
from .schemes import DEFAULT_SCHEME_ORDER, QuantScheme, parse_schemes
from .tflite_convert import TFLiteModels, convert_with_onnx2tf, tflite_io_specs

Log = Callable[[str], None]
LATENCY_CHOICES = ("auto", "always", "never")
PRECISIONS_BY_FORMAT = {"onnx": ("fp32", "int8"), "tflite": ("fp32", "fp16", "int8")}
EXTENSION = {"onnx": "onnx", "tflite": "tflite"}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_list(kind: str, value: str | Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    if not items or not all(items):
        raise ConvertError(f"no {kind} given; valid: {', '.join(valid)}")
    try:
        return tuple(dict.fromkeys(check_choice(kind, v, tuple(valid)) for v in items))
    except ManifestError as exc:
        raise ConvertError(str(exc)) from None


@dataclass(frozen=True)
class ExportConfig:
    """What to convert and how strictly to judge it."""

    pool: str
    out: str
    formats: tuple[str, ...] = FORMATS
    precisions: tuple[str, ...] = PRECISIONS
    calibration_images: int = 200
    calibration_file: str | None = None
    eval_images: int | None = None  # None: every held-out image the pool was evaluated on
    data_dir: str | None = None
    max_accuracy_drop: float = TOLERANCES["int8"]["max_accuracy_drop_points"]
    schemes: tuple[str, ...] = DEFAULT_SCHEME_ORDER
    queries: tuple[tuple[str, ...], ...] = ()
    overwrite: bool = False
    threads: int | None = 2
    check_tflite_runtime: bool = True
    latency: str = "auto"  # per-fragment latency at batch 1: auto = for progressive pools only, always, never

    def __post_init__(self) -> None:
        if self.latency not in LATENCY_CHOICES:
            raise ConvertError(f"unknown latency mode {self.latency!r}; valid: {', '.join(LATENCY_CHOICES)}")
        object.__setattr__(self, "formats", parse_list("format", self.formats, FORMATS))
        object.__setattr__(self, "precisions", parse_list("precision", self.precisions, PRECISIONS))
        parse_schemes(self.schemes)
        if not self.variants():
            raise ConvertError(f"nothing to produce: formats {list(self.formats)} with precisions "
                               f"{list(self.precisions)}; ONNX offers fp32, int8 and TFLite fp32, fp16, int8")
        if self.max_accuracy_drop < 0:
            raise ConvertError(f"max accuracy drop must be >= 0 points, got {self.max_accuracy_drop}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ConvertError(f"eval image count must be >= 1, got {self.eval_images}")

    def variants(self) -> list[tuple[str, str]]:
        return [(f, p) for f in self.formats for p in self.precisions if p in PRECISIONS_BY_FORMAT[f]]


@dataclass
class ExportResult:
    manifest: Manifest | None
    summary: dict[str, Any]


# --------------------------------------------------------------------------- output directory

def check_output_dir(out: Path, pool_id: str, overwrite: bool) -> None:
    """Refuse to replace another pool's fragments (or any other directory) unless asked to."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            held = json.loads(manifest.read_text(encoding="utf-8")).get("pool_id")
        except (ValueError, AttributeError):
            held = "?"
        if held != pool_id and not overwrite:
            raise ConvertError(f"--out {out} holds fragments of pool {held}, not of this pool {pool_id}; "
                               "choose another --out or pass --overwrite to replace them")
    elif any(out.iterdir()):
        raise ConvertError(f"--out {out} is a non-empty directory without {MANIFEST_NAME}; "
                           "refusing to write fragments into it")


def publish(staging: Path, out: Path) -> None:
    """Put the finished staging directory in place of ``out`` (rename; the old set is removed after)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _remove_stale(out: Path) -> None:
    for stale in list(out.parent.glob(f".{out.name}.staging-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- the export

class Export:
    """One run of ``poe-convert export``."""

    def __init__(self, cfg: ExportConfig, log: Log = _stderr) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out)
        self.pool = Pool.open(cfg.pool)
        self.tasks = {t: tuple(ids) for t, ids in sorted(self.pool.meta.tasks.items())}
        self.queries = query_names(list(self.tasks), [self._check_query(q) for q in cfg.queries])
        self.fragments: list[Fragment] = []
        self.agreements: dict[str, VariantAgreement] = {}
        self.chosen_schemes: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}
        self.latencies: dict[str, float] = {}
        self.units: dict[str, ExpertUnit] = {}
        self.staged = False

    def _check_query(self, query: Sequence[str]) -> tuple[str, ...]:
        for task in query:
            if task not in self.tasks:
                raise ConvertError(f"unknown task {task!r} in a query; valid: {', '.join(self.tasks)}")
        return tuple(query)

    # ----------------------------------------------------------------- entry
    def run(self) -> ExportResult:
        start = time.perf_counter()
        self.pool.verify()  # a missing or tampered pool file stops us before any work
        check_output_dir(self.out, self.pool.meta.pool_id, self.cfg.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive_lock(self.out.parent / f".{self.out.name}.lock"):
                _remove_stale(self.out)
                staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent))
                staging.chmod(0o755)  # mkdtemp's 0700 would hide the published fragments from a file server
                try:
                    result = self._run_in(staging)
                    if result.manifest is not None:
                        publish(staging, self.out)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except LockBusyError as busy:
            raise ConvertError(f"another export is writing {self.out} (pid {busy.pid}); wait for it") from None
        result.summary["wall_seconds"] = round(time.perf_counter() - start, 2)
        return result

    def _timed(self, key: str, t0: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - t0, 3)

    def _run_in(self, staging: Path) -> ExportResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        library = self.pool.library()
        experts = {t: self.pool.expert(t) for t in self.tasks}
        self.units = expert_units(experts)
        self.staged = any(u.stage is not None for u in self.units.values())
        calib = calibration_images(self.pool, cfg.calibration_images, cfg.data_dir, cfg.calibration_file)
        evaluation = evaluation_images(self.pool, cfg.eval_images, cfg.data_dir)
        self.calib_features = torch_outputs(library, calib.images)
        self.calib = calib
        eval_features = torch_outputs(library, evaluation.images)
        self.ref = Reference(evaluation.images, evaluation.labels, eval_features,
                             {t: torch_outputs(m, eval_features) for t, m in experts.items()}, self.tasks,
                             {t: [torch_outputs(m.partial(k), eval_features) for k in range(1, m.num_stages + 1)]
                              for t, m in experts.items() if isinstance(m, ProgressiveExpert)})
        self._timed("torch_reference", t0)
        self.log(f"pool {self.pool.meta.pool_id}: {len(self.tasks)} experts, {len(calib)} calibration and "
                 f"{len(evaluation)} held-out images; variants {', '.join(f'{f}/{p}' for f, p in cfg.variants())}")
        failures: list[str] = []
        for fmt in cfg.formats:
            sources = self._sources(fmt, library, experts)
            for precision in [p for p in cfg.precisions if p in PRECISIONS_BY_FORMAT[fmt]]:
                failures += self._variant(staging, fmt, precision, sources)
        if not failures and cfg.check_tflite_runtime and "tflite" in cfg.formats:
            failures += self._check_tflite_runtime(staging)
        if not failures and (cfg.latency == "always" or (cfg.latency == "auto" and self.staged)):
            t0 = time.perf_counter()
            self.latencies = fragment_latencies(staging, self.fragments)
            self._timed("latency", t0)
        manifest = None if failures else self._manifest()
        if manifest is not None:
            write_manifest(staging, manifest)
        return ExportResult(manifest, self._summary(failures))

    # ----------------------------------------------------------------- sources
    def _sources(self, fmt: str, library, experts) -> dict[str | None, OnnxSource]:
        """ONNX graphs of the library (key None) and of every expert unit (key: task, or task.stageK)."""
        t0 = time.perf_counter()
        nhwc = fmt == "tflite"
        chw = tuple(self.pool.meta.dataset.input_shape)
        sources: dict[str | None, OnnxSource] = {None: export_library(library, chw, nhwc)}
        feature_chw = tuple(self.calib_features.shape[1:])
        for key, unit in self.units.items():
            sources[key] = export_expert(unit.module, feature_chw, nhwc)
        self._timed(f"{fmt}_torch_export", t0)
        self._tflite_runs: dict[tuple[str | None, bool], TFLiteModels] = {}
        return sources

    def _calibration_for(self, task: str | None, layout: str) -> np.ndarray:
        data = self.calib.images if task is None else self.calib_features
        return to_layout(data, "NCHW", layout)

    def _convert(self, fmt: str, precision: str, task: str | None, source: OnnxSource,
                 scheme: QuantScheme | None) -> tuple[bytes, TensorSpec, TensorSpec]:
        """Bytes and I/O specs of one fragment."""
        in_layout = "NCHW" if task is None or fmt == "onnx" else "NHWC"
        out_layout = "NC" if task is not None else ("NCHW" if fmt == "onnx" else "NHWC")
        if fmt == "onnx":
            model = source.model
            if precision == "int8":
                model = quantize_onnx(model, source.input_name, self._calibration_for(task, "NCHW"), scheme)
            data = model.SerializeToString()
            return (data, TensorSpec(source.input_name, source.input_shape, "float32", in_layout),
                    TensorSpec(source.output_name, source.output_shape, "float32", out_layout))
        per_channel = scheme.per_channel if scheme is not None else True
        key = (task, per_channel)
        if key not in self._tflite_runs:
            t0 = time.perf_counter()
            self._tflite_runs[key] = convert_with_onnx2tf(source, self._calibration_for(task, "NHWC"), per_channel,
                                                          keep_nhwc_input=task is not None)
            self.log(f"  onnx2tf {'library' if task is None else 'expert ' + task} "
                     f"({'per-channel' if per_channel else 'per-tensor'}): {time.perf_counter() - t0:.1f} s")
        data = self._tflite_runs[key].for_precision(precision, scheme)
        # onnx2tf turns the NCHW image input into NHWC
        return (data, *tflite_io_specs(data, source.input_name, "NHWC", source.output_name, out_layout))

    def _fragment(self, staging: Path, fmt: str, precision: str, key: str | None, source: OnnxSource,
                  scheme: QuantScheme | None, library_sha: str | None) -> Fragment:
        """Convert one graph (library: key None; else an expert unit), check it and write it into staging."""
        data, in_spec, out_spec = self._convert(fmt, precision, key, source, scheme)
        unit = None if key is None else self.units[key]
        task, stage = (None, None) if unit is None else (unit.task, unit.stage)
        what = "library" if key is None else f"expert {key!r}"
        (check_onnx if fmt == "onnx" else check_tflite_ops)(data, f"{fmt} {precision} {what}")
        rel = f"{fmt}/{precision}/" + ("library" if key is None else f"experts/{key}") + f".{EXTENSION[fmt]}"
        path = staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # the whole staging directory is published atomically
        role = "library" if task is None else "expert"
        return Fragment(id=fragment_id(role, task, fmt, precision, stage), role=role, format=fmt, precision=precision,
                        file=rel, sha256=sha256_bytes(data), bytes=len(data), inputs=(in_spec,), outputs=(out_spec,),
                        task=task, class_ids=self.tasks[task] if task else (), library_sha256=library_sha,
                        scheme=scheme.to_json() if scheme else {}, stage=stage)

    def _variant(self, staging: Path, fmt: str, precision: str, sources: dict[str | None, OnnxSource]) -> list[str]:
        """Convert, check and measure one format/precision; int8 retries safer schemes until the gate passes."""
        schemes: list[QuantScheme | None] = list(parse_schemes(self.cfg.schemes)) if precision == "int8" else [None]
        attempts = []
        for scheme in schemes:
            label = f"{fmt}/{precision}" + (f" ({scheme.name})" if scheme else "")
            t0 = time.perf_counter()
            lib = self._fragment(staging, fmt, precision, None, sources[None], scheme, None)
            units = {key: self._fragment(staging, fmt, precision, key, sources[key], scheme, lib.sha256)
                     for key in self.units}
            experts = {t: tuple(units[k] for k, u in self.units.items() if u.task == t) for t in self.tasks}
            self._timed(f"{fmt}_{precision}_convert", t0)
            t0 = time.perf_counter()
            agreement = measure_variant(staging, lib, experts, self.ref, self.queries, self.cfg.threads)
            self._timed(f"{fmt}_{precision}_measure", t0)
            failures = gate_failures(precision, agreement, self.cfg.max_accuracy_drop)
            worst = agreement.worst_drop_points()
            attempts.append({"scheme": scheme.name if scheme else None, "passed": not failures,
                             "worst_drop_points": round(worst, 3), "failures": failures})
            self.log(f"  {label}: {'ok' if not failures else 'FAILED'} - library+experts "
                     f"{lib.bytes + sum(e.bytes for e in units.values()):,} bytes, worst composite drop "
                     f"{worst:+.2f} points vs torch" + ("" if not failures else f"; {failures[0]}"))
            if not failures:
                self.fragments += [lib, *units.values()]
                self.agreements[f"{fmt}.{precision}"] = agreement
                self.chosen_schemes[f"{fmt}.{precision}"] = {"scheme": scheme.name if scheme else None,
                                                              "attempts": attempts}
                return []
        self.chosen_schemes[f"{fmt}.{precision}"] = {"scheme": None, "attempts": attempts}
        return [f"{fmt}/{precision}: {a['scheme'] or 'conversion'}: {'; '.join(a['failures'][:2])}" for a in attempts]

    def _check_tflite_runtime(self, staging: Path) -> list[str]:
        """Every TFLite fragment must give tflite-runtime the same raw outputs as ai-edge-litert."""
        t0 = time.perf_counter()
        frags = [f for f in self.fragments if f.format == "tflite"]
        jobs, expected = [], []
        for frag in frags:
            runner = open_runner(staging, frag, self.cfg.threads)
            source = self.ref.images_nchw[:8] if frag.role == "library" else self.ref.features_nchw[:8]
            x = quantize(to_layout(source, "NCHW", runner.input.layout), runner.input)
            jobs.append((staging / frag.file, x))
            expected.append(runner.run_raw(x))
        outputs = run_in_tflite_runtime(jobs)
        failures = []
        for frag, got, want in zip(frags, outputs, expected):
            got_f, want_f = dequantize(got, frag.outputs[0]), dequantize(want, frag.outputs[0])
            diff = float(np.max(np.abs(got_f - want_f)))
            relative = diff / (float(np.max(np.abs(want_f))) + 1e-6)
            frag.agreement["tflite_runtime_max_abs_diff"] = diff
            # the two runtimes use different int8 kernels, whose rounding may differ by a few steps
            limit = TOLERANCES["tflite_runtime"]["max_relative_diff_" + ("int" if frag.outputs[0].quantized else "float")]
            if relative > limit:
                failures.append(f"{frag.id}: tflite-runtime output differs from ai-edge-litert by {diff:.3g} "
                                f"({relative:.1%} of the output range; limit {limit:.1%})")
        self._timed("tflite_runtime_check", t0)
        return failures

    # ----------------------------------------------------------------- results
    def _manifest(self) -> Manifest:
        fragments = []
        for frag in self.fragments:
            agreement = dict(self.agreements[f"{frag.format}.{frag.precision}"].fragments[frag.id])
            agreement.update(frag.agreement)
            if frag.role == "expert":
                agreement["input_matches_library_output"] = \
                    self.agreements[f"{frag.format}.{frag.precision}"].seam_passthrough[frag.task]
            fragments.append(Fragment(**{**asdict(frag), "inputs": frag.inputs, "outputs": frag.outputs,
                                         "agreement": _rounded(agreement),
                                         "latency": _rounded(self.latencies.get(frag.id))}))
        meta = self.pool.meta.dataset
        c, h, w = meta.input_shape
        return Manifest(
            pool_id=self.pool.meta.pool_id,
            preprocessing=Preprocessing(input_shape=(h, w, c), mean=tuple(meta.mean), std=tuple(meta.std)),
            class_names=tuple(meta.class_names), tasks=self.tasks, fragments=tuple(fragments),
            seam=SEAM, composites={k: {"scheme": self.chosen_schemes[k]["scheme"],
                                       "attempts": self.chosen_schemes[k]["attempts"],
                                       "queries": _rounded(v.queries),
                                       "int8_passthrough": all(v.seam_passthrough.values())}
                                   for k, v in sorted(self.agreements.items())},
            tools={**{name: _version(name) for name in ("torch", "onnx", "onnxruntime", "onnx2tf", "tensorflow",
                                                         "ai-edge-litert")}, "opset": str(OPSET),
                   **({"latency": LATENCY_CONDITIONS} if self.latencies else {})},
            schema_version=STAGED_SCHEMA_VERSION if self.staged or self.latencies else SINGLE_STAGE_SCHEMA_VERSION)

    def _summary(self, failures: list[str]) -> dict[str, Any]:
        by_variant: dict[str, int] = {}
        for frag in self.fragments:
            key = f"{frag.format}.{frag.precision}"
            by_variant[key] = by_variant.get(key, 0) + frag.bytes
        ratios = {f"{fmt}.{p}/{fmt}.fp32": round(by_variant[f"{fmt}.{p}"] / by_variant[f"{fmt}.fp32"], 4)
                  for fmt in FORMATS for p in ("fp16", "int8")
                  if f"{fmt}.{p}" in by_variant and f"{fmt}.fp32" in by_variant}
        return {"ok": not failures, "pool_id": self.pool.meta.pool_id, "out": str(self.out),
                "failures": failures, "variant_bytes": by_variant, "size_ratios": ratios,
                "schemes": self.chosen_schemes, "stage_seconds": self.timings,
                "fragments": [{"id": f.id, "file": f.file, "bytes": f.bytes, "sha256": f.sha256,
                               "agreement": _rounded({**self.agreements[f"{f.format}.{f.precision}"].fragments[f.id],
                                                      **f.agreement})}
                              for f in self.fragments],
                "composites": {k: _rounded(v.queries) for k, v in sorted(self.agreements.items())},
                **({"latency_ms": _rounded(self.latencies)} if self.latencies else {})}


SEAM = {
    "tensor": "features = library output = every expert's input",
    "onnx": "float32 NCHW (N, C, H, W); int8 ONNX fragments quantize inside the graph (QDQ), their seam stays float32",
    "tflite": "NHWC (N, H, W, C); full-integer int8 fragments exchange int8 with the scale/zero_point in each "
              "tensor spec: when an expert's input spec equals the library's output spec the bytes pass through, "
              "otherwise the runtime requantizes (dequantize with the library's, quantize with the expert's)",
}


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def export_fragments(cfg: ExportConfig, log: Log = _stderr, summary_path: str | None = None) -> ExportResult:
    """Run an export; write the JSON summary to ``summary_path`` (pass or fail); raise GateError on failure."""
    result = Export(cfg, log).run()
    if summary_path:
        atomic_write_json(summary_path, result.summary)
    if result.manifest is None:
        raise GateError(f"export failed its gates, nothing was published to {cfg.out}: "
                        + "; ".join(result.summary["failures"][:3]))
    return result
