"""Training loops: the oracle (cross-entropy), the library (KD) and experts (CKD).

Teachers are given as *sources*: callables from a batch of row indices (and
the batch's input tensor) to a tensor.  A cached source slices a memory-mapped
array; an online source re-runs a network, as the authors' code does.  The
loops do not know which they got, so cached and online builds train the same
way on the same batches.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from pool_builder.data.datasets import Normalizer
from pool_builder.errors import PoolBuilderError
from pool_builder.distillation.losses import ckd_loss, kd_loss
from pool_builder.stages.checkpoint import Checkpoint

T = TypeVar("T")
Source = Callable[[np.ndarray, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of one training stage (SGD, Nesterov, cosine schedule)."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise PoolBuilderError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise PoolBuilderError(f"batch size must be >= 2 (batch norm), got {self.batch_size}")
        if self.lr <= 0:
            raise PoolBuilderError(f"learning rate must be positive, got {self.lr}")


class EarlyStop:
    """Early stopping on a held-out share: score after every epoch, keep the best weights, stop after
    ``patience`` epochs without a better score (0: run every epoch, still keep the best).

    Why: a step budget sized for 12k images is many epochs on 1k, where the last epoch is rarely the best.
    """

    def __init__(self, score: Callable[[], float], patience: int) -> None:
        self.score = score
        self.patience = patience
        self.best = math.inf
        self.best_epoch = 0
        self.epochs_run = 0
        self.best_state: dict[str, Any] | None = None

    def update(self, epoch: int, model: nn.Module) -> bool:
        """Score the model after ``epoch`` (1-based); True when training should stop."""
        model.eval()
        with torch.no_grad():
            value = float(self.score())
        model.train()
        self.epochs_run = epoch
        if value < self.best:
            self.best, self.best_epoch = value, epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load(self, saved: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.best_state = saved["best"], saved["best_epoch"], saved["best_state"]

    def metrics(self) -> dict[str, Any]:
        """What the stage record keeps: how long it ran and which epoch's weights it kept."""
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val_loss": round(self.best, 4)}


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on stderr when interactive and tqdm is installed; the plain iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, min_last: int = 2) -> list[np.ndarray]:
    """Shuffled index batches; each batch sorted (memory-mapped reads stay local).

    A last batch smaller than ``min_last`` is merged into the one before: 2 for one
    process (batch norm needs two images), 2 per rank for data-parallel training.
    """
    if n < 2:
        raise PoolBuilderError(f"need at least 2 training images, got {n}")
    order = torch.randperm(n, generator=generator).numpy()
    batches = [np.sort(order[i:i + batch_size]) for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_last:
        last = batches.pop()
        batches[-1] = np.sort(np.concatenate([batches[-1], last]))
    return batches


def batches_per_epoch(n: int, batch_size: int, min_last: int = 2) -> int:
    """How many batches :func:`epoch_batches` yields (a last batch under ``min_last`` images is merged)."""
    count = -(-n // batch_size)
    return count - 1 if count > 1 and 0 < n % batch_size < min_last else count


def sgd_cosine(params: Iterable[nn.Parameter], cfg: TrainConfig,
               steps: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with Nesterov momentum and a cosine schedule with a short linear warm-up, over ``steps`` steps."""
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    warmup = max(1, steps // 30)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batched(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive row slices covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, normalizer: Normalizer,
                batch_size: int = 512, dtype: str = "float32", desc: str = "",
                show_progress: bool = True) -> Iterator[tuple[slice, np.ndarray]]:
    """``fn`` over uint8 images in eval batches, yielding ``(rows, outputs as numpy)``."""
    slices = list(batched(len(images), batch_size))
    for rows in progress(slices, desc, len(slices), show_progress):
        out = fn(normalizer(images[rows]))
        yield rows, out.float().contiguous().numpy().astype(dtype, copy=False)


def _fit(model: nn.Module, params: Iterable[nn.Parameter], n: int, cfg: TrainConfig,
         step_loss: Callable[[np.ndarray], torch.Tensor], desc: str, show_progress: bool,
         checkpoint: Checkpoint | None = None, generators: dict[str, torch.Generator] | None = None,
         early_stop: EarlyStop | None = None) -> float:
    """Generic loop: shuffled batches, SGD + cosine; returns the last epoch's mean loss.

    With ``early_stop`` the model is scored after every epoch, may stop early, and ends with its best weights.

    With a ``checkpoint`` the model, optimiser, schedule and random generators are
    saved after every epoch, and a matching checkpoint is resumed from, so that
    an interrupted stage continues where it stopped and ends with the same weights.
    """
    gens = {"shuffle": torch.Generator().manual_seed(cfg.seed), **(generators or {})}
    steps = cfg.epochs * batches_per_epoch(n, cfg.batch_size)
    opt, sched = sgd_cosine(params, cfg, steps)
    start, last = 0, float("nan")
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        start, last = restore_progress(saved, model, opt, sched, gens)
        if early_stop is not None and "early_stop" in saved:
            early_stop.load(saved["early_stop"])
    model.train()
    for epoch in range(start, cfg.epochs):
        total, count = 0.0, 0
        batches = epoch_batches(n, cfg.batch_size, gens["shuffle"])
        for idx in progress(batches, f"{desc} {epoch + 1}/{cfg.epochs}", len(batches), show_progress):
            loss = step_loss(idx)
            if not torch.isfinite(loss):
                raise PoolBuilderError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / count
        stop = early_stop is not None and early_stop.update(epoch + 1, model)
        if stop:
            break
        if checkpoint and epoch + 1 < cfg.epochs:
            state = progress_state(epoch + 1, last, model, opt, sched, gens)
            if early_stop is not None:
                state["early_stop"] = early_stop.state()
            checkpoint.save(state)
    if early_stop is not None:
        early_stop.restore(model)
    model.eval()
    return last


def progress_state(epoch: int, loss: float, model: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, gens: dict[str, torch.Generator]) -> dict[str, Any]:
    """What a per-epoch checkpoint holds: enough to continue to the same weights as an uninterrupted run."""
    return {"epoch": epoch, "loss": loss, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "generators": {k: g.get_state() for k, g in gens.items()}}


def restore_progress(saved: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler,
                     gens: dict[str, torch.Generator]) -> tuple[int, float]:
    """Load a :func:`progress_state` back; returns (epochs already done, their last mean loss)."""
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    for name, gen in gens.items():
        gen.set_state(saved["generators"][name])
    return int(saved["epoch"]), float(saved["loss"])


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=gen) < 0.5
    x = x.clone()
    x[mask] = x[mask].flip(3)
    return x


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, normalizer: Normalizer,
                     cfg: TrainConfig, hflip: bool = True, show_progress: bool = True,
                     checkpoint: Checkpoint | None = None, early_stop: EarlyStop | None = None) -> float:
    """Cross-entropy training (the oracle, or the from-scratch baseline)."""
    targets = torch.from_numpy(labels)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def step(idx: np.ndarray) -> torch.Tensor:
        x = normalizer(images[idx])
        if hflip:
            x = _flip(x, aug_gen)
        return F.cross_entropy(model(x), targets[idx])

    return _fit(model, model.parameters(), len(images), cfg, step, "oracle", show_progress, checkpoint,
                {"augment": aug_gen}, early_stop)


def distill_student(student: nn.Module, images: np.ndarray, normalizer: Normalizer, teacher: Source,
                    cfg: TrainConfig, temperature: float, show_progress: bool = True,
                    checkpoint: Checkpoint | None = None, early_stop: EarlyStop | None = None) -> float:
    """Plain KD on all classes: how the library (with a temporary full head) is trained."""

    def step(idx: np.ndarray) -> torch.Tensor:
        x = normalizer(images[idx])
        return kd_loss(student(x), teacher(idx, x), temperature)

    return _fit(student, student.parameters(), len(images), cfg, step, "library", show_progress, checkpoint,
                early_stop=early_stop)


def extract_expert(head: nn.Module, n: int, features: Source, oracle_logits: Source, class_ids: tuple[int, ...],
                   cfg: TrainConfig, temperature: float, alpha: float, desc: str = "expert",
                   show_progress: bool = True, checkpoint: Checkpoint | None = None,
                   early_stop: EarlyStop | None = None) -> float:
    """Conditional KD of one expert on the frozen library's features, all ``n`` training images."""
    if alpha < 0:
        raise PoolBuilderError(f"alpha must be >= 0, got {alpha}")
    cols = torch.tensor(class_ids, dtype=torch.long)

    def step(idx: np.ndarray) -> torch.Tensor:
        feats = features(idx, None)
        target = oracle_logits(idx, None).index_select(1, cols)
        return ckd_loss(head(feats), target, temperature, alpha).total

    return _fit(head, head.parameters(), n, cfg, step, desc, show_progress, checkpoint, early_stop=early_stop)


# --------------------------------------------------------------------------- teacher sources

def cached_source(array: np.ndarray) -> Source:
    """Rows of a (memory-mapped) cache as float32 tensors."""

    def source(idx: np.ndarray, _x: torch.Tensor | None) -> torch.Tensor:
        out = torch.from_numpy(np.asarray(array[idx], dtype=np.float32))
        return out.contiguous(memory_format=torch.channels_last) if out.ndim == 4 else out

    return source


def online_source(net: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, normalizer: Normalizer,
                  half: bool = False) -> Source:
    """Re-run a frozen network on every batch (the authors' online loop)."""

    def source(idx: np.ndarray, x: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            out = net(normalizer(images[idx]) if x is None else x)
        return out.half().float() if half else out

    return source
