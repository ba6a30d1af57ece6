"""How closely fragments follow their torch source, measured through the device's own runners.

For one format and precision: the library's features against torch's, each
expert alone on torch's features (logits error, top-1 agreement, task
accuracy), and the composite - library output handed to every expert as a
device would, int8 passing straight through when the encodings match - on
every evaluated query, beside the torch composite on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_runtime.manifest import Fragment
from edge_runtime.runners import dequantize, open_runner, pass_between, quantize, run_batched, to_layout

# Every tolerance in one table.  fp32 must match torch numerically; lower precisions
# are judged by composite accuracy (points = percentage points on held-out images).
TOLERANCES = {
    "fp32": {"max_abs_error": 1e-3},
    "fp16": {"max_accuracy_drop_points": 1.0},
    "int8": {"max_accuracy_drop_points": 1.0},
    # tflite-runtime against ai-edge-litert on the same file: |diff| / max |output|
    "tflite_runtime": {"max_relative_diff_float": 1e-4, "max_relative_diff_int": 0.1},
}


@dataclass(frozen=True)
class Reference:
    """Torch outputs on the evaluation images: the numbers every fragment is compared with."""

    images_nchw: np.ndarray
    labels: np.ndarray
    features_nchw: np.ndarray
    expert_logits: dict[str, np.ndarray]
    tasks: dict[str, tuple[int, ...]]
    # progressive experts: torch logits after 1..S stages (the last equals expert_logits[task])
    partial_logits: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def partial(self, task: str, stage: int | None) -> np.ndarray:
        return self.expert_logits[task] if stage is None else self.partial_logits[task][stage - 1]


@dataclass
class VariantAgreement:
    """Agreement numbers of one format/precision: per fragment id, and per query."""

    fragments: dict[str, dict[str, Any]] = field(default_factory=dict)
    queries: dict[str, dict[str, Any]] = field(default_factory=dict)
    seam_passthrough: dict[str, bool] = field(default_factory=dict)

    def worst_drop_points(self) -> float:
        return max(q["drop_points"] for q in self.queries.values())


def query_names(tasks: Sequence[str], extra: Sequence[Sequence[str]] = ()) -> list[tuple[str, ...]]:
    """All tasks together, every pair of tasks, and any extra queries - sorted and deduplicated."""
    names = sorted(tasks)
    queries = {tuple(names)} | {pair for pair in combinations(names, 2)} | {tuple(sorted(q)) for q in extra}
    return sorted(queries, key=lambda q: (-len(q), q))


def composite_accuracy(logits_by_task: dict[str, np.ndarray], labels: np.ndarray,
                       tasks: dict[str, tuple[int, ...]], query: Sequence[str]) -> tuple[float, int]:
    """Accuracy of the query's composite on images of the query's classes (argmax over its experts)."""
    class_ids = np.concatenate([np.asarray(tasks[t]) for t in query])
    logits = np.concatenate([logits_by_task[t] for t in query], axis=1)
    mask = np.isin(labels, class_ids)
    predicted = class_ids[np.argmax(logits[mask], axis=1)]
    return float(np.mean(predicted == labels[mask])) if mask.any() else float("nan"), int(mask.sum())


def _errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - want)
    return {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean())}


def stage_query_key(query: Sequence[str], stages: int) -> str:
    """Key of a query's composite after ``stages`` stages of every expert (progressive bundles)."""
    return f"{','.join(query)}@stage{stages}"


