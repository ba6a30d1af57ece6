"""Build time of the Ray stages (sharded caches, experts) with 1 and 2 Ray workers, against the local build.

Trains an oracle and a library once (short schedules: they are not what is
measured), then builds the caches and experts from them three times into
fresh pool directories that share the trained stages: locally, on a private
Ray with 1 CPU, and on one with 2 CPUs (each task takes one CPU and one torch
thread, so "workers" = tasks running at once).  Checks that all three pools
are bit for bit the same pool, and writes JSON + Markdown.

    python benchmarks/ray_scaling.py --out runs/bench            # quick-profile data (12k images)
    python benchmarks/ray_scaling.py --out runs/bench --train-limit 2000 --expert-epochs 3   # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from pool_builder.build import build_pool, config_for  # noqa: E402
from pool_builder.build.ray_backend import RayOptions, build_pool_on_ray, import_ray  # noqa: E402
from pool_builder.report import format_table  # noqa: E402

TRAINED = ("oracle.pt", "library.pt", "stages/oracle.json", "stages/library.json")


class Timeline:
    """Log lines with the seconds since the build started; stage times are read off its marks."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.lines: list[tuple[float, str]] = []

    def __call__(self, line: str) -> None:
        self.lines.append((time.perf_counter() - self.start, line))
        print(f"  {self.lines[-1][0]:7.1f}s {line[:140]}", file=sys.stderr, flush=True)

    def at(self, marker: str) -> float:
        return next(t for t, line in self.lines if marker in line)

    def phases(self) -> dict[str, float]:
        caches = self.at("[experts]") if any("[experts]" in l for _t, l in self.lines) else self.at("[expert-")
        return {"caches_s": round(caches - self.at("cache oracle_logits.npy: computing"), 2),
                "experts_s": round(self.at("pool written") - caches, 2),
                "build_s": round(self.lines[-1][0], 2)}


def fresh(trained: Path, out: Path) -> Path:
    """A pool directory holding only the trained oracle and library."""
    shutil.rmtree(out, ignore_errors=True)
    for name in TRAINED:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trained / name, out / name)
    return out


def run_local(cfg_args: dict[str, Any], trained: Path, out: Path) -> dict[str, Any]:
    timeline = Timeline()
    meta = build_pool(config_for("quick", out=str(fresh(trained, out)), **cfg_args), log=timeline, show_progress=False)
    return {"backend": "local", "workers": 1, "pool_id": meta.pool_id, **timeline.phases()}


def run_ray(cfg_args: dict[str, Any], trained: Path, out: Path, workers: int, object_store_mb: int) -> dict[str, Any]:
    ray = import_ray()
    started = time.perf_counter()
    ray.init(num_cpus=workers, object_store_memory=object_store_mb << 20, include_dashboard=False,
             logging_level=logging.WARNING)
    init_s = time.perf_counter() - started
    try:
        timeline = Timeline()
        meta = build_pool_on_ray(config_for("quick", out=str(fresh(trained, out)), **cfg_args),
                                 RayOptions(task_cpus=1), log=timeline, show_progress=False)
    finally:
        ray.shutdown()
    return {"backend": "ray", "workers": workers, "pool_id": meta.pool_id, "ray_init_s": round(init_s, 2),
            **timeline.phases()}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        rows.append([f"{r['backend']}" + (f", {r['workers']} worker(s)" if r["backend"] == "ray" else ""),
                     f"{r['caches_s']:.1f}", f"{r['experts_s']:.1f}", f"{r['build_s']:.1f}",
                     f"{r.get('ray_init_s', 0):.1f}", r["pool_id"]])
    table = format_table(["run", "caches s", "experts s", "build s (after Ray is up)", "ray.init s", "pool id"], rows)
    s = result["scaling"]
    return "\n".join([
        "# Ray scaling: caches and experts with 1 and 2 Ray workers", "",
        f"Machine: {result['machine']}; load average before/after: {result['load_before']} / {result['load_after']}",
        f"Settings: {json.dumps(result['settings'], sort_keys=True)}", "", "```", table, "```", "",
        f"Expert stage speed-up 1 -> 2 workers: {s['experts_speedup']:.2f}x (parallel efficiency "
        f"{100 * s['experts_efficiency']:.0f} %); caches {s['caches_speedup']:.2f}x; whole build "
        f"{s['build_speedup']:.2f}x.", f"All pools identical (same pool id, bitwise weights): {result['identical']}", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="where ray_scaling.json / .md go")
    ap.add_argument("--work", default="runs/bench/ray_scaling_work", help="scratch pool directories")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-limit", type=int, default=12000)
    ap.add_argument("--test-limit", type=int, default=5000)
    ap.add_argument("--expert-epochs", type=int, default=15)
    ap.add_argument("--object-store-mb", type=int, default=768)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    # one torch thread per task: two of them use this machine's two cores; the local run uses one too
    cfg_args = dict(data_dir=args.data_dir, train_limit=args.train_limit, test_limit=args.test_limit,
                    oracle_epochs=1, library_epochs=1, expert_epochs=args.expert_epochs, threads=1)
    trained = work / "trained"
    print("training oracle and library once (not measured)", file=sys.stderr)
    # experts of 1 epoch: only the oracle and library of this build are used (their stages ignore expert settings)
    build_pool(config_for("quick", out=str(trained), **{**cfg_args, "expert_epochs": 1}), log=lambda _m: None,
               show_progress=False)
    load_before = os.getloadavg()
    runs = [run_local(cfg_args, trained, work / "local")]
    for workers in (1, 2):
        print(f"ray with {workers} worker(s)", file=sys.stderr)
        runs.append(run_ray(cfg_args, trained, work / f"ray{workers}", workers, args.object_store_mb))
    one, two = runs[1], runs[2]
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"ray {import_ray().__version__}, Python {platform.python_version()}",
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {**cfg_args, "ray_object_store_mb": args.object_store_mb, "ray_task_cpus": 1,
                     "ray_shard_rows": RayOptions().shard_rows}, "runs": runs,
        "identical": len({r["pool_id"] for r in runs}) == 1,
        "scaling": {"experts_speedup": round(one["experts_s"] / two["experts_s"], 3),
                    "experts_efficiency": round(one["experts_s"] / two["experts_s"] / 2, 3),
                    "caches_speedup": round(one["caches_s"] / two["caches_s"], 3),
                    "build_speedup": round(one["build_s"] / two["build_s"], 3)}}
    atomic_write_json(out / "ray_scaling.json", result)
    atomic_write_bytes(out / "ray_scaling.md", markdown(result).encode())
    print(markdown(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
