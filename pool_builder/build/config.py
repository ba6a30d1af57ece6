"""What a build produces: its settings (recorded in pool.json) and the named profiles that fill them in."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from pool_builder.distillation.ddp import validate_library_workers
from pool_builder.distillation.training import TrainConfig
from pool_builder.data.datasets import COLORS
from pool_builder.errors import PoolBuilderError, unknown_name
from pool_builder.models.ensemble import EnsembleConfig
from pool_builder.models.registry import list_models
from pool_builder.stages.cache import CACHE_DTYPES
from pool_builder.stages.engine import stage_seed


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what a build produces; recorded in ``pool.json``."""

    out: str = "runs/pool"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    hierarchy: str | None = None
    profile: str = "quick"
    train_limit: int | None = 12000
    test_limit: int | None = 5000
    oracle_arch: str | None = "wrn_16_2"  # with oracle_file: None = TorchScript, a name = state dict
    oracle_file: str | None = None
    # Training length: a budget of optimiser steps per stage; epochs = clamp(ceil(steps * batch / n_train),
    # min_epochs, max_epochs) once the data set's size is known (resolve_schedule).  An explicit *_epochs wins.
    oracle_epochs: int | None = None
    student_arch: str = "wrn_16_1"
    library_epochs: int | None = None
    expert_epochs: int | None = None
    oracle_steps: int = 250
    library_steps: int = 500
    expert_steps: int = 1260
    min_epochs: int = 1
    max_epochs: int = 200
    val_share: float = 0.1  # of the training images, held out for early stopping (0: none)
    val_max: int = 5000  # at most this many held-out images
    patience: int = 10  # epochs without a better validation loss before a stage stops (0: never stops early)
    oracle_floor: float = 0.7  # warn when the oracle's test accuracy is below this (pool/checks.py)
    color: str | None = None  # image_folder: "grey" or "rgb" converts every image; None: all must agree
    expert_width: float = 0.25
    temperature: float = 4.0
    alpha: float = 0.3
    batch_size: int = 128
    lr: float = 0.05
    expert_lr: float = 0.05
    cache_dtype: str = "float16"
    online: bool = False
    seed: int = 0
    threads: int | None = None
    ensemble: EnsembleConfig | None = None  # K teachers fused into the oracle (replaces oracle_arch / oracle_file)
    library_workers: int = 1  # > 1: the library's KD runs as torch DDP over that many ranks (ddp.py)
    expert_stages: int = 1  # > 1: progressive experts, S stages whose logits add up (progressive.py)
    stage_width: float | None = None  # width factor of each stage (default: expert_width)

    def __post_init__(self) -> None:
        if isinstance(self.ensemble, dict):  # as read back from pool.json's build settings
            object.__setattr__(self, "ensemble", EnsembleConfig(**self.ensemble))
        if self.ensemble is not None:
            if self.oracle_file is not None:
                raise PoolBuilderError("give either an oracle file or an ensemble of teachers, not both")
            object.__setattr__(self, "oracle_arch", None)  # the ensemble is the oracle
        if self.cache_dtype not in CACHE_DTYPES:
            raise unknown_name("cache dtype", self.cache_dtype, list(CACHE_DTYPES))
        if self.temperature <= 0:
            raise PoolBuilderError(f"temperature must be positive, got {self.temperature}")
        if self.alpha < 0:
            raise PoolBuilderError(f"alpha must be >= 0, got {self.alpha}")
        if not 0 < self.expert_width <= 1:
            raise PoolBuilderError(f"expert width must be in (0, 1], got {self.expert_width}")
        if self.expert_stages < 1:
            raise PoolBuilderError(f"expert stages must be >= 1 (1 = one expert head, as in the paper), "
                                   f"got {self.expert_stages}")
        if self.stage_width is None:
            object.__setattr__(self, "stage_width", self.expert_width)
        if not 0 < self.stage_width <= 1:
            raise PoolBuilderError(f"stage width must be in (0, 1], got {self.stage_width}")
        for name in ("oracle_epochs", "library_epochs", "expert_epochs", "oracle_steps", "library_steps",
                     "expert_steps", "min_epochs", "max_epochs", "val_max"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PoolBuilderError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.min_epochs > self.max_epochs:
            raise PoolBuilderError(f"min epochs ({self.min_epochs}) exceed max epochs ({self.max_epochs})")
        if not 0 <= self.val_share < 0.5:
            raise PoolBuilderError(f"validation share must be in [0, 0.5), got {self.val_share}")
        if self.patience < 0:
            raise PoolBuilderError(f"patience must be >= 0 epochs, got {self.patience}")
        if self.color is not None and self.color not in COLORS:
            raise unknown_name("color", self.color, list(COLORS))
        if self.color is not None and self.dataset != "image_folder":
            raise PoolBuilderError(f"--color only applies to --dataset image_folder ({self.dataset} has one colour)")
        for name in ("data_dir", "hierarchy"):  # absolute, so query/export from another directory find them
            if getattr(self, name):
                object.__setattr__(self, name, str(Path(getattr(self, name)).expanduser().resolve()))
        if self.student_arch not in list_models("wrn_*"):
            raise unknown_name("student architecture", self.student_arch, list_models("wrn_*"))
        if self.oracle_file is None and self.oracle_arch is None and self.ensemble is None:
            raise PoolBuilderError("name an oracle architecture to train, or pass an oracle file")
        if self.oracle_arch is not None and self.oracle_arch not in list_models():
            raise unknown_name("architecture", self.oracle_arch, list_models())
        validate_library_workers(self.library_workers, self.batch_size)
        if self.library_workers > 1 and self.online:
            raise PoolBuilderError("--library-workers > 1 trains the library from the cached oracle logits; "
                                   "drop --online (or use --library-workers 1)")


PROFILES: dict[str, dict[str, Any]] = {
    # ~5 min of compute on 2 cores: at most 12k stratified images.  The step budgets are the former
    # 3 / 6 / 15 epochs over 10.8k training images (12k less the 10 % validation share) at batch 128;
    # a smaller data set gets proportionally more epochs (1.4k images: 26 / 51 / 128).
    "quick": dict(train_limit=12000, test_limit=5000, oracle_arch="wrn_16_2", oracle_steps=250,
                  library_steps=500, expert_steps=1260),
    # All 60k training and 10k test images (~40 min on 2 cores): 6 / 8 / 15 epochs over 55k images.
    "full": dict(train_limit=None, test_limit=None, oracle_arch="wrn_16_2", oracle_steps=2570,
                 library_steps=3430, expert_steps=6440),
}


def config_for(profile: str, **overrides: Any) -> BuildConfig:
    """A profile's settings with explicit overrides (``None`` overrides are ignored)."""
    if profile not in PROFILES:
        raise unknown_name("profile", profile, list(PROFILES))
    valid = {f.name for f in fields(BuildConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise unknown_name("build setting", unknown[0], sorted(valid))
    settings = {**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("ensemble") is not None:
        if overrides.get("oracle_file") or overrides.get("oracle_arch"):
            raise PoolBuilderError("give either one oracle (--oracle-file / --oracle-arch) or teachers "
                                   "(--teachers / --teacher-archs), not both")
        settings["oracle_arch"] = None
    if overrides.get("oracle_file") and overrides.get("oracle_arch") is None:
        settings["oracle_arch"] = None  # a user oracle without an architecture is TorchScript
    return BuildConfig(profile=profile, **settings)


def epochs_for(steps: int, batch_size: int, n_train: int, min_epochs: int, max_epochs: int) -> int:
    """Epochs that give about ``steps`` optimiser steps over ``n_train`` images: the same budget whatever
    the data set's size, within [min_epochs, max_epochs]."""
    return max(min_epochs, min(max_epochs, math.ceil(steps * batch_size / max(1, n_train))))


def resolve_schedule(cfg: BuildConfig, n_train: int) -> BuildConfig:
    """``cfg`` with every stage's epochs fixed for ``n_train`` training images (explicit epochs are kept)."""
    return replace(cfg, **{f"{stage}_epochs": getattr(cfg, f"{stage}_epochs") or epochs_for(
        getattr(cfg, f"{stage}_steps"), cfg.batch_size, n_train, cfg.min_epochs, cfg.max_epochs)
        for stage in ("oracle", "library", "expert")})


def train_config(cfg: BuildConfig, epochs: int | None, lr: float, offset: int) -> TrainConfig:
    """A stage's optimiser settings; its seed derives from the build seed and the stage's offset."""
    if epochs is None:
        raise PoolBuilderError("internal: the schedule was not resolved (resolve_schedule) before training")
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr, seed=stage_seed(cfg.seed, offset))
