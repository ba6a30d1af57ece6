"""Progressive experts (B-DISTIL): accuracy-latency curve on the device vs single-stage experts, TFLite int8, 1 thread.

Builds the progressive experts of an existing pool (same oracle, library and
caches, hard-linked; only the experts train: S stages of width W each),
exports both pools to TFLite int8 (per-fragment latencies measured), then per
demo query measures on this machine at batch 1 and one interpreter thread:
accuracy and p50 latency after 1..S stages, the single-stage experts of about
the same size, early exit as an option, and whether ``--budget-ms`` budgets
hold.  Writes ``<out>/progressive/`` (result.json, report.md, PNG; the built
pool and fragments stay there and are reused by a rerun).

    python benchmarks/progressive.py --pool runs/demo/pool --out runs/bench --quick
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchArgumentParser, BenchError, Headline, SectionConfig,  # noqa: E402
                               describe_machine, figure_links, machine, markdown_table, print_report,
                               profile_settings, pyplot, render_section, require_pool, run_main, save_figure,
                               section_parser, share_files)
from benchmarks.scale_ablation import DEFAULT_QUERIES, SHARED  # noqa: E402
from edge_runtime.bench import summarize  # noqa: E402
from edge_runtime.runners import native_info_muted  # noqa: E402
from edge_runtime.runtime import Runtime  # noqa: E402

SECTION = "progressive"
FORMAT, PRECISION, THREADS = "tflite", "int8", 1


@dataclass(frozen=True)
class ProgressiveConfig(SectionConfig):
    """The progressive experts to build and how long to time each configuration."""

    stages: int = 3
    stage_width: float = 0.125
    stage_epochs: int = 3
    queries: tuple[str, ...] = DEFAULT_QUERIES
    early_exit: float = 0.9
    rounds: int = 300  # batch-1 calls timed per configuration (over different held-out images)
    threads: int | None = None  # torch threads while building

    def __post_init__(self) -> None:
        if self.stages < 2:
            raise BenchError(f"a progressive expert needs at least 2 stages, got {self.stages}")
        if not 0 < self.stage_width <= 1:
            raise BenchError(f"stage width must be in (0, 1], got {self.stage_width}")
        if not 0 < self.early_exit <= 1:
            raise BenchError(f"early exit threshold must be in (0, 1], got {self.early_exit}")
        if self.rounds < 10:
            raise BenchError(f"rounds must be >= 10, got {self.rounds}")


BUDGET_P50 = 1.1  # p50 of a whole predict call may exceed its budget by this factor (noise, not a planning gap)

PROFILES: dict[str, dict[str, Any]] = {
    # ~5 min on 2 cores with the quick pool: 12 stages of 3 epochs, two int8 exports, ~40 timed configurations
    "quick": dict(stage_epochs=3, rounds=300),
    "full": dict(stage_epochs=5, rounds=1000),
}


def progressive_pool(src: Path, cfg: ProgressiveConfig, log: Callable[[str], None]) -> Path:
    """``src``'s oracle, library and caches with progressive experts (built here unless done earlier)."""
    from pool_builder.build import BuildConfig, build_pool
    from pool_builder.pool.loader import Pool

    settings = dict(Pool.open(src).meta.build["settings"])
    out = Path(cfg.out) / SECTION / "pool"
    share_files(src, out, SHARED)
    build = replace(BuildConfig(**{**settings, "out": str(out)}), expert_stages=cfg.stages,
                    stage_width=cfg.stage_width, expert_epochs=cfg.stage_epochs, threads=cfg.threads)
    build_pool(build, log=log, show_progress=False)
    return out


def export(pool: Path, out: Path, log: Callable[[str], None]) -> Path:
    """TFLite int8 fragments with measured latencies (reused when ``out`` already holds this pool's)."""
    import json

    from converters.export import ExportConfig, export_fragments

    try:
        if json.loads((out / "manifest.json").read_text())["pool_id"] == json.loads(
                (pool / "pool.json").read_text())["pool_id"]:
            return out
    except (OSError, ValueError, KeyError):
        pass
    export_fragments(ExportConfig(pool=str(pool), out=str(out), formats=(FORMAT,), precisions=(PRECISION,),
                                  overwrite=True, latency="always", check_tflite_runtime=False), log=log)
    return out


