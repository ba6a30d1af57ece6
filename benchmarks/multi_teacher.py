"""Multi-teacher oracle on Fashion-MNIST: each teacher, the fused ensemble, and the pools distilled from them.

Trains K teachers once (in the first ensemble pool; the other pools hard-link
the teachers and their cached logits), then builds, with the same student,
expert width, seeds and schedules:
  - one pool per fusion in ``--pool-fusions``, distilled from the ensemble;
  - one pool distilled from the best single teacher (chosen on the validation
    share, never on the test images), through the ordinary single-oracle path.
Every pool is scored on the same composite queries against the restricted
references.  Writes ``multi_teacher.json`` and ``multi_teacher.md``.

    python benchmarks/multi_teacher.py --out runs/bench/multi_teacher --threads 2   # defaults: the run in docs/results/multi_teacher.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from pool_builder.build import BuildConfig, build_pool, config_for  # noqa: E402
from pool_builder.data.datasets import Normalizer, load_dataset  # noqa: E402
from pool_builder.models.ensemble import (EnsembleConfig, FusionConfig, TeacherSpec, list_fusions, resolve_fusion,  # noqa: E402
                                   validation_indices)
from pool_builder.pool.evaluate import Evaluator, held_out_split, predict_members  # noqa: E402
from pool_builder.pool.loader import Pool  # noqa: E402
from pool_builder.report import format_table, pct  # noqa: E402

SHARED = ("teachers", "stages/teacher-*.json", "cache/teacher-*_logits.*")


def share_teachers(src: Path, dst: Path) -> None:
    """Let ``dst`` reuse ``src``'s finished teacher stages and logit caches (hard links when possible)."""
    for pattern in SHARED:
        for path in src.glob(pattern):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                target = dst / file.relative_to(src)
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(file, target)
                except OSError:
                    shutil.copy2(file, target)


def parse_teachers(text: str) -> tuple[TeacherSpec, ...]:
    """``arch@seed,arch@seed,...``"""
    specs = []
    for item in text.split(","):
        arch, _, seed = item.partition("@")
        specs.append(TeacherSpec(arch=arch, seed=int(seed or 0)))
    return tuple(specs)


def ensemble_accuracies(pool: Pool, settings: dict[str, Any], data_dir: str | None) -> list[dict[str, Any]]:
    """Each teacher and every fusion rule on all classes: validation share and test images."""
    ens = pool.oracle()
    data = load_dataset(pool.meta.dataset.name, data_dir).limited(settings["train_limit"], settings["test_limit"],
                                                                  settings["seed"])
    spec = settings["ensemble"]
    val_rows = validation_indices(data.train.labels, spec["val_fraction"], settings["seed"] + 2)
    norm = Normalizer(tuple(pool.meta.dataset.mean), tuple(pool.meta.dataset.std))
    val = predict_members(ens, data.train.images[val_rows], norm)
    test = predict_members(ens, data.test.images, norm)
    val_labels, test_labels = data.train.labels[val_rows], data.test.labels

    def acc(z: Any, labels: np.ndarray) -> float:
        return float((np.asarray(z).argmax(1) == labels).mean())

    rows = [{"model": name, "parameters": entry.parameters, "val_accuracy": acc(val[k], val_labels),
             "test_accuracy": acc(test[k], test_labels)} for k, (name, entry) in enumerate(pool.meta.teachers.items())]
    for name in list_fusions():
        fusion, source = resolve_fusion(FusionConfig(name), val, val_labels)
        rows.append({"model": f"ensemble ({name})", "parameters": pool.meta.oracle.parameters,
                     "weights": list(fusion.weights) if fusion.weights else None, "weights_source": source,
                     "val_accuracy": acc(fusion.fuse(val), val_labels),
                     "test_accuracy": acc(fusion.fuse(test), test_labels)})
    return rows


