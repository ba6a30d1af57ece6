"""Build throughput: expert extraction from cached teacher outputs vs the online loop (EDL-Dist's separation).

Builds the same experts twice from one pool's oracle and library, with the same
settings and epochs: the default way (oracle logits and library features
computed once into ``cache/``, experts trained from the memory-mapped cache)
and with ``--online`` (oracle and library re-run on every batch, as the
authors' code does).  Both are ordinary ``build_pool`` runs into fresh pool
directories that share only the finished oracle and library stages, so the
cached mode pays for computing its caches; the modes alternate expert by
expert so that a change in the machine's load reaches both.  Reports
expert-extraction throughput (training images per second, wall and CPU time)
and its ratio, the ratio with the caches' one-time cost counted, and the
accuracy of every expert and of the composite query in both modes.  Writes
``<out>/build_throughput/``.

    python benchmarks/build_throughput.py --pool runs/demo/pool --out runs/bench --quick
    python benchmarks/build_throughput.py --pool runs/demo/pool --out runs/bench    # all tasks, the pool's epochs
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchArgumentParser, BenchError, Headline, choose, describe_machine,  # noqa: E402
                               figure_links, machine, markdown_table, print_report, profile_settings,
                               pyplot, ratio_text, SectionConfig, render_section, require_pool,
                               run_main, save_figure, section_parser, share_files)
from pool_builder.build import BuildConfig, build_pool  # noqa: E402
from pool_builder.pool.evaluate import Evaluator, held_out_split  # noqa: E402
from pool_builder.pool.loader import Pool  # noqa: E402

SECTION = "build_throughput"
MODES = ("cached", "online")
TRAINED = ("oracle.pt", "oracle.torchscript.pt", "library.pt", "stages/oracle.json", "stages/library.json")
TARGET_RATIO = 10.0
TARGET_POINTS = 0.3


@dataclass(frozen=True)
class ThroughputConfig(SectionConfig):
    """Which experts are extracted and for how long; ``None`` means the pool's own setting."""

    data_dir: str | None = None
    tasks: tuple[str, ...] | None = None
    epochs: int | None = None
    # One torch thread: its CPU time is the work done, whatever else runs on the machine (with two, OpenMP
    # threads spin while their partner waits for a core, and CPU time measures the neighbours too).
    threads: int = 1
    work: str | None = None  # scratch pool directories (default OUT/build_throughput/work)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise BenchError(f"epochs must be >= 1, got {self.epochs}")
        if self.threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads}")


PROFILES: dict[str, dict[str, Any]] = {
    # ~2.5 min on 2 cores with the quick pool: two experts, two epochs, both modes
    "quick": dict(tasks=("footwear", "tops"), epochs=2),
    "full": dict(tasks=None, epochs=None),
}


