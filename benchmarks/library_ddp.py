"""Library distillation with 1 process vs N DDP ranks (``--library-workers``): stage time and accuracy.

Trains an oracle once and caches its logits (not measured), then builds the
same pool once per worker count into fresh directories that share that oracle:
the library (the measured stage; every rank gets ``threads / N`` torch threads,
so each run uses the same cores), its feature cache and the experts.  Reports
the library stage's time, the student's test accuracy, each expert's and two
composite queries' accuracy, and how far each N > 1 run lands from N = 1.
Writes JSON + Markdown (library_ddp.*).

Then, because one build per setting says little on a shared machine, it times
single library epochs of the same student, interleaved ``--repeats`` times:
one process with all threads, N ranks sharing them, and one process with one
rank's share of them (library_ddp_epochs.*).

    python benchmarks/library_ddp.py --out runs/bench                  # 6,000 images, N = 1 and 2
    python benchmarks/library_ddp.py --out runs/bench --ray            # also N = 2 as Ray actors
    python benchmarks/library_ddp.py --out runs/bench --no-builds      # only the interleaved epoch timing
    python benchmarks/library_ddp.py --out runs/bench --train-limit 2000 --library-epochs 2   # smoke run
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from pool_builder.build import build_pool, config_for  # noqa: E402
from pool_builder.data.datasets import Normalizer, load_dataset  # noqa: E402
from pool_builder.distillation.ddp import LocalRanks, distill_library_parallel  # noqa: E402
from pool_builder.models.registry import create_model  # noqa: E402
from pool_builder.distillation.training import TrainConfig, cached_source, distill_student  # noqa: E402
from pool_builder.pool.evaluate import Evaluator, held_out_split  # noqa: E402
from pool_builder.pool.loader import Pool  # noqa: E402
from pool_builder.report import format_table, pct  # noqa: E402

ORACLE = ("oracle.pt", "stages/oracle.json", "cache/oracle_logits.npy", "cache/oracle_logits.json")
QUERIES = (("tops", "footwear", "bottoms", "bags"), ("footwear", "tops"))


def fresh(trained: Path, out: Path) -> Path:
    """A pool directory holding only the trained oracle and its logit cache."""
    shutil.rmtree(out, ignore_errors=True)
    for name in ORACLE:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trained / name, out / name)
    return out


def build(cfg_args: dict[str, Any], trained: Path, out: Path, workers: int, ray: bool) -> dict[str, Any]:
    """One pool with ``workers`` library ranks; its library time and accuracies."""
    threads = cfg_args["threads"]
    if ray:  # a private Ray with the run's CPUs; each rank (and each expert task) one share of them
        cfg_args = {**cfg_args, "threads": max(1, threads // workers)}
    cfg = config_for("quick", out=str(fresh(trained, out)), library_workers=workers, **cfg_args)
    started = time.perf_counter()
    if ray:
        from pool_builder.build.ray_backend import RayOptions, build_pool_on_ray, import_ray

        import_ray().init(num_cpus=threads, include_dashboard=False, logging_level=logging.WARNING)
        try:
            meta = build_pool_on_ray(cfg, RayOptions(), show_progress=False)
        finally:
            import_ray().shutdown()
    else:
        meta = build_pool(cfg, show_progress=False)
    pool = Pool.open(out)
    evaluator = Evaluator(pool, held_out_split(pool, None, None))
    library = json.loads((out / "stages" / "library.json").read_text())
    return {"workers": workers, "launcher": "ray actors" if ray else ("spawned" if workers > 1 else "one process"),
            "library_s": library["seconds"], "build_s": round(time.perf_counter() - started, 1),
            "final_kd_loss": library["metrics"]["final_kd_loss"], "library_sha256": library["sha256"],
            "student_accuracy": library["metrics"]["student_test_accuracy"], "pool_id": meta.pool_id,
            "experts": {t: e.metrics["accuracy"] for t, e in meta.experts.items()},
            "queries": {",".join(q): evaluator.query(list(q)).poe_accuracy for q in QUERIES}}


def epoch_timing(cfg_args: dict[str, Any], trained: Path, workers: int, repeats: int) -> dict[str, Any]:
    """Seconds per library epoch, the settings interleaved so that a change in the machine's load hits all."""
    threads = cfg_args["threads"]
    share = max(1, threads // workers)
    data = load_dataset("fashion_mnist", cfg_args["data_dir"]).limited(cfg_args["train_limit"], 10, 0)
    normalizer = Normalizer(data.mean, data.std)
    logits = np.load(trained / "cache" / "oracle_logits.npy", mmap_mode="r")
    train = TrainConfig(epochs=1, batch_size=128, lr=0.05, seed=2)
    settings = {f"1 process x {threads} threads": (1, threads), f"{workers} ranks x {share} thread(s)": (workers, share),
                f"1 process x {share} thread(s)": (1, share)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    loads: list[float] = []
    for _ in range(repeats):
        for name, (ranks, per_rank) in settings.items():
            torch.manual_seed(2)
            student = create_model("wrn_16_1", in_channels=1, num_classes=10)
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            if ranks > 1:
                distill_library_parallel(student, data.train.images, normalizer, logits, train, 4.0, ranks, per_rank,
                                         LocalRanks(), show_progress=False)
            else:
                torch.set_num_threads(per_rank)
                distill_student(student, data.train.images, normalizer, cached_source(logits), train, 4.0,
                                show_progress=False)
            seconds[name].append(round(time.perf_counter() - started, 1))
            print(f"  {name}: {seconds[name][-1]:.1f} s", file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    return {"images": cfg_args["train_limit"], "seconds": seconds,
            "median_s": {name: float(np.median(v)) for name, v in seconds.items()},
            "load_1min": [round(x, 2) for x in loads]}


def epochs_markdown(timing: dict[str, Any], machine: str) -> str:
    rows = [[name, ", ".join(f"{v:.1f}" for v in values), f"{timing['median_s'][name]:.1f}"]
            for name, values in timing["seconds"].items()]
    return "\n".join([
        f"# One library epoch ({timing['images']} images, batch 128), settings interleaved", "",
        f"Machine: {machine}; 1-minute load average during the runs: {min(timing['load_1min'])}-"
        f"{max(timing['load_1min'])}", "", "```",
        format_table(["setting", "seconds per epoch (each repeat)", "median"], rows), "```", ""])


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = [[r["workers"], r["launcher"], f"{r['library_s']:.1f}", f"{runs[0]['library_s'] / r['library_s']:.2f}x",
             r["final_kd_loss"], pct(r["student_accuracy"]), *[pct(v) for v in r["queries"].values()]] for r in runs]
    table = format_table(["library workers", "ranks", "library s", "speed-up", "final KD loss (train mode)",
                          "student test acc", *[f"PoE {q}" for q in runs[0]["queries"]]], rows)
    return "\n".join([
        "# Library distillation: one process vs DDP ranks", "",
        f"Machine: {result['machine']}; load average before/after: {result['load_before']} / {result['load_after']}",
        f"Settings: {json.dumps(result['settings'], sort_keys=True)}", "", "```", table, "```", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="where library_ddp.json / .md go")
    ap.add_argument("--work", default="runs/bench/library_ddp_work", help="scratch pool directories")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-limit", type=int, default=6000)
    ap.add_argument("--test-limit", type=int, default=5000)
    ap.add_argument("--library-epochs", type=int, default=6)
    ap.add_argument("--expert-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of a run, shared by its ranks")
    ap.add_argument("--workers", default="1,2", help="library worker counts to run (1 first: the reference)")
    ap.add_argument("--ray", action="store_true", help="also run the largest worker count as Ray actors")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the epoch timing (0: none)")
    ap.add_argument("--no-builds", action="store_true", help="only the epoch timing (the oracle is still trained)")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    counts = [int(w) for w in args.workers.split(",")]
    cfg_args = dict(data_dir=args.data_dir, train_limit=args.train_limit, test_limit=args.test_limit,
                    library_epochs=args.library_epochs, expert_epochs=args.expert_epochs, threads=args.threads)
    trained = work / "trained"
    print("training the oracle once and caching its logits (not measured)", file=sys.stderr)
    build_pool(config_for("quick", out=str(trained), **{**cfg_args, "library_epochs": 1, "expert_epochs": 1}),
               log=lambda _m: None, show_progress=False)
    machine = f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    if args.repeats > 0:
        print("interleaved epoch timing", file=sys.stderr)
        timing = epoch_timing(cfg_args, trained, counts[-1], args.repeats)
        atomic_write_json(out / "library_ddp_epochs.json", {"machine": machine, **timing})
        atomic_write_bytes(out / "library_ddp_epochs.md", epochs_markdown(timing, machine).encode())
        print(epochs_markdown(timing, machine))
    if args.no_builds:
        return 0
    load_before = os.getloadavg()
    runs = []
    for workers in counts:
        print(f"library workers {workers}", file=sys.stderr)
        runs.append(build(cfg_args, trained, work / f"n{workers}", workers, ray=False))
    if args.ray:
        print(f"library workers {counts[-1]} as Ray actors", file=sys.stderr)
        runs.append(build(cfg_args, trained, work / f"ray{counts[-1]}", counts[-1], ray=True))
    result = {"machine": machine, "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "settings": cfg_args, "runs": runs,
              "accuracy_points_vs_one_process": [round(100 * (r["student_accuracy"] - runs[0]["student_accuracy"]), 2)
                                                 for r in runs]}
    atomic_write_json(out / "library_ddp.json", result)
    atomic_write_bytes(out / "library_ddp.md", markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
