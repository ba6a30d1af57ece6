"""The fragment manifest: the one home of the schema a device trusts.

``converters`` writes ``manifest.json`` with these classes and the device reads
it with them, so the two sides cannot drift apart.  Reading validates every
field (roles, formats, precisions, relative file names, expert -> library
links); ``verified_path`` checks a fragment's sha256 before anyone may load it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic_io import atomic_write_json, sha256_bytes, sha256_file
from .manifest_types import check_types, reject_constant

MANIFEST_SCHEMA_VERSION = 2  # the newest this runtime reads
SINGLE_STAGE_SCHEMA_VERSION = 1  # bundles without progressive experts are still written as version 1
STAGED_SCHEMA_VERSION = 2  # adds per-fragment ``stage`` and ``latency`` (progressive experts)
MANIFEST_NAME = "manifest.json"
ROLES = ("library", "expert")
FORMATS = ("tflite", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "int8", "uint8", "int16")
LAYOUTS = ("NCHW", "NHWC", "NC")
SCALE_RTOL = 1e-6  # float32 has ~7 significant digits
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Task names become parts of file names and URLs: the hierarchy's rule (pool_builder/hierarchy.py), no '/' or '..'.
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FRAGMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,+-]{0,255}$")


class ManifestError(ValueError):
    """A manifest or fragment file that must not be used as it is."""


def check_choice(kind: str, value: object, valid: tuple[str, ...] | list[str]) -> str:
    """``value`` if it is one of ``valid``; otherwise an error listing the valid choices."""
    if value not in valid:
        raise ManifestError(f"unknown {kind} {value!r}; valid: {', '.join(map(str, valid))}")
    return str(value)


def check_sha256(what: str, value: object) -> str:
    """``value`` if it is a lowercase hex sha256 (the only form a content-addressed store accepts as a name)."""
    if not isinstance(value, str) or not SHA256_HEX.match(value):
        raise ManifestError(f"{what}: sha256 must be 64 lowercase hex digits, got {str(value)[:80]!r}")
    return value


def check_name(kind: str, value: object, pattern: re.Pattern[str] = TASK_NAME) -> str:
    """A task name or fragment id that is safe in a path or URL: letters, digits, '_', '-', '.'; no '/' or '..'."""
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise ManifestError(f"invalid {kind} {str(value)[:80]!r}: use letters, digits, '_', '-' or '.', "
                            f"starting with a letter or digit (no '/', '\\' or '..')")
    return value


def safe_relative_path(name: str) -> str:
    """A manifest file name: relative, forward slashes, no ``..`` - never a path outside the fragment dir."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or "\\" in name or any(part in ("..", "") for part in name.split("/")):
        raise ManifestError(f"unsafe fragment path {name!r}: must be relative, without '..' or absolute parts")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: how to feed it (dtype, layout) and how to (de)quantize it.

    ``shape`` uses -1 for the batch dimension.  ``scale``/``zero_point`` are set
    only for integer tensors: ``real = (q - zero_point) * scale``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("layout", self.layout, LAYOUTS)
        quantized = self.dtype != "float32"
        if quantized and (self.scale is None or self.zero_point is None
                          or not (math.isfinite(self.scale) and self.scale > 0)):
            raise ManifestError(f"tensor {self.name!r} is {self.dtype} but has no valid scale/zero_point")
        if not quantized and (self.scale is not None or self.zero_point is not None):
            raise ManifestError(f"float tensor {self.name!r} must not carry scale/zero_point")

    @property
    def quantized(self) -> bool:
        return self.dtype != "float32"

    def same_encoding(self, other: "TensorSpec") -> bool:
        """True when values can pass from ``other`` to this tensor without requantizing.

        Scales count as equal within float32 precision: two calibrations of the same
        features can land one ulp apart, which moves no value by a quantization step.
        """
        if self.dtype != other.dtype or self.layout != other.layout or self.shape[1:] != other.shape[1:]:
            return False
        if not self.quantized:
            return True
        return self.zero_point == other.zero_point and math.isclose(self.scale, other.scale, rel_tol=SCALE_RTOL)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TensorSpec":
        return cls(name=str(raw["name"]), shape=tuple(raw["shape"]), dtype=raw["dtype"], layout=raw["layout"],
                   scale=None if raw.get("scale") is None else float(raw["scale"]),
                   zero_point=None if raw.get("zero_point") is None else int(raw["zero_point"]))


