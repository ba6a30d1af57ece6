"""Multi-teacher oracles: K teachers whose logits are fused into one teacher.

An ensemble usually decides better than any of its members; distillation
compresses it into the pool at single-model cost.  Every fusion rule turns the
teachers' logits ``[K, N, C]`` into *teacher logits* ``[N, C]`` that the KD and
CKD losses consume unchanged, so library and experts never know that their
teacher was an ensemble:

- ``mean_logits``: the mean of the teachers' logits;
- ``mean_probs``: ``log`` of the mean of the teachers' softmax (distilled
  through log-probabilities);
- ``vote``: ``log`` of the vote shares, ties broken softly by the mean
  probability: ``log((votes + 0.5 * mean_prob) / (K + 0.5))``; since
  ``0.5 * mean_prob < 1`` one more vote always wins, and the share is never 0;
- ``weighted``: ``sum_k w_k z_k / sum_k w_k`` with weights given by the user or
  fitted on a validation split held out from the teachers' training data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from pool_builder.errors import PoolBuilderError, PoolFormatError, unknown_name
from pool_builder.models.registry import KIND_ENSEMBLE, list_models, register_kind
from pool_builder.models.weights import load_module
from pool_builder.pool.format import ModelEntry, verify_file  # pool.json's entry format: no torch, no models

FusionFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_FUSIONS: dict[str, FusionFn] = {}

VOTE_TIE_WEIGHT = 0.5  # < 1, so mean probability only breaks ties between equal vote counts
LOG_FLOOR = 1e-8  # keeps log finite when a probability underflows to 0
ENSEMBLE_FILE = "ensemble.json"


def register_fusion(name: str) -> Callable[[FusionFn], FusionFn]:
    """Add a fusion rule under ``name``; a second registration is an error."""

    def add(fn: FusionFn) -> FusionFn:
        if name in _FUSIONS:
            raise PoolBuilderError(f"fusion {name!r} is already registered")
        _FUSIONS[name] = fn
        return fn

    return add


def list_fusions() -> list[str]:
    """Names of the registered fusion rules."""
    return sorted(_FUSIONS)


@register_fusion("mean_logits")
def _mean_logits(logits: torch.Tensor, _weights: torch.Tensor | None) -> torch.Tensor:
    return logits.mean(0)


@register_fusion("mean_probs")
def _mean_probs(logits: torch.Tensor, _weights: torch.Tensor | None) -> torch.Tensor:
    return torch.log(F.softmax(logits, dim=-1).mean(0).clamp_min(LOG_FLOOR))


@register_fusion("vote")
def _vote(logits: torch.Tensor, _weights: torch.Tensor | None) -> torch.Tensor:
    k, _n, c = logits.shape
    votes = F.one_hot(logits.argmax(-1), c).sum(0).to(logits.dtype)
    mean_prob = F.softmax(logits, dim=-1).mean(0)
    return torch.log(((votes + VOTE_TIE_WEIGHT * mean_prob) / (k + VOTE_TIE_WEIGHT)).clamp_min(LOG_FLOOR))


@register_fusion("weighted")
def _weighted(logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        raise PoolBuilderError("weighted fusion needs weights (give them, or fit them with fit_weights)")
    w = weights.to(logits.dtype)
    return (w[:, None, None] * logits).sum(0) / w.sum()


@dataclass(frozen=True)
class FusionConfig:
    """A fusion rule and, for ``weighted``, one weight per teacher (None: fit them on validation data)."""

    name: str = "mean_logits"
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in _FUSIONS:
            raise unknown_name("fusion", self.name, list_fusions())
        if self.weights is None:
            return
        if self.name != "weighted":
            raise PoolBuilderError(f"fusion weights are only used by the 'weighted' fusion, not {self.name!r}")
        weights = tuple(float(w) for w in self.weights)
        if not weights or not all(np.isfinite(weights)):
            raise PoolBuilderError(f"fusion weights must be finite numbers, got {list(self.weights)}")
        if min(weights) < 0 or sum(weights) <= 0:
            raise PoolBuilderError(f"fusion weights must be >= 0 and sum to a positive value, got {list(weights)}")
        object.__setattr__(self, "weights", weights)

    def check_teachers(self, count: int) -> None:
        """Weights, when given, must name exactly one weight per teacher."""
        if self.weights is not None and len(self.weights) != count:
            raise PoolBuilderError(f"{len(self.weights)} fusion weights for {count} teachers; give one per teacher")

    @property
    def needs_fitting(self) -> bool:
        return self.name == "weighted" and self.weights is None

    def fuse(self, logits: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Teachers' logits ``[K, N, C]`` -> fused teacher logits ``[N, C]`` (float32)."""
        z = torch.as_tensor(np.asarray(logits, dtype=np.float32) if isinstance(logits, np.ndarray) else logits)
        if z.ndim != 3:
            raise PoolBuilderError(f"fusion takes teacher logits of shape [K, N, C], got {tuple(z.shape)}")
        self.check_teachers(z.shape[0])
        if self.needs_fitting:
            raise PoolBuilderError("weighted fusion without weights: fit them first (fit_weights) or give them")
        weights = None if self.weights is None else torch.tensor(self.weights, dtype=torch.float32)
        return _FUSIONS[self.name](z.float(), weights)


