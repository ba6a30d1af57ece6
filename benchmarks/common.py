"""What every benchmark script shares: argument errors, the machine record, section output, plots.

Each benchmark writes one *section directory* (``<out>/<section>/``) holding
``result.json`` (machine-readable, with a ``headline`` list of claims against
their targets), ``report.md`` (human-readable, images linked relative to the
directory) and PNG plots.  ``benchmarks/report.py`` assembles the sections
into one ``REPORT.md`` by these names alone, so a new section needs no change
there beyond its title.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Sequence

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json

EXIT_USAGE = 2
RESULT_FILE = "result.json"
REPORT_FILE = "report.md"


class BenchArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (``prog: error: ...``) and exits 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class BenchError(ValueError):
    """A bad argument or input found after parsing; the script prints it in one line and exits 2."""


@dataclass(frozen=True)
class SectionConfig:
    """What every section's configuration starts with: the pool measured and the run's top directory."""

    pool: str = "runs/demo/pool"
    out: str = "runs/bench"


def section_parser(prog: str, doc: str | None, section: str, quick_help: str) -> BenchArgumentParser:
    """The arguments every section script takes: ``--pool``, ``--out`` (results in ``OUT/<section>/``), ``--quick``."""
    ap = BenchArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    ap.add_argument("--pool", default=SectionConfig.pool, help="a built pool directory (default: make demo's)")
    ap.add_argument("--out", default=SectionConfig.out, help=f"results go to OUT/{section}/")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def profile_settings(args: argparse.Namespace, profiles: dict[str, dict[str, Any]], config: type,
                     parsed_here: Sequence[str] = ()) -> dict[str, Any]:
    """The chosen profile's settings overridden by every flag given (``parsed_here``: flags the caller parses)."""
    settings = dict(profiles["quick" if args.quick else "full"])
    for f in fields(config):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in parsed_here:
            settings[f.name] = value
    return settings


def require_pool(path: str) -> None:
    if not (Path(path) / "pool.json").is_file():
        raise BenchError(f"no pool at {path} (pool.json missing); build one with `pool-builder build --out DIR` "
                         "or run `make demo`")


def print_report(section_dir: Path) -> int:
    """Show the section's report on stdout (the run's log) and succeed."""
    print((section_dir / REPORT_FILE).read_text())
    return 0


def plural(noun: str) -> str:
    """English plural of a kind of name ("section" -> "sections", "class" -> "classes")."""
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x", "z")) else "s")


def choose(text: str, valid: Sequence[str], kind: str) -> list[str]:
    """Comma-separated names, each one of ``valid``; the error lists the valid ones."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BenchError(f"no {kind} given; valid {plural(kind)}: {', '.join(valid)}")
    for name in names:
        if name not in valid:
            raise BenchError(f"unknown {kind} {name!r}; valid {plural(kind)}: {', '.join(valid)}")
    return names


def floats(text: str, what: str) -> list[float]:
    """Comma-separated numbers (e.g. an alpha sweep), with an error naming the bad item."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise BenchError(f"{what}: give at least one number")
    return values


def run_main(main: Any, argv: Sequence[str] | None = None) -> int:
    """Call a script's ``main``; a :class:`BenchError` or a pool error becomes one line and exit 2."""
    from pool_builder.errors import PoolBuilderError

    try:
        return int(main(argv) or 0)
    except (BenchError, PoolBuilderError) as exc:
        prog = Path(sys.argv[0]).name if argv is None else "benchmark"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


@dataclass(frozen=True)
class Machine:
    """Where absolute times came from: they only compare with times from the same machine."""

    cpu: str
    cores: int
    python: str
    torch: str
    platform: str
    load_average: tuple[float, float, float]



def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Machine:
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    load = tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return Machine(cpu_model(), os.cpu_count() or 1, platform.python_version(), torch_version,
                   f"{platform.system()} {platform.machine()}", load)  # type: ignore[arg-type]