def _open(bundle: Path, query: str, **kwargs: Any) -> Runtime:
    with native_info_muted():
        return Runtime.open(bundle, query, "auto", PRECISION, num_threads=THREADS, **kwargs)


def measure(runtime: Runtime, images: np.ndarray, labels: np.ndarray, rounds: int) -> dict[str, Any]:
    """Accuracy on the query's held-out images; latency of ``predict`` at batch 1 over ``rounds`` of them."""
    encoded = runtime.encode(images, "NHWC")
    predicted = runtime.prediction(runtime.logits_from_encoded(encoded)).class_ids
    stages_run = list(runtime.composer.stages_run) if runtime.composer is not None else None
    for i in range(10):
        runtime.predict(images[i:i + 1], "NHWC")
    samples = []
    for i in range(rounds):  # what a caller waits for: preprocessing, fragments, softmax
        one = images[i % len(images):i % len(images) + 1]
        start = time.perf_counter()
        runtime.predict(one, "NHWC")
        samples.append(time.perf_counter() - start)
    latency = summarize(samples)
    latency["p95"] = round(float(np.percentile(np.asarray(samples) * 1000.0, 95)), 4)
    row = {"accuracy": float(np.mean(predicted == labels)), "latency_ms": latency, "images": int(len(labels))}
    if runtime.plan is not None:
        row["plan"] = runtime.plan.to_json()
    if stages_run is not None and runtime.composer.early_exit is not None:
        row["mean_stages_run"] = float(np.mean(stages_run))
    return row