@dataclass(frozen=True)
class Preprocessing:
    """How a camera frame becomes the library's float input: ``(pixel / 255 - mean) / std`` per channel."""

    input_shape: tuple[int, int, int]  # H, W, C of the uint8 image
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_dtype: str = "uint8"
    image_layout: str = "NHWC"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        channels = self.input_shape[-1] if len(self.input_shape) == 3 else -1
        if len(self.mean) != channels or len(self.std) != channels or any(s <= 0 for s in self.std) \
                or not all(math.isfinite(v) for v in self.mean + self.std):
            raise ManifestError(f"preprocessing: input shape {self.input_shape} (H, W, C) needs one finite mean and "
                                f"one finite positive std per channel, got mean {self.mean}, std {self.std}")


@dataclass(frozen=True)
class Fragment:
    """One downloadable file: the library or one expert in one format and precision."""

    id: str
    role: str
    format: str
    precision: str
    file: str
    sha256: str
    bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: str | None = None
    class_ids: tuple[int, ...] = ()
    library_sha256: str | None = None  # experts: sha256 of the library fragment they were checked with
    scheme: dict[str, Any] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    stage: int | None = None  # progressive experts: 1-based stage; its logits add to stages 1..stage-1
    latency: float | None = None  # ms per call at batch 1, measured on the export machine (staged bundles)

    def __post_init__(self) -> None:
        check_choice("role", self.role, ROLES)
        if self.stage is not None and (self.role != "expert" or int(self.stage) < 1):
            raise ManifestError(f"fragment {self.id!r}: only expert fragments have a stage, and it is >= 1")
        if self.latency is not None and not (math.isfinite(self.latency) and self.latency >= 0):
            raise ManifestError(f"fragment {self.id!r}: latency must be a non-negative number of ms")
        check_choice("format", self.format, FORMATS)
        check_choice("precision", self.precision, PRECISIONS)
        check_name("fragment id", self.id, FRAGMENT_ID)
        safe_relative_path(self.file)
        check_sha256(f"fragment {self.id!r}", self.sha256)
        if self.task is not None:
            check_name("task name", self.task)
        if self.library_sha256 is not None:
            check_sha256(f"fragment {self.id!r} library_sha256", self.library_sha256)
        if self.bytes < 0:
            raise ManifestError(f"fragment {self.id!r}: bytes must be >= 0, got {self.bytes}")
        if not self.inputs or not self.outputs:
            raise ManifestError(f"fragment {self.id!r} lists no inputs or no outputs")
        if self.role == "expert" and (not self.task or not self.class_ids or not self.library_sha256):
            raise ManifestError(f"expert fragment {self.id!r} needs task, class_ids and library_sha256")
        if self.role == "library" and self.task is not None:
            raise ManifestError(f"library fragment {self.id!r} must not name a task")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Fragment":
        try:
            return cls(id=str(raw["id"]), role=raw["role"], format=raw["format"], precision=raw["precision"],
                       file=str(raw["file"]), sha256=str(raw["sha256"]), bytes=int(raw["bytes"]),
                       inputs=tuple(TensorSpec.from_json(t) for t in raw["inputs"]),
                       outputs=tuple(TensorSpec.from_json(t) for t in raw["outputs"]),
                       task=raw.get("task"), class_ids=tuple(int(c) for c in raw.get("class_ids", ())),
                       library_sha256=raw.get("library_sha256"), scheme=dict(raw.get("scheme", {})),
                       agreement=dict(raw.get("agreement", {})),
                       stage=None if raw.get("stage") is None else int(raw["stage"]),
                       latency=None if raw.get("latency") is None else float(raw["latency"]))
        except KeyError as exc:
            raise ManifestError(f"fragment {raw.get('id', '?')!r} lacks field {exc.args[0]!r}") from None


