"""Cross-expert error share with L_soft only vs L_soft + alpha * L_scale (paper, Table 6), alpha sweep.

Re-extracts every expert of an existing pool for each alpha from the *same*
oracle, library and cached teacher outputs (hard links, no retraining of
either; the pool's own alpha reuses its experts), then scores composite
queries: accuracy, the oracle restricted to the same classes, and the share of
errors whose predicted class belongs to another expert than the true class.
Results are reported per query.  A one-class expert (Fashion-MNIST's "bags")
has a single logit, so its scale against the others is all L_scale can act on
and its errors are cross-expert by construction; queries containing one are
marked, and the headline is a two-task query without one.
Writes ``<out>/scale_ablation/`` (result.json, report.md, PNG plots; the
re-extracted pools stay in ``alpha_<a>/`` there and are reused by a rerun).

    python benchmarks/scale_ablation.py --pool runs/demo/pool --out runs/bench --quick      # alpha 0, 0.3, 1
    python benchmarks/scale_ablation.py --pool runs/full/pool --out runs/full/bench --alphas 0,0.3
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchArgumentParser, BenchError, Headline, describe_machine,  # noqa: E402
                               figure_links, floats, machine, markdown_table, print_report,
                               profile_settings, pyplot, SectionConfig, render_section, require_pool,
                               run_main, save_figure, section_parser, share_files)
from pool_builder.build import BuildConfig, build_pool  # noqa: E402
from pool_builder.pool.evaluate import Evaluator, held_out_split  # noqa: E402
from pool_builder.pool.loader import Pool  # noqa: E402

SECTION = "scale_ablation"
SHARED = ("oracle.pt", "oracle.torchscript.pt", "library.pt", "stages/oracle.json", "stages/library.json",
          "cache/oracle_logits.npy", "cache/oracle_logits.json", "cache/library_features.npy",
          "cache/library_features.json")
DEFAULT_QUERIES = ("footwear,tops", "bottoms,bags", "tops,bottoms,footwear", "tops,footwear,bottoms,bags")


@dataclass(frozen=True)
class AblationConfig(SectionConfig):
    """The alphas to compare; alpha 0 is L_soft only."""

    alphas: tuple[float, ...] = (0.0, 0.3)
    queries: tuple[str, ...] = DEFAULT_QUERIES
    threads: int | None = None

    def __post_init__(self) -> None:
        if any(a < 0 for a in self.alphas):
            raise BenchError(f"alphas must be >= 0, got {list(self.alphas)}")
        if 0.0 not in self.alphas or len(self.alphas) < 2:
            raise BenchError("the ablation needs alpha 0 (L_soft only) and at least one alpha > 0")


PROFILES: dict[str, dict[str, Any]] = {
    # ~2.5 min on 2 cores with the quick pool: two re-extractions of four experts (0.3 is the pool's own)
    "quick": dict(alphas=(0.0, 0.3, 1.0)),
    "full": dict(alphas=(0.0, 0.1, 0.3, 1.0, 3.0)),
}


def pool_for(alpha: float, src: Path, base: Pool, cfg: AblationConfig) -> Path:
    """The pool whose experts were extracted with ``alpha`` (built here unless it is the source pool)."""
    settings = dict(base.meta.build["settings"])
    if alpha == settings["alpha"]:
        return src
    pool_dir = Path(cfg.out) / SECTION / f"alpha_{alpha:g}"
    share_files(src, pool_dir, SHARED)
    build = replace(BuildConfig(**{**settings, "out": str(pool_dir)}), alpha=alpha, threads=cfg.threads)
    build_pool(build, show_progress=False)
    return pool_dir


def run(cfg: AblationConfig) -> dict[str, Any]:
    src = Path(cfg.pool)
    base = Pool.open(src)
    for query in cfg.queries:
        base.hierarchy.resolve_query(query)
    host = machine()
    started = time.perf_counter()
    results, experts = [], {}
    for alpha in cfg.alphas:
        t0 = time.perf_counter()
        pool = Pool.open(pool_for(alpha, src, base, cfg))
        key = f"{alpha:g}"
        experts[key] = {"seconds": round(time.perf_counter() - t0, 1), "reused": pool.dir == src,
                        "mean_abs_logit_gap": {t: e.metrics.get("mean_abs_logit_gap") for t, e in
                                               pool.meta.experts.items()}}
        evaluator = Evaluator(pool, held_out_split(pool))
        for query in cfg.queries:
            results.append({"alpha": alpha, **evaluator.query(query).to_json()})
        print(f"alpha {key}: experts {'reused' if experts[key]['reused'] else 're-extracted'} "
              f"in {experts[key]['seconds']:.0f} s", file=sys.stderr, flush=True)
    one_class = sorted(t for t in base.meta.experts if len(base.hierarchy.class_ids(t)) == 1)
    return {"config": asdict(cfg), "pool_id": base.meta.pool_id, "pool_alpha": base.meta.build["settings"]["alpha"],
            "one_class_tasks": one_class, "machine": asdict(host), "seconds": round(time.perf_counter() - started, 1), "experts": experts,
            "results": results}


# --------------------------------------------------------------------------- report

def _by_query(result: dict[str, Any]) -> dict[str, dict[float, dict[str, Any]]]:
    table: dict[str, dict[float, dict[str, Any]]] = {}
    for r in result["results"]:
        table.setdefault(",".join(r["tasks"]), {})[r["alpha"]] = r
    return table


def one_class_in(query: str, result: dict[str, Any]) -> list[str]:
    """The query's tasks that are one-class experts (marked in the report, avoided for the headline)."""
    return [t for t in query.split(",") if t in result.get("one_class_tasks", [])]


