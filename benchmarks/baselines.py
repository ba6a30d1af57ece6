"""The paper's per-query baselines: train library + experts' architecture on the query's classes.

Each baseline is a fresh copy of exactly the network PoE composes for the query
(library + one expert head per task, logits at the union's class ids, same
parameter count) trained only on the training images of the query's classes
with pool_builder's own loops and losses:

- ``scratch``: cross-entropy on the labels (``train_classifier``);
- ``kd``: KD from the oracle's logits restricted to the union (``distill_student``);
- ``ckd``: conditional KD, L_soft + alpha * L_scale on those logits (``extract_expert``,
  here over the whole network instead of one head on frozen features);
- ``transfer``: the paper's Transfer baseline: the pool's *trained* library,
  frozen, and new expert heads trained per query with cross-entropy.

Every baseline trains until it reaches a target accuracy (PoE's on the same
test images) or its epoch cap, whichever comes first.  The training clock
stops while the model is evaluated, and the oracle's logits come precomputed,
so the times are the baselines' pure training time: both choices favour the
baselines.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pool_builder.pool.consolidate import ComposedModel
from pool_builder.data.datasets import Normalizer
from pool_builder.pool.evaluate import predict_logits
from pool_builder.models.wrn import Library, WRNConfig, build_expert_head, init_weights
from pool_builder.distillation.training import (TrainConfig, batches_per_epoch, cached_source, distill_student, extract_expert,
                                   train_classifier)


@dataclass(frozen=True)
class QueryData:
    """A query's training and test images; labels are global class ids, logits full width."""

    class_ids: tuple[int, ...]  # the union, ascending: output column j is class_ids[j]
    train_images: np.ndarray
    train_labels: np.ndarray
    oracle_logits: np.ndarray  # [N, all classes] float32, the oracle on train_images
    test_images: np.ndarray
    test_labels: np.ndarray
    normalizer: Normalizer

    @property
    def columns(self) -> np.ndarray:
        """Training labels as output columns (what cross-entropy needs)."""
        return np.searchsorted(np.asarray(self.class_ids), self.train_labels).astype(np.int64)

    def accuracy(self, model: nn.Module) -> float:
        logits = predict_logits(model, self.test_images, self.normalizer)
        return float((np.asarray(self.class_ids)[logits.argmax(1)] == self.test_labels).mean())


@dataclass(frozen=True)
class Distillation:
    """The pool's distillation settings, which the KD and CKD baselines use too."""

    temperature: float
    alpha: float


Trainer = Callable[[nn.Module, QueryData, TrainConfig, Distillation], float]


def _scratch(model: nn.Module, data: QueryData, cfg: TrainConfig, _d: Distillation) -> float:
    return train_classifier(model, data.train_images, data.columns, data.normalizer, cfg, show_progress=False)


def _kd(model: nn.Module, data: QueryData, cfg: TrainConfig, d: Distillation) -> float:
    teacher = cached_source(np.ascontiguousarray(data.oracle_logits[:, list(data.class_ids)]))
    return distill_student(model, data.train_images, data.normalizer, teacher, cfg, d.temperature,
                           show_progress=False)


def _ckd(model: nn.Module, data: QueryData, cfg: TrainConfig, d: Distillation) -> float:
    def images(idx: np.ndarray, _x: torch.Tensor | None) -> torch.Tensor:
        return data.normalizer(data.train_images[idx])

    return extract_expert(model, len(data.train_images), images, cached_source(data.oracle_logits), data.class_ids,
                          cfg, d.temperature, d.alpha, desc="ckd baseline", show_progress=False)


BASELINES: dict[str, tuple[str, Trainer]] = {
    "scratch": ("from scratch (cross-entropy)", _scratch),
    "kd": ("KD from the oracle", _kd),
    "ckd": ("CKD from the oracle (L_soft + alpha L_scale)", _ckd),
    "transfer": ("Transfer: the pool's library frozen, new heads (cross-entropy)", _scratch),
}


class FrozenLibrary(nn.Module):
    """A trained library that stays in eval mode and out of autograd: Transfer trains only the heads.

    ``train()`` on the composed model must not switch its batch norm back to
    batch statistics, so it is overridden; no gradient flows into it, so the
    optimiser steps the heads alone (its parameters never get a ``.grad``).
    """

    def __init__(self, library: nn.Module) -> None:
        super().__init__()
        self.library = copy.deepcopy(library).eval()
        for param in self.library.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenLibrary":
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.library(x)


