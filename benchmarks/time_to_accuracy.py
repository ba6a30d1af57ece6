"""Time-to-accuracy measurement behind ``query_vs_training.py``: PoE's query times and repeated baseline runs.

Split from the report so each stays short.  Why these choices:

- Baselines are timed in CPU seconds (``time.process_time``) with a fixed
  torch thread count: on a shared machine wall time measures the neighbours
  as much as the training (an earlier version's ratio moved 19x between two
  runs because it divided the wall time of the shortest run).
- Each baseline trains until it reaches PoE's composite accuracy on the same
  test images, or its epoch cap; a cap reached without the accuracy is
  reported as "not reached", never as a time to accuracy.
- Every baseline is repeated (different seeds: initialisation and batch
  order) and summarised by its median and spread; a repeat that did not reach
  the target counts as slower than any that did.
- PoE's time is given twice: *warm* (library and experts in memory, compose
  only) and *cold* (open the pool: pool.json, sha256 of every file used,
  weights read from disk - what a device pays per new query; the files are in
  the OS page cache after the first repeat, so it is not a first-boot time).
  Ratios divide CPU time by CPU time (same clock for both sides: reading
  files from the page cache is system CPU time and counted).  PoE's wall
  times are kept beside them: on a loaded machine they are many times the
  CPU times (scheduling delay), which says more about the neighbours than
  about PoE.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.baselines import (BASELINES, Distillation, QueryData, same_architecture, train_baseline,
                                  transfer_architecture)
from pool_builder.distillation.training import TrainConfig
from pool_builder.models.wrn import count_parameters
from pool_builder.pool.consolidate import consolidate
from pool_builder.pool.evaluate import Evaluator
from pool_builder.pool.loader import Pool
from pool_builder.stages.engine import seed_stage


@dataclass(frozen=True)
class TrainingPlan:
    """How each baseline is trained: the epoch cap, evaluations per epoch, repeats and seed.

    ``workers`` > 1 trains that many runs at once in spawned processes with
    ``threads`` torch threads each: CPU time per run is measured in its own
    process, so it is the same quantity; only the wall time of the section
    shrinks (memory-bandwidth sharing can add a little CPU time, in the
    baselines' disfavour).
    """

    baselines: tuple[str, ...]
    cap_epochs: int
    evals_per_epoch: int
    repeats: int
    seed: int
    workers: int = 1
    threads: int = 1


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median wall and CPU milliseconds of ``fn`` over ``repeats`` calls; ``ms`` (what ratios use) is the CPU
    median, the clock the baselines are measured with; ``min_ms``/``max_ms`` are CPU too."""
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        cpus.append((time.process_time() - cpu) * 1000.0)
        walls.append((time.perf_counter() - wall) * 1000.0)
    wall_ms, cpu_ms = statistics.median(walls), statistics.median(cpus)
    return {"wall_ms": wall_ms, "cpu_ms": cpu_ms, "ms": cpu_ms, "min_ms": min(cpus), "max_ms": max(cpus)}


def poe_times(pool: Pool, tasks: Sequence[str], warm_repeats: int, cold_repeats: int) -> dict[str, Any]:
    """PoE's warm (compose in memory) and cold (open pool + verify + load + compose) query times."""
    consolidate(pool, tasks)  # weights in memory
    warm = timed(lambda: consolidate(pool, tasks), warm_repeats)
    cold = timed(lambda: consolidate(Pool.open(pool.dir), tasks), cold_repeats)
    return {"warm": warm, "cold": cold}


def run_repeat(name: str, qdata: QueryData, pool: Pool, tasks: Sequence[str], train_cfg: TrainConfig,
               distill: Distillation, plan: TrainingPlan, target: float) -> dict[str, Any]:
    """One training run of one baseline until ``target`` or the cap (the global torch seed set by the caller)."""
    hierarchy = pool.hierarchy
    classes = {t: hierarchy.class_ids(t) for t in tasks}
    widths = {t: float(pool.meta.experts[t].architecture["width_factor"]) for t in tasks}
    student = pool.library().cfg
    model = (transfer_architecture(pool.library(), student, classes, widths) if name == "transfer"
             else same_architecture(student, classes, widths))
    curve = train_baseline(name, model, qdata, train_cfg, distill, plan.evals_per_epoch, target)
    cpu_reach, cpu_before = curve.time_to_reach(target, "cpu_s")
    wall_reach, _ = curve.time_to_reach(target, "train_s")
    accs = [p["accuracy"] for p in curve.points]
    last = curve.points[-1]
    return {"reached": cpu_reach is not None, "cpu_s_to_target": cpu_reach, "wall_s_to_target": wall_reach,
            "cpu_s_before": cpu_before, "epochs": last["epoch"], "cpu_s": last["cpu_s"], "wall_s": last["train_s"],
            "final_accuracy": accs[-1], "best_accuracy": max(accs), "parameters": count_parameters(model),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "curve": curve.points}


_POOLS: dict[str, Pool] = {}


def _worker_run(pool_dir: str, index: int, r: int, name: str, qdata: QueryData, tasks: tuple[str, ...],
                train_cfg: TrainConfig, distill: Distillation, plan: TrainingPlan, target: float) -> dict[str, Any]:
    """One repeat in a worker process: the pool is opened once per process, the seeds are set as in-process."""
    import torch

    torch.set_num_threads(plan.threads)
    pool = _POOLS.setdefault(pool_dir, Pool.open(pool_dir))
    seed_stage(plan.seed + r, index)
    return run_repeat(name, qdata, pool, tasks, train_cfg, distill, plan, target)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of CPU seconds to the target; an unreached repeat counts as infinitely slow."""
    times = [r["cpu_s_to_target"] if r["reached"] else math.inf for r in runs]
    median = statistics.median(times)
    reached = [t for t in times if t != math.inf]
    return {"repeats": len(runs), "reached": len(reached),
            "median_cpu_s": None if median == math.inf else median,
            "min_cpu_s": min(reached) if reached else None, "max_cpu_s": max(reached) if reached else None,
            "median_run_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "median_final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
            "best_accuracy": max(r["best_accuracy"] for r in runs),
            "parameters": runs[0]["parameters"], "trainable_parameters": runs[0]["trainable_parameters"]}


def fastest(baselines: dict[str, dict[str, Any]], poe_ms: float) -> dict[str, Any]:
    """The baseline with the smallest median CPU time to PoE's accuracy, and that time over PoE's.

    When no baseline's median reached it, the shortest median whole run (to the
    cap) over PoE's time is a lower bound of the ratio.
    """
    reached = {n: b["summary"] for n, b in baselines.items() if b["summary"]["median_cpu_s"] is not None}
    if reached:
        name = min(reached, key=lambda n: reached[n]["median_cpu_s"])
        s = reached[name]
        spread = (s["min_cpu_s"] * 1000.0 / poe_ms, s["max_cpu_s"] * 1000.0 / poe_ms)
        return {"baseline": name, "seconds": s["median_cpu_s"], "ratio": s["median_cpu_s"] * 1000.0 / poe_ms,
                "ratio_range": spread, "lower_bound": False}
    seconds = min(b["summary"]["median_run_cpu_s"] for b in baselines.values())
    return {"baseline": None, "seconds": seconds, "ratio": seconds * 1000.0 / poe_ms, "ratio_range": None,
            "lower_bound": True}


def measure_query(index: int, query: str, pool: Pool, qdata: QueryData, evaluator: Evaluator,
                  plan: TrainingPlan, warm_repeats: int, cold_repeats: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """PoE and every baseline (each ``plan.repeats`` times) on one query."""
    settings = pool.meta.build["settings"]
    tasks = pool.hierarchy.resolve_query(query)
    report = evaluator.query(tasks, repeats=3)
    times = poe_times(pool, tasks, warm_repeats, cold_repeats)
    poe = {"accuracy": report.poe_accuracy, "oracle_accuracy": report.oracle_accuracy,
           "parameters": report.poe_parameters, "cross_expert_error_share": report.cross_expert_error_share,
           **times}
    distill = Distillation(float(settings["temperature"]), float(settings["alpha"]))
    jobs = [(name, r, TrainConfig(epochs=plan.cap_epochs, batch_size=int(settings["batch_size"]),
                                  lr=float(settings["lr"]), seed=plan.seed + 1000 * r + index))
            for name in plan.baselines for r in range(plan.repeats)]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    if plan.workers > 1:
        with ProcessPoolExecutor(plan.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {(n, r): ex.submit(_worker_run, str(pool.dir), index, r, n, qdata, tuple(tasks), cfg, distill,
                                         plan, report.poe_accuracy) for n, r, cfg in jobs}
            results = {key: f.result() for key, f in futures.items()}
    baselines: dict[str, dict[str, Any]] = {}
    for name in plan.baselines:
        runs = []
        for name_, r, train_cfg in jobs:
            if name_ != name:
                continue
            if (name, r) not in results:
                seed_stage(plan.seed + r, index)  # repeat r of every baseline starts from the same weights
                results[(name, r)] = run_repeat(name, qdata, pool, tasks, train_cfg, distill, plan,
                                                report.poe_accuracy)
            run = results[(name, r)]
            runs.append(run)
            log(f"  {query:<22} {name:<8} #{r + 1}: "
                + (f"reached {100 * report.poe_accuracy:.2f}% after {run['cpu_s_to_target']:.1f} CPU s "
                   f"({run['epochs']:.2f} epochs)" if run["reached"] else
                   f"not reached in {run['epochs']:.2f} epochs ({run['cpu_s']:.1f} CPU s), best "
                   f"{100 * run['best_accuracy']:.2f}% vs PoE {100 * report.poe_accuracy:.2f}%"))
        baselines[name] = {"label": BASELINES[name][0], "summary": summarise(runs), "runs": runs}
    return {"query": query, "tasks": list(tasks), "classes": report.classes,
            "train_images": len(qdata.train_images), "test_images": len(qdata.test_images), "poe": poe,
            "baselines": baselines, "fastest_cold": fastest(baselines, poe["cold"]["ms"]),
            "fastest_warm": fastest(baselines, poe["warm"]["ms"])}


def query_data(pool: Pool, query: str, train_images: np.ndarray, train_labels: np.ndarray,
               oracle_train: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray) -> QueryData:
    """The query's training and test images (its classes only), with the oracle's logits on the training ones."""
    union = pool.hierarchy.union_class_ids(pool.hierarchy.resolve_query(query))
    train_rows = np.flatnonzero(np.isin(train_labels, union))
    test_rows = np.flatnonzero(np.isin(test_labels, union))
    return QueryData(union, train_images[train_rows], train_labels[train_rows], oracle_train[train_rows],
                     test_images[test_rows], test_labels[test_rows], pool.normalizer)