def headline_query(table: dict[str, Any], result: dict[str, Any]) -> str:
    """A two-task query without a one-class expert; else the widest without one; else the widest."""
    clean = [q for q in table if not one_class_in(q, result)]
    two = [q for q in clean if len(q.split(",")) == 2]
    if two:
        return two[0]
    return max(clean or list(table), key=lambda q: len(q.split(",")))


def headlines(result: dict[str, Any]) -> list[Headline]:
    alphas = result["config"]["alphas"]
    ref = result["pool_alpha"] if result["pool_alpha"] in alphas else max(alphas)
    table = _by_query(result)
    widest = headline_query(table, result)
    soft, scaled = table[widest][0.0], table[widest][ref]
    lowered = sum(rows[ref]["cross_expert_error_share"] < rows[0.0]["cross_expert_error_share"]
                  for rows in table.values())
    return [
        Headline(f"cross-expert share of errors, {widest}: L_soft only vs alpha = {ref:g}",
                 f"{100 * soft['cross_expert_error_share']:.1f} % -> {100 * scaled['cross_expert_error_share']:.1f} %",
                 "lower with L_scale", scaled["cross_expert_error_share"] < soft["cross_expert_error_share"],
                 round(100 * scaled["cross_expert_error_share"], 2)),
        Headline(f"PoE accuracy, {widest}: L_soft only vs alpha = {ref:g}",
                 f"{100 * soft['poe_accuracy']:.2f} % -> {100 * scaled['poe_accuracy']:.2f} %", "-", None,
                 round(100 * scaled["poe_accuracy"], 2)),
        Headline(f"queries whose cross-expert share L_scale (alpha = {ref:g}) lowers (per query in the section)",
                 f"{lowered} of {len(table)}", "-", None, float(lowered)),
    ]


def markdown(result: dict[str, Any], plots: list[str]) -> str:
    alphas = result["config"]["alphas"]
    rows = []
    for query, by_alpha in _by_query(result).items():
        for alpha in alphas:
            r = by_alpha[alpha]
            marked = one_class_in(query, result)
            rows.append([query + (f" (one-class: {', '.join(marked)})" if marked and alpha == alphas[0] else ""),
                         f"{alpha:g}" + (" (L_soft only)" if alpha == 0 else ""),
                         f"{100 * r['poe_accuracy']:.2f} %", f"{100 * r['oracle_accuracy']:.2f} %",
                         f"{r['gap_points']:+.2f}", r["errors"], r["cross_expert_errors"],
                         f"{100 * r['cross_expert_error_share']:.1f} %"])
    gaps = [[a, "reused (the pool's)" if e["reused"] else f"{e['seconds']:.0f} s",
             *[f"{g:.2f}" for g in e["mean_abs_logit_gap"].values()]] for a, e in result["experts"].items()]
    tasks = list(next(iter(result["experts"].values()))["mean_abs_logit_gap"])
    return "\n".join([
        "# L_scale ablation: cross-expert errors (paper, Table 6) and alpha sweep", "",
        f"Pool `{result['pool_id']}` (built with alpha = {result['pool_alpha']:g}); experts re-extracted per alpha "
        f"from the same oracle, library and caches; {describe_machine(result['machine'])}. "
        f"Whole run {result['seconds']:.0f} s.", "",
        "A cross-expert error is a mistake whose predicted class belongs to another expert than the true class. "
        "Queries marked *one-class* contain an expert with a single class: its errors are cross-expert by "
        "construction and its one logit's scale is all L_scale acts on, so the summary's headline is the two-task "
        f"query `{headline_query(_by_query(result), result)}` (no one-class expert).", "",
        markdown_table(["query", "alpha", "PoE acc", "oracle (restricted)", "gap (points)", "errors",
                        "cross-expert", "cross-expert share"], rows), "",
        "Mean |expert logit - oracle logit| on each expert's test images (what L_scale pulls together):", "",
        markdown_table(["alpha", "experts built in", *tasks], gaps), "",
        *figure_links(plots), ""])


def plot(result: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    alphas = result["config"]["alphas"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for query, by_alpha in _by_query(result).items():
        left.plot(range(len(alphas)), [100 * by_alpha[a]["cross_expert_error_share"] for a in alphas], marker="o",
                  label=query)
        right.plot(range(len(alphas)), [100 * by_alpha[a]["poe_accuracy"] for a in alphas], marker="o", label=query)
    for ax, title in ((left, "cross-expert share of errors %"), (right, "PoE accuracy %")):
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha (0 = L_soft only)")
        ax.set_title(title, fontsize=10)
    right.legend(fontsize=7)
    return [save_figure(fig, out / "scale_ablation.png")]


def render(result: dict[str, Any], out_root: Path) -> Path:
    return render_section(out_root / SECTION, result, plot, markdown, headlines)


def parser() -> BenchArgumentParser:
    ap = section_parser("scale_ablation.py", __doc__, SECTION, "alphas 0, 0.3, 1 (default: 0, 0.1, 0.3, 1, 3)")
    ap.add_argument("--alphas", help="comma-separated, must include 0")
    ap.add_argument("--queries", help="queries separated by ';'")
    ap.add_argument("--threads", type=int)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = profile_settings(args, PROFILES, AblationConfig, ("alphas", "queries"))
    if args.alphas is not None:
        settings["alphas"] = tuple(floats(args.alphas, "--alphas"))
    if args.queries is not None:
        settings["queries"] = tuple(q for q in args.queries.split(";") if q.strip())
    cfg = AblationConfig(**settings)
    require_pool(cfg.pool)
    return print_report(render(run(cfg), Path(cfg.out)))


if __name__ == "__main__":
    sys.exit(run_main(main))