# Instruction-set extensions that decide how fast int8 and fp32 kernels can be (x86 and Arm names in /proc/cpuinfo).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU reports: int8-vs-fp32 results depend on them (VNNI, AMX, dot product)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def stamp(load_before: Sequence[float] | None = None) -> dict[str, Any]:
    """What a result was measured on, written into every section's result: commit, CPU and its flags, cores,
    1-minute load average before (the section's start, when known) and after, and the UTC date it finished.

    Each section keeps its own stamp, so a report assembled from sections of
    different runs never shows one run's machine for another's numbers.
    """
    after = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"commit": git_commit(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count() or 1,
            "load_before": round(float(load_before[0]), 2) if load_before else None, "load_after": after,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe_stamp(s: dict[str, Any]) -> str:
    """One line for a report: ``Stamp: commit ..., CPU (flags), N cores, load a -> b, date``."""
    flags = ", ".join(s.get("cpu_flags") or []) or "none of " + "/".join(CPU_FLAGS[:4])
    before = "?" if s.get("load_before") is None else f"{s['load_before']:.2f}"
    after = "?" if s.get("load_after") is None else f"{s['load_after']:.2f}"
    return (f"Stamp: commit `{s.get('commit', 'unknown')}`; {s.get('cpu', '?')} ({flags}); {s.get('cores', '?')} "
            f"cores; load average {before} before, {after} after; finished {s.get('date', '?')}.")


def describe_machine(m: dict[str, Any], threads: int | None = None, load_after: Sequence[float] = ()) -> str:
    """One sentence naming the machine a result's absolute times come from (``m``: a :class:`Machine` as JSON)."""
    text = f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}"
    if threads:
        text += f", {threads} torch threads"
    text += f"; load average at start {m['load_average'][0]:.2f}"
    return text + (f", at the end {load_after[0]:.2f}" if load_after else "")


@dataclass
class Headline:
    """One measured claim against its target, for the report's summary table."""

    claim: str
    measured: str
    target: str
    met: bool | None  # None: no target to meet, or not measurable in this run
    value: float | None = None


def write_section(out: Path, result: dict[str, Any], markdown: str, headlines: Iterable[Headline] = ()) -> Path:
    """Write ``result.json`` (with headlines and machine) and ``report.md`` into the section directory."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**result, "headline": [asdict(h) for h in headlines]}
    payload.setdefault("machine", asdict(machine()))
    payload.setdefault("stamp", stamp(payload["machine"].get("load_average")))
    atomic_write_json(out / RESULT_FILE, payload)
    atomic_write_bytes(out / REPORT_FILE, (markdown.rstrip("\n") + "\n\n" + describe_stamp(payload["stamp"])
                                           + "\n").encode())
    return out


NO_PLOTS = "Plots skipped: matplotlib is not installed (`pip install -e '.[bench]'`, or `make bench`)."


def render_section(out: Path, result: dict[str, Any], plot: Callable[[dict[str, Any], Path], list[str]],
                   markdown: Callable[[dict[str, Any], list[str]], str],
                   headlines: Callable[[dict[str, Any]], list[Headline]]) -> Path:
    """Plots, report and headlines of a measured result; the raw numbers are saved first, so they survive."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT_FILE, result)
    plots = plot(result, out)
    return write_section(out, result, markdown(result, plots), headlines(result))


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend (no display on build machines), or None without matplotlib.

    Plots are the only part of a benchmark that needs the ``bench`` extra; the
    numbers, JSON and Markdown do not, so ``make test`` runs without it.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_links(files: Sequence[str]) -> list[str]:
    """Markdown image lines for the plot files (relative to the section), or the note saying why there are none."""
    return [f"![{Path(f).stem}]({f})" for f in files] if files else [NO_PLOTS]


def save_figure(fig: Any, path: Path) -> str:
    """Save and close a figure; returns the file name for a relative Markdown link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def share_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    """Give pool directory ``dst`` the finished files ``names`` of ``src`` (hard links when possible).

    Derived pools reuse an oracle, a library or caches this way, so a benchmark
    re-runs only the stage it measures.
    """
    for name in names:
        if (src / name).exists() and not (dst / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src / name, dst / name)
            except OSError:
                shutil.copy2(src / name, dst / name)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (l/r), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_text(value: float | None, lower_bound: bool = False) -> str:
    """``12,345x`` (``> 12,345x`` for a bound); a dash when unknown."""
    if value is None:
        return "-"
    body = f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"
    return ("> " if lower_bound else "") + body