def same_architecture(student: WRNConfig, tasks: dict[str, tuple[int, ...]], widths: dict[str, float]) -> nn.Module:
    """A freshly initialised library + expert heads: the network PoE would compose for these tasks."""
    experts = {t: build_expert_head(student, widths[t], len(ids)) for t, ids in tasks.items()}
    model = ComposedModel(Library(student), experts, tasks)
    init_weights(model)
    return model


def transfer_architecture(library: nn.Module, student: WRNConfig, tasks: dict[str, tuple[int, ...]],
                          widths: dict[str, float]) -> nn.Module:
    """The pool's trained library, frozen, under freshly initialised heads of the experts' shape."""
    experts = {t: build_expert_head(student, widths[t], len(ids)) for t, ids in tasks.items()}
    for head in experts.values():
        init_weights(head)
    return ComposedModel(FrozenLibrary(library), experts, tasks)


class TrainClock:
    """Training time, wall and process CPU, that stands still while the model is being evaluated."""

    def __init__(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.paused, self.cpu_paused = 0.0, 0.0

    def elapsed(self) -> tuple[float, float]:
        """(wall, CPU) seconds of training so far."""
        return (time.perf_counter() - self.start - self.paused,
                time.process_time() - self.cpu_start - self.cpu_paused)

    def pause(self, fn: Callable[[], Any]) -> Any:
        began, cpu_began = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - began
            self.cpu_paused += time.process_time() - cpu_began


class TargetReached(Exception):
    """Raised from an evaluation at or above the target accuracy: the baseline stops training there."""


class Probe(nn.Module):
    """Wraps the network under training; every ``every`` training steps it is evaluated off the clock.

    pool_builder's loops have no per-step hook and the benchmark must train
    exactly as they do, so the probe sits where the loop calls the model: the
    evaluation runs before step ``k`` (``k`` a multiple of ``every``), i.e. after
    ``k`` optimiser steps.
    """

    def __init__(self, model: nn.Module, every: int, on_eval: Callable[[int], None]) -> None:
        super().__init__()
        self.model = model
        self.every = max(1, every)
        self.on_eval = on_eval
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.steps and self.steps % self.every == 0:
                self.on_eval(self.steps)
                self.model.train()
            self.steps += 1
        return self.model(x)


@dataclass
class Curve:
    """Test accuracy after ``step`` optimiser steps, ``train_s`` wall and ``cpu_s`` CPU seconds of training."""

    steps_per_epoch: int
    points: list[dict[str, float]] = field(default_factory=list)

    def add(self, step: int, train_s: float, cpu_s: float, accuracy: float) -> None:
        self.points.append({"step": step, "epoch": round(step / self.steps_per_epoch, 3),
                            "train_s": round(train_s, 3), "cpu_s": round(cpu_s, 3), "accuracy": accuracy})

    def time_to_reach(self, target: float, key: str = "train_s") -> tuple[float | None, float]:
        """Seconds (``key``: ``train_s`` wall or ``cpu_s`` CPU) at the first evaluation with accuracy >=
        ``target`` (None if never), and at the evaluation before.

        The true crossing lies between the two: evaluations are discrete.
        """
        before = 0.0
        for point in self.points:
            if point["accuracy"] >= target:
                return point[key], before
            before = point[key]
        return None, before


def train_baseline(name: str, model: nn.Module, data: QueryData, cfg: TrainConfig, distill: Distillation,
                   evals_per_epoch: int, target: float | None = None) -> Curve:
    """Train one baseline with its pool_builder loop, evaluating ``evals_per_epoch`` times an epoch and at the end.

    With a ``target`` accuracy training stops at the first evaluation that
    reaches it; otherwise (or when it is never reached) it runs ``cfg.epochs``,
    the cap.  The cosine schedule spans the cap either way, as it would for a
    practitioner who fixed the budget in advance.
    """
    _label, trainer = BASELINES[name]
    per_epoch = batches_per_epoch(len(data.train_images), cfg.batch_size)
    curve = Curve(per_epoch)

    def evaluate(step: int) -> None:
        wall, cpu = clock.elapsed()
        accuracy = clock.pause(lambda: data.accuracy(model))
        curve.add(step, wall, cpu, accuracy)
        if target is not None and accuracy >= target:
            raise TargetReached

    probe = Probe(model, per_epoch // max(1, evals_per_epoch), evaluate)
    clock = TrainClock()
    try:
        trainer(probe, data, cfg, distill)
        evaluate(probe.steps)
    except TargetReached:
        pass
    model.eval()
    return curve
