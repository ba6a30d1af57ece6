"""Query vs training: PoE's train-free composition against per-query baselines trained on the query's classes.

For each composite query, PoE's consolidation time (modules in memory, and
cold: pool.json, sha256 checks and weights read from disk) and accuracy on the
query's test images, against three baselines with the *same* architecture
(library + the query's expert heads) trained on the query's training images
with pool_builder's loops (``benchmarks/baselines.py``): from scratch, KD and
CKD from the oracle.  Each baseline is evaluated several times per epoch; the
report gives its time to reach PoE's accuracy (or the best it reached), its
final accuracy, and the ratio of that time to PoE's query time (the paper's
claim: realtime vs minutes).  Writes ``<out>/query_vs_training/`` (result.json,
report.md, PNG plots).

    python benchmarks/query_vs_training.py --pool runs/demo/pool --out runs/bench --quick
    python benchmarks/query_vs_training.py --pool runs/full/pool --out runs/full/bench      # full schedule
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.baselines import BASELINES, Distillation, QueryData, same_architecture, train_baseline  # noqa: E402
from benchmarks.common import (BenchArgumentParser, BenchError, Headline, choose, describe_machine,  # noqa: E402
                               figure_links, machine, markdown_table, print_report, profile_settings,
                               pyplot, ratio_text, SectionConfig, render_section, require_pool,
                               run_main, save_figure, section_parser)
from pool_builder.stages.cache import open_cache, read_record  # noqa: E402
from pool_builder.pool.consolidate import consolidate  # noqa: E402
from pool_builder.data.datasets import Dataset, reload_dataset  # noqa: E402
from pool_builder.pool.evaluate import Evaluator, predict_logits  # noqa: E402
from pool_builder.models.wrn import count_parameters  # noqa: E402
from pool_builder.pool.loader import Pool  # noqa: E402
from pool_builder.distillation.training import TrainConfig  # noqa: E402
from pool_builder.stages.engine import seed_stage  # noqa: E402

SECTION = "query_vs_training"
TARGET_RATIO = 10_000.0


@dataclass(frozen=True)
class QueryBenchConfig(SectionConfig):
    """What one run measures; ``PROFILES`` hold the quick and full defaults."""

    data_dir: str | None = None
    queries: tuple[str, ...] = ()
    baselines: tuple[str, ...] = tuple(BASELINES)
    epochs: int = 2
    evals_per_epoch: int = 2
    repeats: int = 21  # consolidations timed per query (median reported)
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.evals_per_epoch < 1 or self.repeats < 1 or self.threads < 1:
            raise BenchError("epochs, evals per epoch, repeats and threads must be >= 1")
        if len(self.queries) < 1:
            raise BenchError("name at least one query")


PROFILES: dict[str, dict[str, Any]] = {
    # ~4 min on 2 cores with the quick pool: five small composite queries, two epochs per baseline
    "quick": dict(queries=("bottoms,bags", "footwear,bags", "footwear,bottoms", "footwear,bottoms,bags",
                           "footwear,tops"), epochs=2, evals_per_epoch=2),
    "full": dict(queries=("footwear,tops", "bottoms,bags", "tops,bottoms,footwear", "tops,footwear,bottoms,bags",
                          "footwear,bags", "tops,bottoms"), epochs=10, evals_per_epoch=2),
}


def pool_dataset(pool: Pool, data_dir: str | None) -> Dataset:
    """The training and test images the pool was built and evaluated on (same limits and seed)."""
    settings = pool.meta.build.get("settings", {})
    full = reload_dataset(pool.meta.dataset.name, settings, data_dir)
    if tuple(full.class_names) != tuple(pool.meta.dataset.class_names):
        raise BenchError(f"data set classes {list(full.class_names)} differ from the pool's "
                               f"{pool.meta.dataset.class_names}")
    return full.limited(settings.get("train_limit"), settings.get("test_limit"), int(settings.get("seed", 0)))


def train_oracle_logits(pool: Pool, data: Dataset) -> np.ndarray:
    """The oracle on the training images: the pool's verified cache when it fits, else one pass of the oracle."""
    path = pool.dir / "cache" / "oracle_logits.npy"
    record = read_record(path)
    cached = open_cache(path, record.fingerprint) if record else None
    if cached is not None and cached.shape == (len(data.train), len(data.class_names)):
        return np.asarray(cached, dtype=np.float32)
    return predict_logits(pool.oracle(), data.train.images, pool.normalizer)


