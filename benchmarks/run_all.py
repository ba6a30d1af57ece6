"""Run every benchmark section and assemble ``REPORT.md``: what ``make bench`` runs (with ``--quick``).

Finds a pool (``--pool``; else ``runs/demo/pool`` when ``make demo`` built it;
else builds the quick profile into ``<out>/pool``), runs each section's script
in its own process (output shown and kept in ``<out>/<section>/run.log``),
records exit codes and times in ``<out>/run.json``, and assembles
``<out>/REPORT.md`` with ``benchmarks/report.py``.  A failing section does not
stop the others; the exit code is 1 when any section failed.  The edge section
measures the pool's exported fragments (``make demo``'s beside the pool, else
exported into ``<out>/fragments`` first).

    python benchmarks/run_all.py --quick --out runs/bench            # make bench
    python benchmarks/run_all.py --out runs/full/bench --pool runs/full/pool
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import BenchArgumentParser, BenchError, choose, machine, run_main  # noqa: E402
from benchmarks.report import RUN_FILE, SECTIONS, Section, assemble, read_run  # noqa: E402
from edge_runtime.atomic_io import atomic_write_json  # noqa: E402

DEMO_POOL = ROOT / "runs" / "demo" / "pool"
NEEDS_POOL = ("query_vs_training", "build_throughput", "scale_ablation", "progressive")


@dataclass(frozen=True)
class RunConfig:
    out: Path
    quick: bool
    pool: Path | None
    sections: tuple[str, ...]
    data_dir: str | None = None


def stream(command: list[str], log: Path) -> int:
    """Run ``command``, echoing its output to stderr and into ``log``; its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout or ():
            sink.write(line)
            sys.stderr.write(line)
        return proc.wait()


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it: reports read the same on every checkout."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def find_pool(cfg: RunConfig) -> tuple[Path, dict[str, Any]]:
    """The pool the sections measure, building the quick profile when there is none."""
    if cfg.pool is not None:
        if not (cfg.pool / "pool.json").is_file():
            raise BenchError(f"no pool at {cfg.pool} (pool.json missing)")
        return cfg.pool, {"path": shown(cfg.pool), "note": f"`{shown(cfg.pool)}` (given)"}
    if (DEMO_POOL / "pool.json").is_file():
        return DEMO_POOL, {"path": shown(DEMO_POOL), "note": f"`{shown(DEMO_POOL)}` (built by `make demo`, reused)"}
    target = cfg.out / "pool"
    command = [sys.executable, "-m", "pool_builder", "build", "--profile", "quick", "--out", shown(target),
               "--no-progress"] + (["--data-dir", cfg.data_dir] if cfg.data_dir else [])
    started = time.perf_counter()
    if stream(command, cfg.out / "pool.log") != 0:
        raise BenchError(f"building the quick pool into {target} failed; see {cfg.out / 'pool.log'}")
    seconds = round(time.perf_counter() - started, 1)
    return target, {"path": shown(target), "built_s": seconds,
                    "note": f"`{shown(target)}` (quick profile, built for this run in {seconds:.0f} s)"}


def same_pool(fragments: Path, pool: Path) -> bool:
    """Whether ``fragments`` holds an export of exactly this pool (its manifest names the pool's id)."""
    try:
        manifest = json.loads((fragments / "manifest.json").read_text())
        meta = json.loads((pool / "pool.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("pool_id") == meta.get("pool_id")


def find_fragments(cfg: RunConfig, pool: Path) -> Path:
    """The pool's exported fragments for the edge section: ``make demo``'s beside the pool, else exported now."""
    beside = pool.parent / "fragments"
    if same_pool(beside, pool):
        return beside
    target = cfg.out / "fragments"
    if same_pool(target, pool):
        return target
    command = [sys.executable, "-m", "converters", "export", "--pool", shown(pool), "--out", shown(target),
               "--overwrite"]
    if stream(command, cfg.out / "fragments.log") != 0:
        raise BenchError(f"exporting {pool} to {target} failed; see {cfg.out / 'fragments.log'}")
    return target


def command_for(section: Section, cfg: RunConfig, pool: Path) -> list[str]:
    command = [sys.executable, section.script, "--out", shown(cfg.out)]
    if section.name in NEEDS_POOL or section.name == "edge":
        command += ["--pool", shown(pool)]
    if section.name == "edge":
        command += ["--fragments", shown(find_fragments(cfg, pool))]
    if cfg.data_dir and section.name in ("query_vs_training", "build_throughput"):
        command += ["--data-dir", cfg.data_dir]
    return command + (["--quick"] if cfg.quick else [])


def run(cfg: RunConfig) -> int:
    started = time.perf_counter()
    host = machine()
    pool, pool_note = find_pool(cfg)
    statuses: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        if section.name not in cfg.sections:
            continue
        if not (ROOT / section.script).is_file():
            statuses[section.name] = {"status": "skipped", "reason": f"`{section.script}` is not in this checkout"}
            continue
        print(f"== {section.name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            command = command_for(section, cfg, pool)
        except BenchError as exc:  # e.g. its fragments could not be exported: the other sections still run
            print(f"{section.name}: {exc}", file=sys.stderr)
            statuses[section.name] = {"status": "failed", "rc": 1, "seconds": round(time.perf_counter() - t0, 1),
                                      "reason": str(exc)}
            continue
        rc = stream(command, cfg.out / section.name / "run.log")
        statuses[section.name] = {"status": "ok" if rc == 0 else "failed", "rc": rc,
                                  "seconds": round(time.perf_counter() - t0, 1)}
    earlier = read_run(cfg.out)  # sections not rerun keep their results and their record
    kept = earlier.get("sections", {}) if earlier.get("quick") == cfg.quick else {}
    atomic_write_json(cfg.out / RUN_FILE, {"quick": cfg.quick, "pool": pool_note, "machine": asdict(host),
                                           "seconds": round(time.perf_counter() - started, 1),
                                           "sections": {**kept, **statuses}})
    report = assemble(cfg.out)
    failed = [name for name, s in statuses.items() if s["status"] == "failed"]
    print(f"wrote {report} in {time.perf_counter() - started:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    names = [s.name for s in SECTIONS]
    ap = BenchArgumentParser(prog="run_all.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--quick", action="store_true", help="each section's quick profile (make bench)")
    ap.add_argument("--pool", help="the pool to measure (default: runs/demo/pool, else a quick pool built in OUT)")
    ap.add_argument("--sections", default=",".join(names), help=f"comma-separated, from: {', '.join(names)}")
    ap.add_argument("--data-dir")
    args = ap.parse_args(argv)
    cfg = RunConfig(Path(args.out).resolve(), args.quick, Path(args.pool).resolve() if args.pool else None,
                    tuple(choose(args.sections, names, "section")), args.data_dir)
    cfg.out.mkdir(parents=True, exist_ok=True)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