def config(test_limit: int | None, **settings: Any) -> BuildConfig:
    """Quick-profile settings with overrides; ``test_limit`` may be None (all test images)."""
    return replace(config_for("quick", **settings), test_limit=test_limit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/multi_teacher")
    ap.add_argument("--data-dir")
    ap.add_argument("--teachers", default="wrn_10_1@0,wrn_10_1@1,wrn_16_1@2", help="arch@seed,... (>= 3 advised)")
    ap.add_argument("--pool-fusions", default="mean_logits", help="fusions to distil a pool from")
    ap.add_argument("--train-limit", type=int, default=5000)
    ap.add_argument("--test-limit", type=int, default=5000, help="0: all 10,000 test images")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--library-epochs", type=int, default=5)
    ap.add_argument("--expert-epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", default="footwear,tops;bottoms,bags;tops,bottoms,footwear;tops,footwear,bottoms,bags")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    teachers = parse_teachers(args.teachers)
    fusions = [f for f in args.pool_fusions.split(",") if f]
    queries = [q for q in args.queries.split(";") if q]
    common = dict(data_dir=args.data_dir, train_limit=args.train_limit, test_limit=args.test_limit or None,
                  oracle_epochs=args.teacher_epochs, library_epochs=args.library_epochs,
                  expert_epochs=args.expert_epochs, threads=args.threads)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    pools: dict[str, Path] = {}
    for i, fusion in enumerate(fusions):
        pool_dir = out / f"ensemble_{fusion}"
        if i:
            share_teachers(pools[f"ensemble ({fusions[0]})"], pool_dir)
        t0 = time.perf_counter()
        build_pool(config(out=str(pool_dir), ensemble=EnsembleConfig(teachers, FusionConfig(fusion)), **common),
                   show_progress=False)
        seconds[f"ensemble ({fusion})"] = round(time.perf_counter() - t0, 1)
        pools[f"ensemble ({fusion})"] = pool_dir

    first = Pool.open(pools[f"ensemble ({fusions[0]})"])
    best_name, best = max(first.meta.teachers.items(), key=lambda kv: kv[1].metrics["val_accuracy"])
    t0 = time.perf_counter()
    build_pool(config(out=str(out / "best_teacher"), oracle_file=str(first.dir / best.file),
                      oracle_arch=best.architecture["name"], **common), show_progress=False)
    seconds[f"best teacher ({best_name})"] = round(time.perf_counter() - t0, 1)
    pools[f"best teacher ({best_name})"] = out / "best_teacher"

    models = ensemble_accuracies(first, first.meta.build["settings"], args.data_dir)
    results = []
    for source, pool_dir in pools.items():
        pool = Pool.open(pool_dir)
        evaluator = Evaluator(pool, held_out_split(pool, args.data_dir))
        for query in queries:
            report = evaluator.query(query)
            results.append({"distilled_from": source, "pool_id": pool.meta.pool_id,
                            "library_parameters": pool.meta.library.parameters, **report.to_json()})
    # teachers alone and the ensembles, restricted per query (from the ensemble pools' reports)
    by_query: dict[str, dict[str, Any]] = {}
    for r in results:
        row = by_query.setdefault(",".join(r["tasks"]), {"test_images": r["test_images"]})
        if r.get("teacher_accuracies"):
            row["best teacher alone"] = r["teacher_accuracies"][best_name]
            row[f"{r['distilled_from']} alone"] = r["oracle_accuracy"]
        row[f"PoE <- {r['distilled_from']}"] = r["poe_accuracy"]
        row.setdefault("poe_parameters", set()).add(r["poe_parameters"])
    total = round(time.perf_counter() - start, 1)

    model_table = format_table(["model", "params", "val accuracy", "test accuracy (10 classes)"],
                               [[m["model"], f"{m['parameters']:,}", pct(m["val_accuracy"]), pct(m["test_accuracy"])]
                                for m in models])
    columns = ["best teacher alone", *[f"{s} alone" for s in pools if s.startswith("ensemble")],
               *[f"PoE <- {s}" for s in pools]]
    query_rows = [[q, row["test_images"], *[pct(row[c]) for c in columns],
                   "/".join(f"{p:,}" for p in sorted(row["poe_parameters"]))] for q, row in by_query.items()]
    query_table = format_table(["query", "test imgs", *columns, "PoE params"], query_rows)
    payload = {"settings": {**vars(args), "teachers": [t.label for t in teachers]}, "best_teacher": best_name,
               "models": models, "queries": results, "build_seconds": seconds, "total_seconds": total}
    atomic_write_json(out / "multi_teacher.json", payload)
    markdown = ("# Multi-teacher oracle\n\nTeachers and ensembles (all classes):\n\n```\n" + model_table +
                "\n```\n\nComposite queries (accuracy restricted to the query's classes):\n\n```\n" + query_table +
                f"\n```\n\nbuild seconds: {json.dumps(seconds)}; total {total:.0f} s\n")
    atomic_write_bytes(out / "multi_teacher.md", markdown.encode())
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