class Timeline:
    """The build's log lines with wall and process-CPU seconds since it started.

    With one torch thread, CPU seconds barely change when other work shares
    the machine, wall seconds do: the report gives both.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.lines: list[tuple[float, float, str]] = []

    def __call__(self, line: str) -> None:
        self.lines.append((time.perf_counter() - self.start, time.process_time() - self.cpu_start, line))
        print(f"  {self.lines[-1][0]:7.1f}s {line[:140]}", file=sys.stderr, flush=True)

    def first(self, marker: str) -> tuple[float, float]:
        """(wall, cpu) seconds at the first line containing ``marker``."""
        return next((wall, cpu) for wall, cpu, line in self.lines if marker in line)


def build_step(mode: str, src: Pool, cfg: ThroughputConfig, tasks: Sequence[str], work: Path) -> dict[str, Any]:
    """One ``build_pool`` in ``mode`` of a pool holding ``tasks``: it reuses the experts built before, so exactly
    the last task's expert is trained.  Alternating the modes task by task spreads changes in the machine's load
    over both modes instead of one."""
    out = work / mode
    if len(tasks) == 1:
        shutil.rmtree(out, ignore_errors=True)
        share_files(src.dir, out, TRAINED)
    hierarchy = work / f"hierarchy-{mode}.json"
    classes = src.meta.dataset.class_names
    hierarchy.write_text(json.dumps({t: [classes[i] for i in src.hierarchy.class_ids(t)] for t in tasks}))
    settings = {**src.meta.build["settings"], "out": str(out), "online": mode == "online",
                "hierarchy": str(hierarchy), "threads": cfg.threads}
    if cfg.epochs is not None:
        settings["expert_epochs"] = cfg.epochs
    if cfg.data_dir is not None:
        settings["data_dir"] = cfg.data_dir
    task = tasks[-1]
    print(f"[{mode}] expert {task}", file=sys.stderr, flush=True)
    timeline = Timeline()
    build_pool(BuildConfig(**settings), log=timeline, show_progress=False)
    ran = [line for _w, _c, line in timeline.lines if "] running" in line and f"[expert-{task}]" not in line]
    if ran:
        raise BenchError(f"the {mode} build retrained a shared stage ({ran[0]}): the pool's stages do not match "
                         "its settings")
    (w0, c0), (w1, c1) = timeline.first(f"[expert-{task}] running"), timeline.first(f"[expert-{task}] finished")
    return {"mode": mode, "task": task, "before_experts_s": round(timeline.first("[expert-")[0], 2),
            "expert_s": round(w1 - w0, 2), "expert_cpu_s": round(c1 - c0, 2),
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def summarize(mode: str, steps: list[dict[str, Any]], pool_dir: Path, data_dir: str | None) -> dict[str, Any]:
    """A mode's experts (time from its steps, accuracy from its pool) and its composite query over all of them."""
    pool = Pool.open(pool_dir)
    times = {s["task"]: s for s in steps}
    experts = {t: {"seconds": times[t]["expert_s"], "cpu_s": times[t]["expert_cpu_s"],
                   "accuracy": e.metrics["accuracy"], "oracle_accuracy": e.metrics["oracle_accuracy"],
                   "test_images": e.metrics["test_images"], "mean_abs_logit_gap": e.metrics["mean_abs_logit_gap"]}
               for t, e in pool.meta.experts.items()}
    query = Evaluator(pool, held_out_split(pool, data_dir)).query(list(experts))
    return {"mode": mode, "pool_id": pool.meta.pool_id, "train_images": pool.meta.build["train_images"],
            "epochs": pool.meta.build["settings"]["expert_epochs"], "steps": steps, "experts": experts,
            "experts_s": round(sum(e["seconds"] for e in experts.values()), 2),
            "experts_cpu_s": round(sum(e["cpu_s"] for e in experts.values()), 2),
            "composite": {"tasks": query.tasks, "accuracy": query.poe_accuracy,
                          "oracle_accuracy": query.oracle_accuracy, "test_images": query.test_images}}


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Throughputs, their ratios, and accuracy differences (points, cached minus online).

    The caches' one-time cost is what the cached mode's first build spent before its expert beyond what the
    online mode's first build spent (both load the data and evaluate oracle and library on the test images).
    """
    cached, online = runs["cached"], runs["online"]
    images = cached["train_images"] * cached["epochs"] * len(cached["experts"])
    caches_s = max(0.0, cached["steps"][0]["before_experts_s"] - online["steps"][0]["before_experts_s"])
    diffs = {t: 100 * (cached["experts"][t]["accuracy"] - online["experts"][t]["accuracy"])
             for t in cached["experts"]}
    diffs["composite"] = 100 * (cached["composite"]["accuracy"] - online["composite"]["accuracy"])
    return {"images_per_mode": images, "caches_s": round(caches_s, 2),
            "throughput": {m: images / r["experts_s"] for m, r in runs.items()},
            "ratio": online["experts_s"] / cached["experts_s"],
            "cpu_ratio": online["experts_cpu_s"] / cached["experts_cpu_s"],
            "end_to_end_ratio": online["experts_s"] / (cached["experts_s"] + caches_s),
            "accuracy_diff_points": diffs, "max_abs_diff_points": max(abs(d) for d in diffs.values())}


def run(cfg: ThroughputConfig) -> dict[str, Any]:
    src = Pool.open(cfg.pool)
    if src.meta.build["settings"].get("ensemble"):
        raise BenchError("this benchmark rebuilds experts of a single-oracle pool; "
                         f"{cfg.pool} has a multi-teacher oracle")
    tasks = cfg.tasks or tuple(src.hierarchy.task_names)
    for task in tasks:
        src.hierarchy.class_ids(task)  # unknown names list the valid tasks
    work = Path(cfg.work) if cfg.work else Path(cfg.out) / SECTION / "work"
    work.mkdir(parents=True, exist_ok=True)
    host = machine()
    started = time.perf_counter()
    steps: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for i in range(len(tasks)):
        for mode in MODES:
            steps[mode].append(build_step(mode, src, cfg, tasks[: i + 1], work))
    runs = {mode: summarize(mode, steps[mode], work / mode, cfg.data_dir) for mode in MODES}
    return {"config": asdict(cfg), "pool_id": src.meta.pool_id, "machine": asdict(host),
            "cache_dtype": src.meta.build["settings"]["cache_dtype"],
            "seconds": round(time.perf_counter() - started, 1), "runs": runs, "comparison": compare(runs)}


# --------------------------------------------------------------------------- report

def headlines(result: dict[str, Any]) -> list[Headline]:
    c = result["comparison"]
    return [
        Headline("cached vs online expert extraction throughput (same epochs, CPU time of one thread)",
                 f"{ratio_text(c['cpu_ratio'])} (wall clock {ratio_text(c['ratio'])})",
                 f">= {TARGET_RATIO:.0f}x", c["cpu_ratio"] >= TARGET_RATIO, round(c["cpu_ratio"], 2)),
        Headline("accuracy, cached minus online (worst expert or composite)",
                 f"{c['max_abs_diff_points']:.2f} points", f"<= {TARGET_POINTS} points",
                 c["max_abs_diff_points"] <= TARGET_POINTS, round(c["max_abs_diff_points"], 3)),
        Headline("experts, online vs cached including the one-time caches",
                 ratio_text(c["end_to_end_ratio"]), "-", None, round(c["end_to_end_ratio"], 2)),
    ]


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def markdown(result: dict[str, Any], plots: list[str]) -> str:
    runs, c, m = result["runs"], result["comparison"], result["machine"]
    cached, online = runs["cached"], runs["online"]
    mode_rows = [[mode, f"{c['caches_s']:.1f} s" if mode == "cached" else "-", f"{r['experts_s']:.1f} s",
                  f"{r['experts_cpu_s']:.1f} s", f"{c['throughput'][mode]:,.0f}", r["pool_id"]]
                 for mode, r in runs.items()]
    order = ", ".join(f"{s['mode']} {s['task']} ({s['expert_s']:.1f} s, load {s['load_average_after'][0]:.1f})"
                      for pair in zip(cached["steps"], online["steps"]) for s in pair)
    acc_rows = [[t, _pct(cached["experts"][t]["accuracy"]), _pct(online["experts"][t]["accuracy"]),
                 f"{c['accuracy_diff_points'][t]:+.2f}", _pct(cached["experts"][t]["oracle_accuracy"]),
                 f"{cached['experts'][t]['seconds']:.1f} s", f"{online['experts'][t]['seconds']:.1f} s"]
                for t in cached["experts"]]
    comp = cached["composite"]
    acc_rows.append([f"composite {','.join(comp['tasks'])}", _pct(comp["accuracy"]),
                     _pct(online["composite"]["accuracy"]), f"{c['accuracy_diff_points']['composite']:+.2f}",
                     _pct(comp["oracle_accuracy"]), "", ""])
    return "\n".join([
        "# Build throughput: cached teacher outputs vs the online loop", "",
        f"Pool `{result['pool_id']}`; {describe_machine(m, result['config']['threads'])}. "
        f"Whole run {result['seconds']:.0f} s.", "",
        f"Experts {', '.join(cached['experts'])}, {cached['epochs']} epochs each over {cached['train_images']:,} "
        f"training images ({c['images_per_mode']:,} expert training images per mode), built by ordinary "
        "`build_pool` runs from the same oracle and library. *cached*: oracle logits (float32) and library "
        f"features ({result['cache_dtype']}) computed once, experts trained from the memory-mapped cache. "
        "*online*: `--online`, oracle and library re-run on every batch. The modes alternate expert by expert, "
        f"so that changes in the machine's load reach both: {order}.", "",
        markdown_table(["mode", "computing the caches (once)", "experts", "experts, CPU time", "expert images/s",
                        "pool id"], mode_rows),
        "", f"**Expert extraction throughput, cached vs online: {ratio_text(c['cpu_ratio'])} in CPU time** (target "
        f">= {TARGET_RATIO:.0f}x), {ratio_text(c['ratio'])} wall clock. With one torch thread CPU time is the work "
        "done; wall clock also counts the time other processes held the core, and agrees with CPU time only on an "
        "idle machine. Counting the caches' one-time cost (wall clock) against these experts alone: "
        f"{ratio_text(c['end_to_end_ratio'])}; every further expert or epoch reuses them.", "",
        markdown_table(["expert", "cached acc", "online acc", "diff (points)", "oracle (restricted)",
                        "cached time", "online time"], acc_rows), "",
        f"Largest accuracy difference: {c['max_abs_diff_points']:.2f} points (target <= {TARGET_POINTS}).", "",
        *figure_links(plots), ""])


def plot(result: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    runs = result["runs"]
    tasks = list(runs["cached"]["experts"])
    images = result["runs"]["cached"]["train_images"] * result["runs"]["cached"]["epochs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.38
    for i, mode in enumerate(MODES):
        xs = [k + (i - 0.5) * width for k in range(len(tasks))]
        left.bar(xs, [images / runs[mode]["experts"][t]["seconds"] for t in tasks], width, label=mode)
        right.bar(xs, [100 * runs[mode]["experts"][t]["accuracy"] for t in tasks], width, label=mode)
    for ax, title in ((left, "expert training images / s (log)"), (right, "expert test accuracy %")):
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    low = min(100 * runs[m]["experts"][t]["accuracy"] for m in MODES for t in tasks)
    right.set_ylim(max(0.0, low - 5), 100.5)
    return [save_figure(fig, out / "throughput.png")]


def render(result: dict[str, Any], out_root: Path) -> Path:
    return render_section(out_root / SECTION, result, plot, markdown, headlines)


def parser() -> BenchArgumentParser:
    ap = section_parser("build_throughput.py", __doc__, SECTION,
                        "two experts, two epochs (default: all, the pool's epochs)")
    ap.add_argument("--data-dir")
    ap.add_argument("--tasks", help="comma-separated primitive tasks of the pool")
    ap.add_argument("--epochs", type=int, help="expert epochs for both modes")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", help="scratch pool directories")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    require_pool(args.pool)
    settings = profile_settings(args, PROFILES, ThroughputConfig, ("tasks",))
    if args.tasks is not None:
        settings["tasks"] = tuple(choose(args.tasks, Pool.open(args.pool).hierarchy.task_names, "task"))
    cfg = ThroughputConfig(**settings)
    return print_report(render(run(cfg), Path(cfg.out)))


if __name__ == "__main__":
    sys.exit(run_main(main))
