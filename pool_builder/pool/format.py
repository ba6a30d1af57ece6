"""The pool directory: ``pool.json`` plus weight files, each checked by sha256.

``pool.json`` (schema_version 1)::

    {"schema_version": 1, "pool_id": "...", "created": "...",
     "dataset": {"name", "class_names", "input_shape": [C,H,W], "mean", "std"},
     "tasks": {"footwear": [5, 7, 9], ...},
     "oracle":  {"file", "sha256", "architecture", "parameters", "metrics"},
     "library": {...same..., "architecture": {"kind": "wrn_library", ...}},
     "experts": {"footwear": {...same..., "task", "class_ids", "library_sha256"}},
     "build": {build parameters},
     "teachers": {"t0:wrn_16_2@seed0": {...same as oracle...}, ...},   # only for a multi-teacher oracle
     "checks": {"composites", "worst_gap", "logit_scale", "thresholds", "warnings"}}   # build-time checks

A multi-teacher oracle's entry is ``ensemble.json`` with ``architecture.kind ==
"ensemble"`` (fusion rule and weights; the teachers' files and sha256); the
optional ``teachers`` field, added within schema_version 1, lists the teachers
with their metrics.  Readers without ensemble support still read such a pool;
only loading its oracle fails, with "unknown architecture kind".

Weights are torch state dicts read with ``torch.load(weights_only=True)`` after
their checksum matched; a TorchScript oracle is kept as given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edge_runtime.atomic_io import atomic_write_json, sha256_file

from pool_builder.errors import PoolFormatError, unknown_name

POOL_SCHEMA_VERSION = 1
POOL_JSON = "pool.json"


@dataclass
class ModelEntry:
    """One weight file of the pool and what it is."""

    file: str
    sha256: str
    architecture: dict[str, Any]
    parameters: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExpertEntry(ModelEntry):
    """An expert also names its task, its global class ids and the library it sits on."""

    task: str = ""
    class_ids: list[int] = field(default_factory=list)
    library_sha256: str = ""


@dataclass
class DatasetInfo:
    """What a device needs to prepare inputs and name outputs."""

    name: str
    class_names: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]


@dataclass
class PoolMetadata:
    """Everything in ``pool.json``."""

    pool_id: str
    created: str
    dataset: DatasetInfo
    tasks: dict[str, list[int]]
    oracle: ModelEntry
    library: ModelEntry
    experts: dict[str, ExpertEntry]
    build: dict[str, Any]
    schema_version: int = POOL_SCHEMA_VERSION
    teachers: dict[str, ModelEntry] = field(default_factory=dict)  # members of a multi-teacher oracle
    checks: dict[str, Any] = field(default_factory=dict)  # composite check and warnings (pool/checks.py)

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        if not self.teachers:
            del raw["teachers"]  # a single-oracle pool.json is unchanged
        if not self.checks:
            del raw["checks"]
        return raw

    def expert(self, task: str) -> ExpertEntry:
        if task not in self.experts:
            raise unknown_name("task", task, list(self.experts))
        return self.experts[task]


def safe_relative(name: str) -> str:
    """Reject absolute paths and ``..`` so a pool file can never point outside its directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise PoolFormatError(f"unsafe file name in pool.json: {name!r} (must be relative, without '..')")
    return name


def _entry(raw: dict[str, Any], cls: type[ModelEntry], where: str) -> ModelEntry:
    try:
        entry = cls(**raw)
    except TypeError as exc:
        raise PoolFormatError(f"pool.json: malformed {where} entry ({exc})") from exc
    safe_relative(entry.file)
    return entry


def read_pool_json(pool_dir: str | Path) -> PoolMetadata:
    """Parse and check ``pool.json``; a different schema version is refused."""
    path = Path(pool_dir) / POOL_JSON
    if not path.is_file():
        raise PoolFormatError(f"{pool_dir} is not a pool directory: {POOL_JSON} is missing (build one with `pool-builder build`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PoolFormatError(f"{path} is not valid JSON: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != POOL_SCHEMA_VERSION:
        raise PoolFormatError(
            f"{path} has schema_version {version!r}; this pool_builder reads schema_version {POOL_SCHEMA_VERSION} "
            "only (rebuild the pool with this version)")
    try:
        return PoolMetadata(
            pool_id=raw["pool_id"], created=raw["created"], dataset=DatasetInfo(**raw["dataset"]),
            tasks={k: list(v) for k, v in raw["tasks"].items()},
            oracle=_entry(raw["oracle"], ModelEntry, "oracle"),
            library=_entry(raw["library"], ModelEntry, "library"),
            experts={k: _entry(v, ExpertEntry, f"expert {k!r}") for k, v in raw["experts"].items()},  # type: ignore[misc]
            build=raw.get("build", {}), schema_version=version,
            teachers={k: _entry(v, ModelEntry, f"teacher {k!r}") for k, v in raw.get("teachers", {}).items()},
            checks=dict(raw.get("checks") or {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise PoolFormatError(f"{path} is missing or mangles field {exc}") from exc


def write_pool_json(pool_dir: str | Path, meta: PoolMetadata) -> None:
    """Write ``pool.json`` atomically (the last step of a build)."""
    atomic_write_json(Path(pool_dir) / POOL_JSON, meta.to_json())


def verify_file(pool_dir: str | Path, entry: ModelEntry, what: str) -> Path:
    """Path of an entry's file after its sha256 matched; a mismatch is a clear error."""
    path = Path(pool_dir) / safe_relative(entry.file)
    if not path.is_file():
        raise PoolFormatError(f"{what} weights {path} are missing")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise PoolFormatError(
            f"{what} weights {path} fail their checksum (sha256 {actual[:12]}..., pool.json says "
            f"{entry.sha256[:12]}...): the file is corrupted or was tampered with; rebuild or restore it")
    return path
