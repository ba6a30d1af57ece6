"""Build-time checks: does the pool compose well, and is what it copies worth copying?

Each expert passes its own test (``gap`` in the build table) even when composites
fail: an expert whose logits sit on another scale than its neighbours' loses (or
wins) the argmax across experts.  So after the experts, the build scores the
all-tasks composite and every pair of tasks against the oracle restricted to the
same classes, compares every expert's logit scale with the oracle's, and warns in
one line per problem.  The figures go to ``pool.json`` under ``checks``.

Thresholds (why these numbers):

- Composite gap: warn when PoE is below the restricted oracle by more than
  ``GAP_FLOOR_POINTS`` *and* by more than ``GAP_Z`` standard errors of the paired
  difference (McNemar: sqrt(b + c) / n, with b, c the images only one of the two
  got right).  On a few hundred test images one image is ~0.3-1 point, so a fixed
  threshold alone either cries wolf on small data or misses real gaps on large.
- Logit scale: warn when an expert's mean top logit (on its classes' test images)
  is outside [1 / SCALE_TOLERANCE, SCALE_TOLERANCE] times the oracle's restricted
  to its classes.  Well-distilled experts sit within ~10 % (measured on the tiny
  test pool and the quick demo); the reported failure was 0.55x.
- Oracle: warn below ``--oracle-floor`` test accuracy (0.7 by default), and when
  training accuracy exceeds test accuracy by more than ``OVERFIT_POINTS``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pool_builder.data.datasets import Split
from pool_builder.distillation.training import run_batched
from pool_builder.pool.evaluate import Evaluator, QueryReport
from pool_builder.pool.format import PoolMetadata
from pool_builder.pool.loader import Pool

GAP_FLOOR_POINTS = 1.0
GAP_Z = 2.0
SCALE_TOLERANCE = 1.25
OVERFIT_POINTS = 15.0
MAX_PAIR_TASKS = 12  # above this many tasks only the all-tasks composite is scored (pairs grow quadratically)


def gap_threshold(report: QueryReport) -> float:
    """Points below the restricted oracle that count as a real gap for this query (see module docstring)."""
    n = max(1, report.test_images)
    se = 100.0 * math.sqrt(report.oracle_only_right + report.poe_only_right) / n
    return max(GAP_FLOOR_POINTS, GAP_Z * se)


def logit_scales(pool: Pool, test: Split, oracle_logits: np.ndarray) -> dict[str, dict[str, float]]:
    """Per expert: its mean top logit and the oracle's (restricted to its classes) on its classes' test images."""
    library = pool.library()
    features = torch.from_numpy(np.concatenate(
        [o for _r, o in run_batched(library, test.images, pool.normalizer, show_progress=False)]))
    out = {}
    for task, entry in pool.meta.experts.items():
        ids = np.asarray(entry.class_ids)
        rows = np.flatnonzero(np.isin(test.labels, ids))
        if len(rows) == 0:
            continue
        expert = pool.expert(task).eval()
        with torch.no_grad():
            top = float(expert(features[torch.from_numpy(rows)]).max(1).values.mean())
        oracle_top = float(oracle_logits[rows][:, ids].max(1).mean())
        out[task] = {"expert_mean_top_logit": round(top, 3), "oracle_mean_top_logit": round(oracle_top, 3),
                     # a ratio needs a positive reference: an oracle giving log-probabilities (mean_probs fusion)
                     # has top "logits" <= 0, and then the two levels are recorded without a ratio
                     "ratio": round(top / oracle_top, 3) if oracle_top > 1e-6 else None}
    return out


def _queries(tasks: list[str]) -> list[tuple[str, ...]]:
    everything = [tuple(tasks)]
    if len(tasks) < 3 or len(tasks) > MAX_PAIR_TASKS:
        return everything if len(tasks) > 1 else []
    return everything + list(itertools.combinations(tasks, 2))


def _suspect(pool: Pool, report: QueryReport, scales: dict[str, dict[str, float]]) -> str:
    """Which expert of a failing composite to look at first: the one furthest off the oracle's logit scale when
    one is off, otherwise the one with the largest gap on its own task."""
    def off(task: str) -> float:
        return abs(math.log(max(1e-6, scales.get(task, {}).get("ratio") or 1.0)))

    furthest = max(report.tasks, key=off)
    if off(furthest) > math.log(SCALE_TOLERANCE):
        return f"expert {furthest!r} is off the oracle's logit scale ({scales[furthest]['ratio']:.2f}x)"
    metrics = {t: pool.meta.experts[t].metrics for t in report.tasks}
    gaps = {t: 100 * (m.get("accuracy", 0.0) - m.get("oracle_accuracy", 0.0)) for t, m in metrics.items()}
    worst = min(gaps, key=gaps.__getitem__)
    return (f"no expert is off the oracle's logit scale; expert {worst!r} has the largest gap on its own task "
            f"({gaps[worst]:+.1f} points)")


def build_checks(pool_dir: str | Path, test: Split, log: Callable[[str], None],
                 meta: PoolMetadata | None = None) -> dict[str, Any]:
    """Score composites and logit scales of a pool (``meta``: its pool.json, not yet written, as the build has it);
    log the worst gap and one line per warning."""
    pool = Pool(pool_dir, meta) if meta is not None else Pool.open(pool_dir)
    evaluator = Evaluator(pool, test)
    scales = logit_scales(pool, test, evaluator.oracle_logits)
    warnings = []
    for task, s in scales.items():
        if s["ratio"] is not None and not 1 / SCALE_TOLERANCE <= s["ratio"] <= SCALE_TOLERANCE:
            warnings.append(f"expert {task!r} logits are {s['ratio']:.2f}x the oracle's scale (mean top logit "
                            f"{s['expert_mean_top_logit']:.2f} vs {s['oracle_mean_top_logit']:.2f}): its answers "
                            "win or lose against other experts for the wrong reason; try more expert steps "
                            "(--expert-steps) or a larger --alpha")
    composites = []
    for query in _queries(list(pool.meta.experts)):
        report = evaluator.query(list(query), repeats=1)
        if report.test_images == 0:  # no test image of these classes: nothing to score (and no NaN in pool.json)
            continue
        threshold = gap_threshold(report)
        composites.append({"tasks": report.tasks, "test_images": report.test_images,
                           "poe_accuracy": round(report.poe_accuracy, 4),
                           "oracle_accuracy": round(report.oracle_accuracy, 4),
                           "gap_points": round(report.gap_points, 2), "threshold_points": round(threshold, 2),
                           "cross_expert_error_share": round(report.cross_expert_error_share, 3)})
        if report.gap_points < -threshold:
            warnings.append(f"composite {','.join(report.tasks)} is {-report.gap_points:.1f} points below the oracle "
                            f"restricted to its classes (threshold {threshold:.1f}); {_suspect(pool, report, scales)}: "
                            "try more expert steps (--expert-steps) or a larger --alpha")
    worst_gap = min(composites, key=lambda c: c["gap_points"]) if composites else None
    if worst_gap:
        log(f"composite check: {len(composites)} composite(s); worst gap {worst_gap['gap_points']:+.2f} points "
            f"({','.join(worst_gap['tasks'])}, {worst_gap['test_images']} test images, "
            f"threshold {worst_gap['threshold_points']:.2f})")
    for line in warnings:
        log(f"warning: {line}")
    return {"composites": composites, "worst_gap": worst_gap, "logit_scale": scales, "warnings": warnings,
            "thresholds": {"gap_floor_points": GAP_FLOOR_POINTS, "gap_z": GAP_Z, "scale_tolerance": SCALE_TOLERANCE,
                           "overfit_points": OVERFIT_POINTS}}


def oracle_warnings(test_accuracy: float, train_logits: np.ndarray | None, train_labels: np.ndarray,
                    floor: float) -> list[str]:
    """A weak oracle makes every expert weak: below ``floor``, or far better on its training images than on test."""
    lines = []
    if test_accuracy < floor:
        lines.append(f"oracle test accuracy {100 * test_accuracy:.1f}% is below the floor {100 * floor:.0f}% "
                     "(--oracle-floor): every expert copies it; train it longer (--oracle-steps) or give a stronger "
                     "one (--oracle-file)")
    if train_logits is not None and len(train_labels):
        train_accuracy = float((np.asarray(train_logits).argmax(1) == train_labels).mean())
        if 100 * (train_accuracy - test_accuracy) > OVERFIT_POINTS:
            lines.append(f"oracle training accuracy {100 * train_accuracy:.1f}% is far above its test accuracy "
                         f"{100 * test_accuracy:.1f}%: it memorised a small data set; add images, or fewer oracle "
                         "steps (--oracle-steps) with early stopping (--val-share)")
    return lines
