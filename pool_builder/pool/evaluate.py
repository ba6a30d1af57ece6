"""How good a composed model is, measured against the oracle restricted to the same classes."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pool_builder.pool.consolidate import consolidate
from pool_builder.data.datasets import Normalizer, Split, reload_dataset
from pool_builder.models.ensemble import Ensemble
from pool_builder.errors import PoolBuilderError
from pool_builder.models.wrn import count_parameters
from pool_builder.pool.loader import Pool
from pool_builder.distillation.training import run_batched


def predict_logits(model: nn.Module, images: np.ndarray, normalizer: Normalizer, batch_size: int = 512) -> np.ndarray:
    """Float32 logits of ``model`` over uint8 images, in eval batches."""
    model.eval()
    parts = [out for _rows, out in run_batched(model, images, normalizer, batch_size, show_progress=False)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def predict_members(ensemble: Ensemble, images: np.ndarray, normalizer: Normalizer,
                    batch_size: int = 512) -> np.ndarray:
    """Every teacher's float32 logits ``[K, N, C]`` in one pass over the images."""
    ensemble.eval()
    parts = [out for _rows, out in run_batched(lambda x: ensemble.members(x).transpose(0, 1), images, normalizer,
                                               batch_size, show_progress=False)]
    return np.concatenate(parts).transpose(1, 0, 2)


def restricted_accuracy(logits: np.ndarray, labels: np.ndarray, class_ids: Sequence[int]) -> float:
    """Accuracy of argmax over the columns ``class_ids`` of full-width logits."""
    ids = np.asarray(class_ids)
    preds = ids[np.argmax(logits[:, ids], axis=1)]
    return float((preds == labels).mean()) if len(labels) else float("nan")


@dataclass
class ExpertReport:
    """One expert alone on its task's test images, against the restricted oracle."""

    task: str
    accuracy: float
    oracle_accuracy: float
    mean_abs_logit_gap: float
    oracle_mean_abs_logit: float
    parameters: int
    test_images: int


def expert_report(task: str, head: nn.Module, features: torch.Tensor, oracle_logits: np.ndarray,
                  labels: np.ndarray, class_ids: Sequence[int]) -> ExpertReport:
    """Score an expert on precomputed library features of the test set (only its classes' images)."""
    mask = np.isin(labels, class_ids)
    head.eval()
    with torch.no_grad():
        out = head(features[torch.from_numpy(np.flatnonzero(mask))]).numpy()
    ids = np.asarray(class_ids)
    target = oracle_logits[mask][:, ids]
    preds = ids[np.argmax(out, axis=1)]
    return ExpertReport(task, float((preds == labels[mask]).mean()),
                        restricted_accuracy(oracle_logits[mask], labels[mask], class_ids),
                        float(np.abs(out - target).mean()), float(np.abs(target).mean()),
                        count_parameters(head), int(mask.sum()))


@dataclass
class QueryReport:
    """PoE on one composite query vs the oracle restricted to the query's classes."""

    tasks: list[str]
    classes: list[str]
    test_images: int
    poe_accuracy: float
    oracle_accuracy: float
    gap_points: float
    poe_parameters: int
    oracle_parameters: int
    consolidation_ms: float
    load_ms: float
    cross_expert_errors: int
    errors: int
    cross_expert_error_share: float
    # multi-teacher oracle only: each teacher alone, restricted to the query's classes (oracle_* is the ensemble)
    teacher_accuracies: dict[str, float] = field(default_factory=dict)
    # images only the oracle / only PoE got right (the discordant pairs that decide whether a gap is noise)
    oracle_only_right: int = 0
    poe_only_right: int = 0

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        if not self.teacher_accuracies:
            del raw["teacher_accuracies"]
        return raw


class Evaluator:
    """Scores queries on a test split; the oracle (every teacher of an ensemble) runs over it once, not per query."""

    def __init__(self, pool: Pool, test: Split, batch_size: int = 512) -> None:
        self.pool = pool
        self.test = test
        self.batch_size = batch_size
        oracle = pool.oracle()
        self.teacher_logits: dict[str, np.ndarray] = {}
        if isinstance(oracle, Ensemble):
            members = predict_members(oracle, test.images, pool.normalizer, batch_size)
            self.teacher_logits = dict(zip(oracle.names, members))
            self.oracle_logits = oracle.fusion.fuse(members).numpy()
        else:
            self.oracle_logits = predict_logits(oracle, test.images, pool.normalizer, batch_size)

    def query(self, tasks: str | Sequence[str], repeats: int = 5, stages: int | None = None) -> QueryReport:
        hierarchy = self.pool.hierarchy
        names = hierarchy.resolve_query(tasks)
        start = time.perf_counter()
        self.pool.library()
        for task in names:
            self.pool.expert(task)
        load_ms = (time.perf_counter() - start) * 1000.0
        timings = []
        for _ in range(max(1, repeats)):
            result = consolidate(self.pool, names, stages)
            timings.append(result.consolidation_ms)
        union = result.class_ids
        mask = np.isin(self.test.labels, union)
        labels = self.test.labels[mask]
        logits = predict_logits(result.model, self.test.images[mask], self.pool.normalizer, self.batch_size)
        preds = np.asarray(union)[np.argmax(logits, axis=1)]
        wrong = preds != labels
        owner = hierarchy.task_of_class()
        cross = int(sum(owner[int(p)] != owner[int(t)] for p, t in zip(preds[wrong], labels[wrong])))
        poe_acc = float((~wrong).mean()) if len(labels) else float("nan")
        oracle_acc = restricted_accuracy(self.oracle_logits[mask], labels, union)
        oracle_right = np.asarray(union)[np.argmax(self.oracle_logits[mask][:, union], axis=1)] == labels
        return QueryReport(
            tasks=list(names), classes=[self.pool.meta.dataset.class_names[i] for i in union],
            test_images=int(mask.sum()), poe_accuracy=poe_acc, oracle_accuracy=oracle_acc,
            gap_points=(poe_acc - oracle_acc) * 100.0, poe_parameters=count_parameters(result.model),
            oracle_parameters=count_parameters(self.pool.oracle()),
            consolidation_ms=statistics.median(timings), load_ms=load_ms,
            cross_expert_errors=cross, errors=int(wrong.sum()),
            cross_expert_error_share=cross / int(wrong.sum()) if wrong.any() else 0.0,
            teacher_accuracies={name: restricted_accuracy(z[mask], labels, union)
                                for name, z in self.teacher_logits.items()},
            oracle_only_right=int((oracle_right & wrong).sum()), poe_only_right=int((~oracle_right & ~wrong).sum()))


def held_out_split(pool: Pool, data_dir: str | None = None, test_limit: int | None = None) -> Split:
    """The test images a pool was evaluated on at build time (same data set, limit and seed) unless overridden."""
    settings = pool.meta.build.get("settings", {})
    dataset = reload_dataset(pool.meta.dataset.name, settings, data_dir)
    if tuple(dataset.class_names) != tuple(pool.meta.dataset.class_names):
        raise PoolBuilderError(f"data set classes {list(dataset.class_names)} differ from the pool's "
                               f"{pool.meta.dataset.class_names}")
    limit = test_limit if test_limit is not None else settings.get("test_limit")
    return dataset.test.stratified(limit, int(settings.get("seed", 0)) + 1)