def run(cfg: ProgressiveConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from pool_builder.pool.evaluate import held_out_split
    from pool_builder.pool.loader import Pool

    src = Path(cfg.pool)
    base = Pool.open(src)
    if base.meta.build["settings"].get("expert_stages", 1) != 1:
        raise BenchError(f"{src} already has progressive experts; give the single-stage pool to compare with")
    for query in cfg.queries:
        base.hierarchy.resolve_query(query)
    host = machine()
    started = time.perf_counter()
    prog_dir = progressive_pool(src, cfg, log)
    build_s = round(time.perf_counter() - started, 1)
    t0 = time.perf_counter()
    single_bundle = export(src, Path(cfg.out) / SECTION / "fragments_single", log)
    prog_bundle = export(prog_dir, Path(cfg.out) / SECTION / "fragments_progressive", log)
    export_s = round(time.perf_counter() - t0, 1)
    prog = Pool.open(prog_dir)
    split = held_out_split(base)
    results = []
    for query in cfg.queries:
        names = base.hierarchy.resolve_query(query)
        class_ids = [c for t in names for c in base.hierarchy.class_ids(t)]
        mask = np.isin(split.labels, class_ids)
        images, labels = split.images[mask], split.labels[mask]
        row: dict[str, Any] = {"query": query, "images": int(mask.sum())}
        row["single"] = measure(_open(single_bundle, query), images, labels, cfg.rounds)
        row["single"]["parameters"] = sum(base.meta.experts[t].parameters for t in names)
        row["stages"] = []
        for k in range(1, cfg.stages + 1):
            r = measure(_open(prog_bundle, query, stages=k), images, labels, cfg.rounds)
            r["parameters"] = sum(prog.meta.experts[t].metrics["stages"][k - 1]["parameters"] for t in names)
            row["stages"].append(r)
        row["early_exit"] = measure(_open(prog_bundle, query, early_exit=cfg.early_exit), images, labels, cfg.rounds)
        # budgets from a plan that counts the overhead measured at open (preprocessing, softmax, glue):
        # the minimum (library + stage 1 of each expert), halfway, and every stage
        full_plan = _open(prog_bundle, query, budget_ms=1e9).plan.to_json()
        lat = full_plan["latencies_ms"]
        minimum = (full_plan["overhead_fixed_ms"] + lat[f"library.{FORMAT}.{PRECISION}"]
                   + full_plan["overhead_per_call_ms"] * (1 + len(names))
                   + sum(lat[f"expert.{t}.stage1.{FORMAT}.{PRECISION}"] for t in names))
        budgets = sorted({round(minimum + f * (full_plan["predicted_ms"] - minimum), 4) for f in (0.0, 0.5, 1.0)})
        row["budgets"] = []
        for budget in budgets:
            r = measure(_open(prog_bundle, query, budget_ms=budget), images, labels, cfg.rounds)
            r["budget_ms"] = budget
            r["p50_over_budget"] = r["latency_ms"]["p50"] / budget
            r["p95_over_budget"] = r["latency_ms"]["p95"] / budget
            row["budgets"].append(r)
        row["library_ms"] = lat[f"library.{FORMAT}.{PRECISION}"]
        results.append(row)
        log(f"{query:<28} single {row['single']['accuracy'] * 100:.2f}% {row['single']['latency_ms']['p50']:.3f} ms; "
            + ", ".join(f"{k + 1} stage(s) {s['accuracy'] * 100:.2f}% {s['latency_ms']['p50']:.3f} ms"
                        for k, s in enumerate(row["stages"])))
    return {"config": asdict(cfg), "pool_id": base.meta.pool_id, "progressive_pool_id": prog.meta.pool_id,
            "single_expert_width": base.meta.build["settings"]["expert_width"],
            "single_expert_epochs": base.meta.build["settings"]["expert_epochs"],
            "machine": asdict(host), "build_s": build_s, "export_s": export_s,
            "seconds": round(time.perf_counter() - started, 1), "results": results}


# --------------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def headlines(result: dict[str, Any]) -> list[Headline]:
    rows = result["results"]
    widest = max(rows, key=lambda r: len(r["query"].split(",")))
    full = widest["stages"][-1]
    losses = [100 * (r["single"]["accuracy"] - r["stages"][-1]["accuracy"]) for r in rows]
    steps = [s2["latency_ms"]["p50"] - s1["latency_ms"]["p50"] for r in rows
             for s1, s2 in zip(r["stages"], r["stages"][1:])]
    ratios = [b["p50_over_budget"] for r in rows for b in r["budgets"]]
    tails = [b["latency_ms"]["p95"] / b["budget_ms"] for r in rows for b in r["budgets"]]
    return [
        Headline(f"{widest['query']}: accuracy after 1..{len(widest['stages'])} stages vs single-stage",
                 " / ".join(_pct(s["accuracy"]) for s in widest["stages"]) + f" vs {_pct(widest['single']['accuracy'])}",
                 "-", None, round(100 * full["accuracy"], 2)),
        Headline("accuracy given up by all stages vs the single-stage experts (points, per query)",
                 f"{min(losses):+.2f} .. {max(losses):+.2f}", "-", None, round(max(losses), 2)),
        Headline("p50 cost of one more stage of every expert (TFLite int8, 1 thread, batch 1)",
                 f"{min(steps):+.3f} .. {max(steps):+.3f} ms", "> 0 (stages are not free)", min(steps) > 0,
                 round(max(steps), 4)),
        Headline("--budget-ms respected (whole predict call, overhead planned): p50 / budget",
                 f"{min(ratios):.2f} .. {max(ratios):.2f}", f"<= {BUDGET_P50}", max(ratios) <= BUDGET_P50,
                 round(max(ratios), 3)),
        Headline("--budget-ms tail: p95 / budget", f"{min(tails):.2f} .. {max(tails):.2f}", "-", None,
                 round(max(tails), 3)),
    ]


def markdown(result: dict[str, Any], plots: list[str]) -> str:
    cfg = result["config"]
    rows = []
    for r in result["results"]:
        s = r["single"]
        rows.append([r["query"], f"single-stage (width {result['single_expert_width']:g})", f"{s['parameters']:,}",
                     _pct(s["accuracy"]), f"{s['latency_ms']['p50']:.3f}", ""])
        for k, st in enumerate(r["stages"], start=1):
            rows.append(["", f"progressive, {k} of {cfg['stages']} stage(s)", f"{st['parameters']:,}",
                         _pct(st["accuracy"]), f"{st['latency_ms']['p50']:.3f}", ""])
        e = r["early_exit"]
        rows.append(["", f"progressive, early exit at p >= {cfg['early_exit']:g}", "", _pct(e["accuracy"]),
                     f"{e['latency_ms']['p50']:.3f}", f"{e['mean_stages_run'] / len(r['query'].split(',')):.2f} "
                                                      "stages per expert"])
    budget_rows = [[r["query"], f"{b['budget_ms']:.3f}", ", ".join(f"{t} {k}" for t, k in b["plan"]["stages"].items()),
                    f"{b['plan']['predicted_ms']:.3f}",
                    f"{b['plan'].get('overhead_fixed_ms', 0):.3f} + {b['plan'].get('overhead_per_call_ms', 0):.3f}/call",
                    f"{b['latency_ms']['p50']:.3f}", f"{b['p50_over_budget']:.2f}", f"{b['latency_ms']['p95']:.3f}",
                    f"{b['latency_ms']['p95'] / b['budget_ms']:.2f}", _pct(b["accuracy"])]
                   for r in result["results"] for b in r["budgets"]]
    return "\n".join([
        "# Progressive experts: accuracy vs latency on the device", "",
        f"Experts of pool `{result['pool_id']}` rebuilt as {cfg['stages']} stages of width {cfg['stage_width']:g} "
        f"({cfg['stage_epochs']} epochs each, distilled one after another on the running sum; same oracle, library "
        f"and caches) vs the pool's single-stage experts (width {result['single_expert_width']:g}, "
        f"{result['single_expert_epochs']} epochs). TFLite int8, {THREADS} interpreter thread, batch 1, "
        f"p50 over {cfg['rounds']} calls of `predict` on held-out images (preprocessing and softmax included); "
        f"accuracy on every held-out image of the query's classes. {describe_machine(result['machine'])}. "
        f"Build {result['build_s']:.0f} s, export {result['export_s']:.0f} s, whole run {result['seconds']:.0f} s.", "",
        markdown_table(["query", "experts", "expert params", "accuracy", "p50 ms", "note"], rows), "",
        "`edge-runtime run --budget-ms MS`: stages chosen from the manifest's per-fragment latencies (measured at "
        "export) plus the overhead the runtime measures when it opens (preprocessing and softmax once per call, "
        "glue per fragment call); budgets at the minimum (overhead + library + stage 1 of each expert), halfway, and "
        f"all stages. Target: p50 <= {BUDGET_P50} x budget; p95 is shown, not judged:", "",
        markdown_table(["query", "budget ms", "stages run", "planned ms", "overhead ms", "p50 ms", "p50 / budget",
                        "p95 ms", "p95 / budget", "accuracy"], budget_rows), "",
        *figure_links(plots), ""])


def plot(result: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    rows = result["results"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        xs = [s["latency_ms"]["p50"] for s in r["stages"]]
        ys = [100 * s["accuracy"] for s in r["stages"]]
        ax.plot(xs, ys, marker="o", label="progressive (1..S stages)")
        for k, (x, y) in enumerate(zip(xs, ys), start=1):
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.plot([r["single"]["latency_ms"]["p50"]], [100 * r["single"]["accuracy"]], marker="s", linestyle="",
                label="single-stage")
        ax.plot([r["early_exit"]["latency_ms"]["p50"]], [100 * r["early_exit"]["accuracy"]], marker="^",
                linestyle="", label=f"early exit p>={result['config']['early_exit']:g}")
        ax.set_title(r["query"], fontsize=9)
        ax.set_xlabel("p50 ms (TFLite int8, 1 thread)")
    axes[0][0].set_ylabel("accuracy %")
    axes[0][0].legend(fontsize=7)
    return [save_figure(fig, out / "accuracy_latency.png")]


def render(result: dict[str, Any], out_root: Path) -> Path:
    return render_section(out_root / SECTION, result, plot, markdown, headlines)


def parser() -> BenchArgumentParser:
    ap = section_parser("progressive.py", __doc__, SECTION, "3 epochs per stage, 300 timed calls (default: 5, 1000)")
    ap.add_argument("--stages", type=int)
    ap.add_argument("--stage-width", type=float)
    ap.add_argument("--stage-epochs", type=int)
    ap.add_argument("--early-exit", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--queries", help="queries separated by ';'")
    ap.add_argument("--threads", type=int, help="torch threads while building")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = profile_settings(args, PROFILES, ProgressiveConfig, ("queries",))
    if args.queries is not None:
        settings["queries"] = tuple(q for q in args.queries.split(";") if q.strip())
    cfg = ProgressiveConfig(**settings)
    require_pool(cfg.pool)
    return print_report(render(run(cfg, lambda m: print(m, file=sys.stderr, flush=True)), Path(cfg.out)))


if __name__ == "__main__":
    sys.exit(run_main(main))
