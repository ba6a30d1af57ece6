"""Train-free consolidation: library + chosen experts, logits at the union's class ids."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from edge_runtime.atomic_io import atomic_write_json, commit_sibling, temporary_sibling

from pool_builder.errors import PoolBuilderError
from pool_builder.models.wrn import ProgressiveExpert
from pool_builder.pool.loader import Pool


class ComposedModel(nn.Module):
    """Runs the library once, every expert on its features, and orders logits by global class id.

    ``class_ids[j]`` is the global class of output column ``j`` (ascending), so
    ``class_ids[argmax]`` is the prediction.
    """

    def __init__(self, library: nn.Module, experts: dict[str, nn.Module], task_classes: dict[str, Sequence[int]]) -> None:
        super().__init__()
        self.library = library
        self.tasks = list(experts)
        self.experts = nn.ModuleDict(experts)
        concat_ids = [c for t in self.tasks for c in task_classes[t]]
        self.class_ids: list[int] = sorted(concat_ids)
        order = sorted(range(len(concat_ids)), key=lambda j: concat_ids[j])
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.library(x)
        logits = torch.cat([self.experts[t](features) for t in self.tasks], dim=1)
        return logits.index_select(1, self.order)


@dataclass
class Consolidation:
    """A composed model and how long composing it took (no training involved)."""

    model: ComposedModel
    tasks: tuple[str, ...]
    class_ids: list[int]
    consolidation_ms: float


def first_stages(expert: nn.Module, stages: int | None) -> nn.Module:
    """A progressive expert summing only its first ``stages`` stages (all it has, if fewer); others as they are."""
    if stages is None or not isinstance(expert, ProgressiveExpert):
        return expert
    if stages < 1:
        raise PoolBuilderError(f"stage count must be >= 1, got {stages}")
    return expert.partial(min(stages, expert.num_stages))


def consolidate(pool: Pool, tasks: str | Sequence[str], stages: int | None = None) -> Consolidation:
    """Compose library + experts for a query; weights already in memory are reused.

    ``stages``: progressive experts run only their first ``stages`` stages (default: all).
    """
    names = pool.hierarchy.resolve_query(tasks)
    start = time.perf_counter()
    model = ComposedModel(pool.library(), {t: first_stages(pool.expert(t), stages) for t in names},
                          {t: pool.hierarchy.class_ids(t) for t in names}).eval()
    elapsed = (time.perf_counter() - start) * 1000.0
    return Consolidation(model, names, model.class_ids, elapsed)


def save_composed(result: Consolidation, pool: Pool, path: str | Path) -> Path:
    """Write the composed model as TorchScript plus a JSON sidecar (classes, preprocessing)."""
    path = Path(path)
    example = torch.zeros(1, *pool.meta.dataset.input_shape)
    with torch.no_grad():
        traced = torch.jit.trace(result.model, example, check_trace=False)
    tmp = temporary_sibling(path)
    try:
        torch.jit.save(traced, str(tmp))
        commit_sibling(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar = path.with_name(path.name + ".json")
    atomic_write_json(sidecar, {
        "pool_id": pool.meta.pool_id, "tasks": list(result.tasks), "class_ids": result.class_ids,
        "class_names": [pool.meta.dataset.class_names[i] for i in result.class_ids],
        "input_shape": pool.meta.dataset.input_shape, "layout": "NCHW",
        "mean": pool.meta.dataset.mean, "std": pool.meta.dataset.std,
        "note": "input: (x/255 - mean)/std; output column j is class_ids[j]"})
    return path