def fragment_id(role: str, task: str | None, fmt: str, precision: str, stage: int | None = None) -> str:
    """Stable id, e.g. ``library.tflite.int8``, ``expert.tops.onnx.fp32`` or ``expert.tops.stage2.tflite.int8``."""
    if role == "library":
        return f"library.{fmt}.{precision}"
    return f"expert.{task}.{fmt}.{precision}" if stage is None else f"expert.{task}.stage{stage}.{fmt}.{precision}"


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to pick, verify, feed and compose fragments of one pool."""

    pool_id: str
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    tasks: dict[str, tuple[int, ...]]
    fragments: tuple[Fragment, ...]
    seam: dict[str, Any] = field(default_factory=dict)
    composites: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SINGLE_STAGE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version > MANIFEST_SCHEMA_VERSION:
            raise ManifestError(f"manifest schema_version {self.schema_version} is newer than this runtime reads "
                                f"({MANIFEST_SCHEMA_VERSION}); upgrade the edge runtime "
                                f"(pip install -U 'pool-of-experts-edge[edge]') or re-export for this version")
        if self.schema_version not in (SINGLE_STAGE_SCHEMA_VERSION, STAGED_SCHEMA_VERSION):
            raise ManifestError(f"manifest schema_version {self.schema_version} is not supported "
                                f"(this runtime reads {SINGLE_STAGE_SCHEMA_VERSION} and {STAGED_SCHEMA_VERSION})")
        staged = [f.id for f in self.fragments if f.stage is not None or f.latency is not None]
        if staged and self.schema_version < STAGED_SCHEMA_VERSION:
            raise ManifestError(f"fragment {staged[0]!r} has a stage or latency, which needs manifest "
                                f"schema_version {STAGED_SCHEMA_VERSION}, not {self.schema_version}")
        ids = [f.id for f in self.fragments]
        if len(set(ids)) != len(ids):
            raise ManifestError("manifest lists a fragment id twice")
        n = len(self.class_names)
        for task, class_ids in self.tasks.items():
            check_name("task name", task)
            if not class_ids or any(not 0 <= c < n for c in class_ids):
                raise ManifestError(f"task {task!r} has class ids {list(class_ids)} outside 0..{n - 1}")
        libraries = {(f.format, f.precision): f for f in self.fragments if f.role == "library"}
        for frag in self.fragments:
            if frag.role != "expert":
                continue
            if frag.task not in self.tasks or tuple(frag.class_ids) != tuple(self.tasks[frag.task]):
                raise ManifestError(f"expert fragment {frag.id!r}: task or class ids disagree with the manifest's tasks")
            lib = libraries.get((frag.format, frag.precision))
            if lib is None or lib.sha256 != frag.library_sha256:
                raise ManifestError(f"expert fragment {frag.id!r} was not built for this manifest's "
                                    f"{frag.format} {frag.precision} library")
        for fmt, precision in libraries:
            for task in self.tasks:
                stages = sorted(f.stage or 0 for f in self.fragments
                                if f.role == "expert" and f.task == task and (f.format, f.precision) == (fmt, precision))
                if stages and stages != [0] and stages != list(range(1, len(stages) + 1)):
                    raise ManifestError(f"expert {task!r} ({fmt} {precision}) has stages {stages}: expected one "
                                        "unstaged fragment or stages 1..S without gaps")

    # ------------------------------------------------------------------ lookup
    def fragment(self, role: str, fmt: str, precision: str, task: str | None = None,
                 stage: int | None = None) -> Fragment:
        wanted = fragment_id(role, task, fmt, precision, stage)
        for frag in self.fragments:
            if frag.id == wanted:
                return frag
        if role == "expert" and task not in self.tasks:
            raise ManifestError(f"unknown task {task!r}; valid: {', '.join(sorted(self.tasks))}")
        have = sorted({f"{f.format}/{f.precision}" for f in self.fragments})
        raise ManifestError(f"no fragment {wanted!r} in this manifest; formats/precisions present: {', '.join(have)}")

    def expert_stages(self, task: str, fmt: str, precision: str) -> tuple[Fragment, ...]:
        """An expert's fragments in order: its stages 1..S, or its one unstaged fragment."""
        frags = sorted((f for f in self.fragments if f.role == "expert" and f.task == task
                        and f.format == fmt and f.precision == precision), key=lambda f: f.stage or 0)
        return tuple(frags) if frags else (self.fragment("expert", fmt, precision, task),)

    @property
    def staged(self) -> bool:
        """True when some expert is progressive (stage fragments)."""
        return any(f.stage is not None for f in self.fragments)

    def variants(self) -> list[tuple[str, str]]:
        """(format, precision) pairs that have a library fragment."""
        return sorted({(f.format, f.precision) for f in self.fragments if f.role == "library"})

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = {t: list(ids) for t, ids in sorted(self.tasks.items())}
        for frag in out["fragments"]:  # a single-stage manifest stays byte-for-byte what version 1 wrote
            for key in ("stage", "latency"):
                if frag[key] is None:
                    del frag[key]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Manifest":
        if not isinstance(raw, dict) or "schema_version" not in raw:
            raise ManifestError("not a fragment manifest (no schema_version)")
        problem = check_types(raw)
        if problem:
            raise ManifestError(f"malformed manifest: {problem}")
        try:
            pre = raw["preprocessing"]
            return cls(schema_version=int(raw["schema_version"]), pool_id=str(raw["pool_id"]),
                       preprocessing=Preprocessing(input_shape=tuple(pre["input_shape"]), mean=tuple(pre["mean"]),
                                                   std=tuple(pre["std"]), image_dtype=pre.get("image_dtype", "uint8"),
                                                   image_layout=pre.get("image_layout", "NHWC")),
                       class_names=tuple(raw["class_names"]),
                       tasks={str(t): tuple(int(c) for c in ids) for t, ids in raw["tasks"].items()},
                       fragments=tuple(Fragment.from_json(f) for f in raw["fragments"]),
                       seam=dict(raw.get("seam", {})), composites=dict(raw.get("composites", {})),
                       tools=dict(raw.get("tools", {})))
        except KeyError as exc:
            raise ManifestError(f"manifest lacks field {exc.args[0]!r}") from None