def measure_variant(fragments_dir: Path, library: Fragment, experts: dict[str, Fragment | Sequence[Fragment]],
                    ref: Reference, queries: Sequence[Sequence[str]], threads: int | None = None) -> VariantAgreement:
    """Agreement of one variant; a progressive expert (its stage fragments in order) is judged on every partial sum.

    A stage fragment's numbers are those of the running sum up to it, against torch's partial sum;
    queries are also measured after k stages of every expert (``query@stagek``) for k < S.
    """
    result = VariantAgreement()
    lib = open_runner(fragments_dir, library, threads)
    x = to_layout(ref.images_nchw, "NCHW", lib.input.layout)
    raw_features = run_batched(lambda b: lib.run_raw(quantize(b, lib.input)), x)
    features = to_layout(dequantize(raw_features, lib.output), lib.output.layout, "NCHW")
    result.fragments[library.id] = _errors(features, ref.features_nchw)

    chained_by_stage: dict[int, dict[str, np.ndarray]] = {}  # stage count -> task -> chained running sum
    most = 1
    for task, frags in experts.items():
        frags = (frags,) if isinstance(frags, Fragment) else tuple(frags)
        most = max(most, len(frags))
        class_ids = np.asarray(ref.tasks[task])
        mask = np.isin(ref.labels, class_ids)
        alone_sum, chained_sum, passthrough = None, None, True
        for k, frag in enumerate(frags, start=1):
            runner = open_runner(fragments_dir, frag, threads)
            alone = run_batched(runner.run, to_layout(ref.features_nchw, "NCHW", runner.input.layout))
            alone_sum = alone if alone_sum is None else alone_sum + alone
            want = ref.partial(task, frag.stage)
            stats = _errors(alone_sum, want)
            stats["top1_agreement"] = float(np.mean(np.argmax(alone_sum, 1) == np.argmax(want, 1)))
            stats["accuracy"] = float(np.mean(class_ids[np.argmax(alone_sum[mask], 1)] == ref.labels[mask]))
            stats["torch_accuracy"] = float(np.mean(class_ids[np.argmax(want[mask], 1)] == ref.labels[mask]))
            result.fragments[frag.id] = stats
            passthrough = passthrough and runner.input.same_encoding(lib.output)
            fed = pass_between(raw_features, lib.output, runner.input)
            out = run_batched(lambda b: dequantize(runner.run_raw(b), runner.output), fed)
            chained_sum = out if chained_sum is None else chained_sum + out
            chained_by_stage.setdefault(k, {})[task] = chained_sum
        result.seam_passthrough[task] = passthrough
    for k in range(2, most + 1):  # an expert with fewer stages keeps its last sum
        for task in experts:
            chained_by_stage[k].setdefault(task, chained_by_stage[k - 1][task])
    chained = chained_by_stage[most]

    for query in queries:
        acc, n = composite_accuracy(chained, ref.labels, ref.tasks, query)
        torch_acc, _ = composite_accuracy(ref.expert_logits, ref.labels, ref.tasks, query)
        result.queries[",".join(query)] = {"accuracy": acc, "torch_accuracy": torch_acc, "images": n,
                                           "drop_points": (torch_acc - acc) * 100.0}
        for k in range(1, most):
            torch_k = {t: (sums := ref.partial_logits.get(t, [ref.expert_logits[t]]))[min(k, len(sums)) - 1] for t in query}
            acc, n = composite_accuracy(chained_by_stage[k], ref.labels, ref.tasks, query)
            torch_acc, _ = composite_accuracy(torch_k, ref.labels, ref.tasks, query)
            result.queries[stage_query_key(query, k)] = {"accuracy": acc, "torch_accuracy": torch_acc, "images": n,
                                                         "drop_points": (torch_acc - acc) * 100.0, "stages": k}
    everything = tuple(sorted(experts))
    got = np.concatenate([chained[t] for t in everything], 1)
    want = np.concatenate([ref.expert_logits[t] for t in everything], 1)
    result.fragments[library.id]["composite_top1_agreement"] = float(np.mean(np.argmax(got, 1) == np.argmax(want, 1)))
    result.fragments[library.id]["composite_accuracy"] = result.queries[",".join(everything)]["accuracy"]
    return result


def gate_failures(precision: str, agreement: VariantAgreement, max_drop_points: float) -> list[str]:
    """Why this variant may not be published; empty when it passes."""
    if precision == "fp32":
        limit = TOLERANCES["fp32"]["max_abs_error"]
        return [f"{fid}: max abs error {s['max_abs_error']:.2e} > {limit:g}"
                for fid, s in agreement.fragments.items() if s["max_abs_error"] > limit]
    return [f"query {q}: accuracy {s['accuracy'] * 100:.2f}% is {s['drop_points']:.2f} points below torch "
            f"{s['torch_accuracy'] * 100:.2f}% (limit {max_drop_points:g})"
            for q, s in agreement.queries.items() if s["drop_points"] > max_drop_points]
