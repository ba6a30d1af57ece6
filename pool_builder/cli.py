"""``pool-builder``: build a pool, query it, describe it (the query service is ``poe-service``).

Errors caused by input print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from edge_runtime.cli_errors import missing_extra, run_command

from pool_builder.errors import PoolBuilderError, unknown_name

BACKENDS = ("local", "ray")
RAY_FLAGS = ("address", "ray_cpus", "ray_object_store_mb", "ray_max_retries", "ray_task_cpus", "ray_shard_rows",
             "ray_cache_via", "ray_connect_timeout")


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="train oracle (or load yours), library and experts into a pool directory")
    p.add_argument("--out", default="runs/pool", help="pool directory to write (resumes if it holds a partial build)")
    p.add_argument("--profile", default="quick", help="quick (12k images, ~5 min) or full (all 60k)")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist, cifar10, cifar100 or image_folder")
    p.add_argument("--data-dir", help="data directory (default for fashion_mnist: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--hierarchy", help="JSON file: primitive task name -> list of class names")
    p.add_argument("--oracle-file", help="your oracle: TorchScript file, or a state dict with --oracle-arch")
    p.add_argument("--oracle-arch", help="registered architecture of the oracle to train or load")
    p.add_argument("--student-arch", help="WRN student whose lower part becomes the library (default wrn_16_1)")
    p.add_argument("--teachers", help="multi-teacher oracle from files: FILE,FILE,... (TorchScript, or state dicts "
                                      "with --teacher-archs)")
    p.add_argument("--teacher-archs", help="ARCH,ARCH,...: architectures of --teachers files ('torchscript' for one "
                                           "that is), or without --teachers the teachers to train")
    p.add_argument("--teacher-seeds", help="SEED,SEED,...: seeds of the teachers to train (default: seed, seed+1, ...)")
    p.add_argument("--fusion", help="how teachers are fused: mean_logits (default), mean_probs, vote, weighted")
    p.add_argument("--fusion-weights", help="W,W,...: one weight per teacher for --fusion weighted "
                                            "(default: fitted on the validation share)")
    p.add_argument("--val-fraction", type=float,
                   help="share of training images held out from teacher training for fitting weights (default 0.1)")
    p.add_argument("--color", help="image_folder: grey or rgb converts every image (default: all must agree)")
    for name in ("train-limit", "test-limit", "batch-size", "seed", "threads"):
        p.add_argument(f"--{name}", type=int)
    sched = p.add_argument_group("schedule (see docs/pool_builder.md, Profiles): a step budget per stage, "
                                 "epochs = clamp(ceil(steps * batch / training images), min, max)")
    for stage in ("oracle", "library", "expert"):
        sched.add_argument(f"--{stage}-steps", type=int, help=f"optimiser steps budget of the {stage} stage")
        sched.add_argument(f"--{stage}-epochs", type=int, help=f"fixed epochs of the {stage} stage (overrides steps)")
    sched.add_argument("--min-epochs", type=int, help="at least this many epochs per stage (default 1)")
    sched.add_argument("--max-epochs", type=int, help="at most this many epochs per stage (default 200)")
    sched.add_argument("--val-share", type=float, help="share of training images held out for early stopping "
                                                      "(default 0.1; 0 = none)")
    sched.add_argument("--val-max", type=int, help="at most this many held-out images (default 5000)")
    sched.add_argument("--patience", type=int, help="epochs without a better validation loss before a stage stops "
                                                    "(default 10; 0 = never early, still keeps the best epoch)")
    sched.add_argument("--oracle-floor", type=float, help="warn when the oracle's test accuracy is below (default 0.7)")
    for name in ("expert-width", "alpha", "temperature", "lr", "expert-lr"):
        p.add_argument(f"--{name}", type=float)
    p.add_argument("--expert-stages", type=int,
                   help="progressive experts: S stages whose logits add up, distilled one after another "
                        "(default 1: one head per expert, as in the paper)")
    p.add_argument("--stage-width", type=float, help="width factor of each progressive stage (default: --expert-width)")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], help="dtype of cached library features")
    p.add_argument("--online", action="store_true", default=None,
                   help="recompute oracle logits and library features every batch (the authors' loop) instead of caching")
    p.add_argument("--library-workers", type=int,
                   help="data-parallel library distillation: N torch DDP ranks over gloo (default 1: one process; "
                        "N > 1 spawns ranks on this machine, or runs them as Ray actors with --backend ray)")
    p.add_argument("--json", action="store_true", help="print pool.json's content instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    ray = p.add_argument_group("distributed build (--backend ray; see docs/pool_builder.md)")
    ray.add_argument("--backend", default="local", help="local (default: this process) or ray (caches and experts "
                     "as Ray tasks, with retries; same weights as local)")
    ray.add_argument("--address", help="Ray cluster to join: HOST:PORT, ray://HOST:PORT or auto "
                     "(default: start a private Ray on this machine)")
    ray.add_argument("--ray-cpus", type=int, help="CPUs of a private Ray (default: all of this machine's)")
    ray.add_argument("--ray-object-store-mb", type=int, help="object store of a private Ray in MB (default 512)")
    ray.add_argument("--ray-max-retries", type=int, help="retries of a task whose worker process dies (default 3)")
    ray.add_argument("--ray-task-cpus", type=float, help="CPUs Ray reserves per task (default: --threads, or "
                     "torch's default thread count)")
    ray.add_argument("--ray-shard-rows", type=int, help="training rows per cache shard, a multiple of 512 (default 4096)")
    ray.add_argument("--ray-cache-via", help="how workers read the caches: object_store (default) or shared_path "
                     "(the pool directory is on a file system every node mounts at the same path)")
    ray.add_argument("--ray-connect-timeout", type=float, help="seconds to wait for --address to answer (default 10)")


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="compose library + experts for composite tasks and evaluate them")
    p.add_argument("--pool", required=True, help="pool directory")
    p.add_argument("--tasks", action="append", required=True,
                   help="comma-separated primitive tasks; repeat for several queries")
    p.add_argument("--data-dir", help="test data directory (default: the one the pool was built from)")
    p.add_argument("--test-limit", type=int, help="evaluate on at most this many test images (default: as built)")
    p.add_argument("--save", help="write the composed model as TorchScript (one query only)")
    p.add_argument("--no-eval", action="store_true", help="only compose (and --save); no test data needed")
    p.add_argument("--stages", type=int, help="progressive experts: use only their first K stages (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a pool and verify its checksums")
    p.add_argument("--pool", required=True, help="pool directory")
    p.add_argument("--json", action="store_true", help="print pool.json")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pool-builder", description="Pool of Experts: build a pool and query it")
    root.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = root.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_query(sub)
    _add_info(sub)
    return root


def _list(text: str | None, flag: str, kind: type = str) -> list[Any] | None:
    """A comma-separated flag value as a list (None when the flag is absent)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise PoolBuilderError(f"{flag} takes a comma-separated list without empty items, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise PoolBuilderError(f"{flag} takes {kind.__name__} values, got {text!r}") from None


def _ensemble(args: argparse.Namespace) -> Any:
    """The multi-teacher oracle named by the build flags, or None for a single oracle."""
    from pool_builder.models.ensemble import EnsembleConfig

    files, archs = _list(args.teachers, "--teachers"), _list(args.teacher_archs, "--teacher-archs")
    if not files and not archs:
        extra = [f for f, v in (("--teacher-seeds", args.teacher_seeds), ("--fusion", args.fusion),
                                ("--fusion-weights", args.fusion_weights), ("--val-fraction", args.val_fraction))
                 if v is not None]
        if extra:
            raise PoolBuilderError(f"{extra[0]} needs teachers: --teachers FILE,FILE,... or --teacher-archs ARCH,...")
        return None
    return EnsembleConfig.from_lists(files, archs, _list(args.teacher_seeds, "--teacher-seeds", int), args.fusion,
                                     _list(args.fusion_weights, "--fusion-weights", float), args.val_fraction,
                                     base_seed=args.seed or 0)


def cmd_build(args: argparse.Namespace) -> int:
    from pool_builder.build import build_pool, config_for
    from pool_builder.report import format_table, pct

    overrides: dict[str, Any] = {"ensemble": _ensemble(args), **{k: getattr(args, k) for k in (
        "dataset", "data_dir", "hierarchy", "oracle_file", "oracle_arch", "student_arch", "train_limit", "test_limit",
        "oracle_epochs", "library_epochs", "expert_epochs", "batch_size", "seed", "threads", "expert_width", "alpha",
        "temperature", "lr", "expert_lr", "cache_dtype", "online", "library_workers", "expert_stages", "stage_width",
        "color", "oracle_steps", "library_steps", "expert_steps", "min_epochs", "max_epochs", "val_share", "val_max",
        "patience", "oracle_floor")}}
    cfg = config_for(args.profile, out=args.out, **overrides)
    if args.backend == "ray":
        from pool_builder.build.ray_backend import ray_options, build_pool_on_ray

        meta = build_pool_on_ray(cfg, ray_options(args), show_progress=not args.no_progress)
    elif args.backend == "local":
        given = [f"--{k.replace('_', '-')}" for k in RAY_FLAGS if getattr(args, k) is not None]
        if given:
            raise PoolBuilderError(f"{', '.join(given)}: only used with --backend ray")
        meta = build_pool(cfg, show_progress=not args.no_progress)
    else:
        raise unknown_name("backend", args.backend, BACKENDS)
    if args.json:
        print(json.dumps(meta.to_json(), indent=2, sort_keys=True))
        return 0
    if meta.teachers:
        print(_teacher_table(meta))
    lib = meta.library.metrics
    print(f"pool {meta.pool_id} in {args.out}: oracle {meta.oracle.parameters:,} params, "
          f"test accuracy {pct(meta.oracle.metrics['test_accuracy'])}; library {meta.library.parameters:,} params "
          f"(student with temporary head: {pct(lib['student_test_accuracy'])})")
    rows = [[t, len(e.class_ids), e.parameters, pct(e.metrics["accuracy"]), pct(e.metrics["oracle_accuracy"]),
             f"{100 * (e.metrics['accuracy'] - e.metrics['oracle_accuracy']):+.2f}", e.metrics["mean_abs_logit_gap"],
             f"{e.metrics['build_seconds']:.1f}"] for t, e in meta.experts.items()]
    print(format_table(["expert", "classes", "params", "accuracy", "oracle (restricted)", "gap (pts)",
                        "|logit - oracle|", "build s"], rows))
    worst = meta.checks.get("worst_gap")
    if worst:
        print(f"composite check: worst gap {worst['gap_points']:+.2f} points on {','.join(worst['tasks'])} "
              f"({worst['test_images']} test images; threshold {worst['threshold_points']:.2f})")
    for line in meta.checks.get("warnings", []):
        print(f"warning: {line}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from pool_builder.pool.consolidate import consolidate, save_composed
    from pool_builder.pool.evaluate import Evaluator, held_out_split
    from pool_builder.pool.loader import Pool
    from pool_builder.report import format_table, pct

    pool = Pool.open(args.pool)
    queries = [pool.hierarchy.resolve_query(t) for t in args.tasks]
    if args.save and len(queries) != 1:
        raise PoolBuilderError(f"--save writes one composed model: give one --tasks, not {len(queries)}")
    if args.save:
        saved = save_composed(consolidate(pool, queries[0], args.stages), pool, args.save)
        print(f"composed model for {','.join(queries[0])} saved to {saved} (+ {saved.name}.json)", file=sys.stderr)
    if args.no_eval:
        return 0
    evaluator = Evaluator(pool, held_out_split(pool, args.data_dir, args.test_limit))
    reports = [evaluator.query(q, stages=args.stages) for q in queries]
    if args.json:
        print(json.dumps({"pool_id": pool.meta.pool_id, "queries": [r.to_json() for r in reports]}, indent=2))
        return 0
    rows = [[",".join(r.tasks), len(r.classes), r.test_images, pct(r.poe_accuracy), pct(r.oracle_accuracy),
             f"{r.gap_points:+.2f}", f"{r.poe_parameters:,} / {r.oracle_parameters:,}",
             f"{r.consolidation_ms:.3f}", f"{r.load_ms:.1f}", pct(r.cross_expert_error_share)] for r in reports]
    print(format_table(["query", "classes", "test imgs", "PoE acc", "oracle (restricted)", "gap (pts)",
                        "params PoE / oracle", "consolidation ms", "load ms", "cross-expert errors"], rows))
    if pool.meta.teachers:
        names = list(pool.meta.teachers)
        rows = [[",".join(r.tasks), *[pct(r.teacher_accuracies[n]) for n in names], pct(r.oracle_accuracy),
                 pct(r.poe_accuracy)] for r in reports]
        print(f"multi-teacher oracle ({pool.meta.oracle.architecture.get('fusion')}), each restricted to the query's "
              "classes:")
        print(format_table(["query", *names, "ensemble", "PoE (from ensemble)"], rows))
    print("consolidation: composing library + experts already in memory (median of 5); load: first read of their "
          "files from disk with sha256 checks (0 when an earlier query loaded them)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pool_builder.pool.loader import Pool
    from pool_builder.report import format_table, pct

    pool = Pool.open(args.pool)
    pool.verify()
    meta = pool.meta
    if args.json:
        print(json.dumps(meta.to_json(), indent=2, sort_keys=True))
        return 0
    print(f"pool {meta.pool_id} ({meta.dataset.name}, {len(meta.dataset.class_names)} classes, "
          f"input {meta.dataset.input_shape}), created {meta.created}; all checksums verified")
    rows = [["oracle", "all", meta.oracle.parameters, _size(pool.dir / meta.oracle.file),
             pct(meta.oracle.metrics.get("test_accuracy", float("nan")))],
            ["library", "all", meta.library.parameters, _size(pool.dir / meta.library.file),
             pct(meta.library.metrics.get("student_test_accuracy", float("nan")))]]
    for task, e in meta.experts.items():
        names = ", ".join(meta.dataset.class_names[i] for i in e.class_ids)
        rows.append([f"expert {task}", names, e.parameters, _size(pool.dir / e.file), pct(e.metrics["accuracy"])])
    print(format_table(["part", "classes", "params", "bytes", "test accuracy"], rows))
    if meta.teachers:
        print(_teacher_table(meta))
    return 0


def _teacher_table(meta: Any) -> str:
    """Each teacher and the fused ensemble: size and accuracy on the validation share and the test images."""
    from pool_builder.report import format_table, pct

    arch = meta.oracle.architecture
    weights = arch.get("weights") or [None] * len(meta.teachers)
    rows = [[name, e.parameters, "-" if w is None else f"{w:.3f}", pct(e.metrics["val_accuracy"]),
             pct(e.metrics["test_accuracy"])] for (name, e), w in zip(meta.teachers.items(), weights)]
    rows.append([f"ensemble ({arch.get('fusion')})", meta.oracle.parameters, "", pct(meta.oracle.metrics["val_accuracy"]),
                 pct(meta.oracle.metrics["test_accuracy"])])
    return format_table(["teacher", "params", "weight", "val accuracy", "test accuracy"], rows)


def _size(path: Path) -> str:
    return f"{path.stat().st_size:,}"


COMMANDS = {"build": cmd_build, "query": cmd_query, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    missing = missing_extra("pool-builder", "builder", ("torch", "tqdm"))
    if missing is not None:
        return missing
    return run_command("pool-builder", COMMANDS[args.command], args, errors=(PoolBuilderError, OSError),
                       interrupted="interrupted; run the same command again to resume")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