def stack_logits(per_teacher: Sequence[np.ndarray | torch.Tensor], names: Sequence[str] | None = None) -> np.ndarray:
    """Stack K teachers' ``[N, C]`` logits into ``[K, N, C]``; teachers must agree on N and C."""
    if not per_teacher:
        raise PoolBuilderError("no teacher logits to fuse")
    arrays = [np.asarray(a, dtype=np.float32) for a in per_teacher]
    names = list(names or [f"teacher {i}" for i in range(len(arrays))])
    for name, array in zip(names, arrays):
        if array.ndim != 2 or array.shape != arrays[0].shape:
            raise PoolBuilderError(f"{name} gives logits of shape {array.shape}, but {names[0]} gives "
                                   f"{arrays[0].shape}: teachers must share images and class count")
    return np.stack(arrays)


def fit_weights(logits: np.ndarray | torch.Tensor, labels: np.ndarray, max_iter: int = 100) -> tuple[float, ...]:
    """Teacher weights (on the simplex) minimising the cross-entropy of the weighted mean logits.

    Fitted on a validation split the teachers did not train on; starting from
    equal weights, L-BFGS on a softmax parametrisation, rounded to 6 decimals so
    that the recorded weights are exactly the ones used.
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if z.ndim != 3 or z.shape[1] != len(y) or len(y) == 0:
        raise PoolBuilderError(f"need teacher logits [K, N, C] and N labels, got {tuple(z.shape)} and {len(y)}")
    theta = torch.zeros(z.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy((F.softmax(theta, 0)[:, None, None] * z).sum(0), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weights = F.softmax(theta, 0).numpy().astype(np.float64)
    return tuple(round(float(w), 6) for w in weights)


def resolve_fusion(fusion: FusionConfig, val_logits: np.ndarray, val_labels: np.ndarray) -> tuple[FusionConfig, str]:
    """The fusion with concrete weights, and where they came from (given, fitted, or none needed)."""
    fusion.check_teachers(val_logits.shape[0])
    if not fusion.needs_fitting:
        return fusion, "given" if fusion.weights is not None else "none"
    return replace(fusion, weights=fit_weights(val_logits, val_labels)), "fitted on the validation split"


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded share of the training rows held out from teacher training (sorted)."""
    if not 0 < fraction < 1:
        raise PoolBuilderError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        picked.append(rows[:max(1, int(round(len(rows) * fraction)))])
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: a file (TorchScript, or a state dict of ``arch``), or ``arch`` trained by the builder."""

    file: str | None = None
    arch: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.file is None and self.arch is None:
            raise PoolBuilderError("a teacher needs a file or an architecture to train")
        if self.arch is not None and self.arch not in list_models():
            raise unknown_name("architecture", self.arch, list_models())

    @property
    def label(self) -> str:
        if self.file is None:
            return f"{self.arch}@seed{self.seed}"
        return f"{Path(self.file).name}" + (f"({self.arch})" if self.arch else "")


@dataclass(frozen=True)
class EnsembleConfig:
    """The teachers of a multi-teacher oracle, their fusion, and the validation share held out for it."""

    teachers: tuple[TeacherSpec, ...]
    fusion: FusionConfig = field(default_factory=FusionConfig)
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        teachers = tuple(t if isinstance(t, TeacherSpec) else TeacherSpec(**t) for t in self.teachers)
        object.__setattr__(self, "teachers", teachers)
        if isinstance(self.fusion, dict):
            raw = dict(self.fusion)
            if raw.get("weights") is not None:
                raw["weights"] = tuple(raw["weights"])
            object.__setattr__(self, "fusion", FusionConfig(**raw))
        if len(teachers) < 2:
            raise PoolBuilderError(f"an ensemble needs at least 2 teachers, got {len(teachers)}; "
                                   "for one oracle use --oracle-file / --oracle-arch")
        self.fusion.check_teachers(len(teachers))
        if not 0 < self.val_fraction < 1:
            raise PoolBuilderError(f"validation fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def from_lists(cls, files: Sequence[str] | None, archs: Sequence[str | None] | None,
                   seeds: Sequence[int] | None, fusion: str | None, weights: Sequence[float] | None,
                   val_fraction: float | None = None, base_seed: int = 0) -> "EnsembleConfig":
        """Teachers from the CLI's parallel lists: files (+ an arch each, or none for TorchScript) or archs to train."""
        if files:
            if archs and len(archs) != len(files):
                raise PoolBuilderError(f"{len(archs)} teacher architectures for {len(files)} teacher files; "
                                       "give one per file ('torchscript' for a TorchScript file) or none")
            if seeds:
                raise PoolBuilderError("teacher seeds apply to teachers the builder trains, not to teacher files")
            teachers = [TeacherSpec(file=f, arch=None if not archs or archs[i] == "torchscript" else archs[i])
                        for i, f in enumerate(files)]
        elif archs:
            if seeds and len(seeds) != len(archs):
                raise PoolBuilderError(f"{len(seeds)} teacher seeds for {len(archs)} teacher architectures")
            seeds = list(seeds) if seeds else [base_seed + i for i in range(len(archs))]
            teachers = [TeacherSpec(arch=a, seed=int(s)) for a, s in zip(archs, seeds)]
        else:
            raise PoolBuilderError("name the teachers: --teachers FILE,FILE,... or --teacher-archs ARCH,ARCH,...")
        return cls(tuple(teachers), FusionConfig(fusion or "mean_logits", tuple(weights) if weights else None),
                   0.1 if val_fraction is None else val_fraction)