def cold_query_ms(pool_dir: Path, tasks: Sequence[str], repeats: int = 3) -> float:
    """Open the pool afresh and compose: pool.json, sha256 of every file used, weights from disk."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        consolidate(Pool.open(pool_dir), tasks)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fastest(baselines: dict[str, dict[str, Any]], poe_s: float) -> dict[str, Any]:
    """The baseline that reached PoE's accuracy soonest, and PoE's speed-up over it.

    When none reached it, every baseline would need more than its whole run,
    so the shortest whole run over PoE's time is a lower bound of the ratio.
    """
    reached = {n: b for n, b in baselines.items() if b["time_to_poe_s"] is not None}
    if reached:
        name = min(reached, key=lambda n: reached[n]["time_to_poe_s"])
        seconds = reached[name]["time_to_poe_s"]
        return {"baseline": name, "seconds": seconds, "ratio": seconds / poe_s, "lower_bound": False}
    seconds = min(b["train_s"] for b in baselines.values())
    return {"baseline": None, "seconds": seconds, "ratio": seconds / poe_s, "lower_bound": True}


def run_query(index: int, query: str, pool: Pool, data: Dataset, oracle_train: np.ndarray, evaluator: Evaluator,
              cfg: QueryBenchConfig) -> dict[str, Any]:
    """PoE and every baseline on one query."""
    hierarchy, settings = pool.hierarchy, pool.meta.build["settings"]
    tasks = hierarchy.resolve_query(query)
    report = evaluator.query(tasks, repeats=cfg.repeats)
    union = hierarchy.union_class_ids(tasks)
    train_rows = np.flatnonzero(np.isin(data.train.labels, union))
    test_rows = np.flatnonzero(np.isin(data.test.labels, union))
    qdata = QueryData(union, data.train.images[train_rows], data.train.labels[train_rows], oracle_train[train_rows],
                      data.test.images[test_rows], data.test.labels[test_rows], pool.normalizer)
    poe = {"accuracy": report.poe_accuracy, "oracle_accuracy": report.oracle_accuracy,
           "consolidation_ms": report.consolidation_ms, "cold_query_ms": cold_query_ms(pool.dir, tasks),
           "parameters": report.poe_parameters, "cross_expert_error_share": report.cross_expert_error_share}
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=int(settings["batch_size"]), lr=float(settings["lr"]),
                            seed=cfg.seed + index)
    distill = Distillation(float(settings["temperature"]), float(settings["alpha"]))
    student = pool.library().cfg
    widths = {t: float(pool.meta.experts[t].architecture["width_factor"]) for t in tasks}
    baselines = {}
    for name in cfg.baselines:
        seed_stage(cfg.seed, index)  # every baseline of a query starts from the same weights
        model = same_architecture(student, {t: hierarchy.class_ids(t) for t in tasks}, widths)
        curve = train_baseline(name, model, qdata, train_cfg, distill, cfg.evals_per_epoch)
        reach, before = curve.time_to_reach(report.poe_accuracy)
        accs = [p["accuracy"] for p in curve.points]
        baselines[name] = {"label": BASELINES[name][0], "parameters": count_parameters(model),
                           "final_accuracy": accs[-1], "best_accuracy": max(accs),
                           "train_s": curve.points[-1]["train_s"], "cpu_s": curve.points[-1]["cpu_s"],
                           "time_to_poe_s": reach,
                           "not_yet_at_s": before if reach is not None else None, "curve": curve.points}
        _log(f"  {query:<24} {name:<8} final {100 * accs[-1]:6.2f}% (PoE {100 * report.poe_accuracy:.2f}%), "
             f"trained {curve.points[-1]['train_s']:.1f}s, reached PoE's accuracy: "
             + (f"after {reach:.1f}s" if reach is not None else "no"))
    return {"query": query, "tasks": list(tasks), "classes": report.classes, "train_images": len(train_rows),
            "test_images": len(test_rows), "poe": poe, "baselines": baselines,
            "fastest": fastest(baselines, poe["consolidation_ms"] / 1000.0),
            "fastest_cold": fastest(baselines, poe["cold_query_ms"] / 1000.0)}


def run(cfg: QueryBenchConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    pool = Pool.open(cfg.pool)
    for query in cfg.queries:  # every query is checked before anything is trained
        pool.hierarchy.resolve_query(query)
    host = machine()
    started = time.perf_counter()
    data = pool_dataset(pool, cfg.data_dir)
    oracle_train = train_oracle_logits(pool, data)
    evaluator = Evaluator(pool, data.test)
    _log(f"query vs training: pool {pool.meta.pool_id}, {len(cfg.queries)} queries x {len(cfg.baselines)} baselines, "
         f"{cfg.epochs} epochs each")
    queries = [run_query(i, q, pool, data, oracle_train, evaluator, cfg) for i, q in enumerate(cfg.queries)]
    return {"config": asdict(cfg), "pool_id": pool.meta.pool_id, "pool_settings": pool.meta.build["settings"],
            "machine": asdict(host), "load_average_after": list(os.getloadavg()),
            "seconds": round(time.perf_counter() - started, 1), "queries": queries}


# --------------------------------------------------------------------------- report

def headlines(result: dict[str, Any]) -> list[Headline]:
    worst = min(result["queries"], key=lambda q: q["fastest"]["ratio"])
    ratio = worst["fastest"]
    reached = sum(b["time_to_poe_s"] is not None for q in result["queries"] for b in q["baselines"].values())
    total = sum(len(q["baselines"]) for q in result["queries"])
    gaps = [100 * (q["poe"]["accuracy"] - max(b["final_accuracy"] for b in q["baselines"].values()))
            for q in result["queries"]]
    epochs = result["config"]["epochs"]
    return [
        Headline("PoE query time vs fastest baseline reaching PoE's accuracy (worst query)",
                 f"{ratio_text(ratio['ratio'], ratio['lower_bound'])} ({worst['query']})", f">= {TARGET_RATIO:,.0f}x",
                 # a lower bound under the target says nothing either way
                 True if ratio["ratio"] >= TARGET_RATIO else (None if ratio["lower_bound"] else False),
                 round(ratio["ratio"], 1)),
        Headline(f"baselines reaching PoE's accuracy within {epochs} epochs", f"{reached} of {total}", "-", None,
                 float(reached)),
        Headline(f"PoE accuracy minus best baseline's final accuracy ({epochs} epochs)",
                 f"{min(gaps):+.2f} to {max(gaps):+.2f} points", "-", None, round(min(gaps), 2)),
    ]


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def markdown(result: dict[str, Any], plots: list[str]) -> str:
    cfg, m = result["config"], result["machine"]
    summary = []
    for q in result["queries"]:
        f, p = q["fastest"], q["poe"]
        who = f"{f['baseline']}, {f['seconds']:.1f} s" if f["baseline"] else f"none (shortest run {f['seconds']:.1f} s)"
        summary.append([q["query"], len(q["classes"]), f"{q['train_images']:,}", f"{q['test_images']:,}",
                        _pct(p["accuracy"]), _pct(p["oracle_accuracy"]), f"{p['consolidation_ms']:.3f}",
                        f"{p['cold_query_ms']:.1f}", who, ratio_text(f["ratio"], f["lower_bound"]),
                        ratio_text(q["fastest_cold"]["ratio"], q["fastest_cold"]["lower_bound"])])
    detail = []
    for q in result["queries"]:
        for name in cfg["baselines"]:
            b = q["baselines"][name]
            reach = (f"{b['time_to_poe_s']:.1f} s (after {b['not_yet_at_s']:.1f} s: not yet)"
                     if b["time_to_poe_s"] is not None else f"not reached (best {_pct(b['best_accuracy'])})")
            detail.append([q["query"], name, reach, _pct(b["final_accuracy"]), _pct(b["best_accuracy"]),
                           f"{_secs(b['train_s'])} ({_secs(b['cpu_s'])} CPU)", f"{b['parameters']:,}",
                           f"{q['poe']['parameters']:,}"])
    labels = "; ".join(f"`{n}`: {label}" for n, (label, _t) in BASELINES.items() if n in cfg["baselines"])
    return "\n".join([
        "# Query vs training", "",
        f"Pool `{result['pool_id']}` (`{cfg['pool']}`); "
        f"{describe_machine(m, cfg['threads'], result['load_average_after'])}. Whole run {result['seconds']:.0f} s.",
        "",
        f"Baselines ({labels}) have PoE's architecture for the query (library + its expert heads, same parameter "
        f"count) and train on the pool's training images of the query's classes for {cfg['epochs']} epochs "
        f"(batch {result['pool_settings']['batch_size']}, lr {result['pool_settings']['lr']}, cosine schedule), "
        f"evaluated {cfg['evals_per_epoch']} times per epoch on the query's test images. Their times are pure "
        "training: the oracle's logits come precomputed and evaluation stops the clock, both in their favour. "
        f"PoE's time is the median of {cfg['repeats']} consolidations with library and experts in memory; "
        "*cold* also opens the pool, checks sha256 and reads the weights from disk (median of 3).", "",
        markdown_table(["query", "classes", "train imgs", "test imgs", "PoE acc", "oracle (restricted)",
                        "PoE ms", "PoE cold ms", "fastest baseline to PoE acc", "ratio", "ratio (cold)"], summary),
        "", "Per baseline (time to PoE's accuracy: first evaluation at or above it, and the evaluation before):", "",
        markdown_table(["query", "baseline", "time to PoE's accuracy", "final acc", "best acc", "trained",
                        "params", "PoE params"], detail),
        "", *figure_links(plots), ""])


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """Accuracy over training time per query (log time, PoE as a point), and time-to-accuracy bars."""
    plt = pyplot()
    if plt is None:
        return []
    names = list(result["config"]["baselines"])  # the run's order (result.json stores keys sorted)
    return [_curves(plt, result["queries"], names, out / "accuracy_vs_time.png"),
            _bars(plt, result["queries"], names, out / "time_to_accuracy.png")]


def _curves(plt: Any, queries: list[dict[str, Any]], names: list[str], path: Path) -> str:
    cols = min(3, len(queries))
    rows = -(-len(queries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax, q in zip(axes.flat, queries):
        poe = q["poe"]
        for name in names:
            b = q["baselines"][name]
            xs = [max(p["train_s"], 1e-3) for p in b["curve"]]
            ax.plot(xs, [100 * p["accuracy"] for p in b["curve"]], marker="o", ms=3, label=f"baseline: {name}")
        ax.scatter([poe["consolidation_ms"] / 1000.0], [100 * poe["accuracy"]], marker="*", s=140, color="k",
                   zorder=5, label="PoE (consolidation)")
        ax.axhline(100 * poe["accuracy"], color="k", ls="--", lw=0.8, label="PoE accuracy")
        ax.axhline(100 * poe["oracle_accuracy"], color="grey", ls=":", lw=0.8, label="oracle (restricted)")
        ax.set_xscale("log")
        ax.set_title(q["query"], fontsize=10)
        ax.set_xlabel("seconds (training; PoE: consolidation)", fontsize=8)
        ax.set_ylabel("test accuracy %", fontsize=8)
        lowest = min(p["accuracy"] for b in q["baselines"].values() for p in b["curve"])
        ax.set_ylim(max(0.0, 100 * lowest - 5), 101)
    spare = list(axes.flat)[len(queries):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:
        spare[0].legend(handles, labels, loc="center", fontsize=9)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    return save_figure(fig, path)


def _bars(plt: Any, queries: list[dict[str, Any]], names: list[str], path: Path) -> str:
    height = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(queries) + 1.4))
    for i, q in enumerate(queries):
        ax.barh(i, q["poe"]["consolidation_ms"] / 1000.0, height, color="k", label="PoE (consolidation)" if i == 0
                else None)
        for k, name in enumerate(names, 1):
            b = q["baselines"][name]
            reached = b["time_to_poe_s"] is not None
            ax.barh(i + k * height, b["time_to_poe_s"] if reached else b["train_s"], height, color=f"C{k - 1}",
                    hatch=None if reached else "///", alpha=1.0 if reached else 0.45,
                    label=f"baseline: {name}" if i == 0 else None)
    ax.set_yticks([i + height * len(names) / 2 for i in range(len(queries))], [q["query"] for q in queries])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds to reach PoE's accuracy (log); hatched: not reached, whole run shown")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def render(result: dict[str, Any], out_root: Path) -> Path:
    return render_section(out_root / SECTION, result, plot, markdown, headlines)


def parser() -> BenchArgumentParser:
    ap = section_parser("query_vs_training.py", __doc__, SECTION, "the quick profile (default: full)")
    ap.add_argument("--data-dir")
    ap.add_argument("--queries", help="queries separated by ';', e.g. 'footwear,tops;bottoms,bags'")
    ap.add_argument("--baselines", help=f"comma-separated, from: {', '.join(BASELINES)}")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--evals-per-epoch", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int)
    return ap


def config_from_args(args: Any) -> QueryBenchConfig:
    settings = profile_settings(args, PROFILES, QueryBenchConfig, ("queries", "baselines"))
    if args.queries is not None:
        settings["queries"] = tuple(q for q in args.queries.split(";") if q.strip())
    if args.baselines is not None:
        settings["baselines"] = tuple(choose(args.baselines, list(BASELINES), "baseline"))
    return QueryBenchConfig(**settings)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(parser().parse_args(argv))
    require_pool(cfg.pool)
    return print_report(render(run(cfg), Path(cfg.out)))


if __name__ == "__main__":
    sys.exit(run_main(main))