def read_manifest(fragments_dir: str | Path) -> Manifest:
    path = Path(fragments_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} not found: not a fragment directory (run `poe-convert export` first)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    return Manifest.from_json(raw)


def write_manifest(fragments_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(fragments_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_json())
    return path


def _fragment_file(fragments_dir: str | Path, fragment: Fragment) -> Path:
    path = Path(fragments_dir) / safe_relative_path(fragment.file)
    if not path.is_file():
        raise ManifestError(f"fragment {fragment.id!r}: file {path} is missing; copy the bundle's "
                            f"{fragment.file} from the export (poe-convert export) or fetch it again")
    return path


def _checksum_error(fragment: Fragment, path: Path) -> ManifestError:
    return ManifestError(f"fragment {fragment.id!r}: {path} does not match its manifest checksum (tampered, "
                         f"truncated, or from another pool or export); refusing to load it")


def verified_path(fragments_dir: str | Path, fragment: Fragment) -> Path:
    """The fragment's file, after checking that its size and sha256 match the manifest."""
    path = _fragment_file(fragments_dir, fragment)
    if path.stat().st_size != fragment.bytes or sha256_file(path) != fragment.sha256:
        raise _checksum_error(fragment, path)
    return path


def verified_bytes(fragments_dir: str | Path, fragment: Fragment) -> bytes:
    """The fragment's bytes, read once and checked in memory: what is loaded is exactly what was verified.

    Checking a path and then letting an interpreter open it again would leave a window
    in which the file could change; interpreters get these bytes instead.
    """
    path = _fragment_file(fragments_dir, fragment)
    if path.stat().st_size != fragment.bytes:
        raise _checksum_error(fragment, path)
    data = path.read_bytes()
    if len(data) != fragment.bytes or sha256_bytes(data) != fragment.sha256:
        raise _checksum_error(fragment, path)
    return data