# --------------------------------------------------------------------------- the fused teacher as a module

class Ensemble(nn.Module):
    """K frozen teachers and a fusion: ``forward`` gives fused teacher logits, ``members`` each teacher's."""

    def __init__(self, teachers: Sequence[nn.Module], fusion: FusionConfig, names: Sequence[str],
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if len(teachers) != len(names):
            raise PoolBuilderError(f"{len(names)} names for {len(teachers)} teachers")
        fusion.check_teachers(len(teachers))
        if fusion.needs_fitting:
            raise PoolBuilderError("weighted fusion without weights: fit them on validation data first")
        self.teachers = nn.ModuleList(teachers)
        self.names = list(names)
        self.fusion = fusion
        if input_shape is not None:
            check_teachers_agree(self.teachers, self.names, tuple(input_shape))

    def members(self, x: torch.Tensor) -> torch.Tensor:
        """Each teacher's logits, ``[K, N, C]``."""
        return torch.stack([t(x) for t in self.teachers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion.fuse(self.members(x))


def check_teachers_agree(teachers: Sequence[nn.Module], names: Sequence[str], input_shape: tuple[int, ...],
                         num_classes: int | None = None) -> None:
    """Every teacher must accept ``input_shape`` and give the same number of classes (and ``num_classes``)."""
    widths = []
    for name, teacher in zip(names, teachers):
        try:
            with torch.no_grad():
                out = teacher(torch.zeros(2, *input_shape))
        except Exception as exc:  # a user model can raise anything on an input shape it does not take
            raise PoolBuilderError(f"teacher {name} fails on input of shape (N, {', '.join(map(str, input_shape))}): "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise PoolBuilderError(f"teacher {name} outputs {got} for 2 images; expected (2, classes)")
        widths.append(int(out.shape[1]))
    expected = num_classes if num_classes is not None else widths[0]
    for name, width in zip(names, widths):
        if width != expected:
            source = "the data set has" if num_classes is not None else f"teacher {names[0]} gives"
            raise PoolBuilderError(f"teacher {name} gives {width} classes, but {source} {expected}: "
                                   "all teachers must classify the same classes")


@dataclass
class EnsembleRecord:
    """Content of ``ensemble.json``: what the fused teacher is made of, exactly (no timestamps)."""

    fusion: dict[str, Any]
    teachers: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_ensemble(path: str | Path, what: str = "oracle") -> Ensemble:
    """Rebuild the fused teacher from ``ensemble.json``; every teacher file is checked by sha256 first."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        record = EnsembleRecord(**raw)
        fusion_raw = dict(record.fusion)
        weights = fusion_raw.get("weights")
        fusion = FusionConfig(fusion_raw["name"], tuple(weights) if weights is not None else None)
        entries = [ModelEntry(t["file"], t["sha256"], t["architecture"], t.get("parameters", 0)) for t in
                   record.teachers]
        names = [t["name"] for t in record.teachers]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PoolFormatError(f"{what}: {path} is not a readable ensemble description ({exc})") from exc
    teachers = [load_module(e.architecture, verify_file(path.parent, e, f"teacher {n}"), f"teacher {n}")
                for e, n in zip(entries, names)]
    return Ensemble(teachers, fusion, names)


register_kind(KIND_ENSEMBLE, load=lambda _arch, path, what: load_ensemble(path, what))
