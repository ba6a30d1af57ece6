"""Assemble one ``REPORT.md`` from the benchmark section directories under ``--out``.

Every section script writes ``<out>/<section>/report.md`` and ``result.json``
(``benchmarks/common.py``); this embeds each report under a numbered heading
(its image links rewritten to stay valid from ``<out>/``), puts every
section's ``headline`` claims into one summary table at the top, and says
"not run" for a section without a report, with the reason ``run_all.py``
recorded in ``<out>/run.json`` when there is one.  Reads only files, so it can
re-assemble an old run.

    python benchmarks/report.py --out runs/bench
    python benchmarks/report.py --out runs/bench --publish docs/bench     # what docs/results links to
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (REPORT_FILE, RESULT_FILE, BenchArgumentParser, BenchError,  # noqa: E402
                               describe_machine, markdown_table, run_main)
from edge_runtime.atomic_io import atomic_write_bytes  # noqa: E402

RUN_FILE = "run.json"
REPORT_NAME = "REPORT.md"


@dataclass(frozen=True)
class Section:
    """A report section: the directory its script writes and the title it gets here."""

    name: str
    title: str
    script: str


SECTIONS: tuple[Section, ...] = (
    Section("query_vs_training", "Query vs training", "benchmarks/query_vs_training.py"),
    Section("build_throughput", "Build throughput: cached vs online", "benchmarks/build_throughput.py"),
    Section("scale_ablation", "Ablation: L_scale and alpha", "benchmarks/scale_ablation.py"),
    Section("edge", "Edge latency", "benchmarks/edge.py"),
    Section("progressive", "Progressive experts: accuracy vs latency", "benchmarks/progressive.py"),
)

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
_SRC = re.compile(r"""(<img\s[^>]*src=["'])([^"']+)(["'])""")


def _relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target, re.IGNORECASE)


def rebase_links(markdown: str, prefix: str) -> str:
    """Prefix relative link and image targets with ``prefix/`` (the section's directory)."""

    def fix(match: re.Match[str]) -> str:
        head, target, tail = match.groups()
        return head + (f"{prefix}/{target}" if _relative(target) else target) + tail

    return _SRC.sub(fix, _LINK.sub(fix, markdown))


def embed(markdown: str, prefix: str) -> tuple[str | None, str]:
    """A section report's own title (its first ``# `` heading) and its body, headings one level down."""
    lines = markdown.strip("\n").splitlines()
    title = None
    if lines and lines[0].startswith("# "):
        title, lines = lines[0][2:].strip(), lines[1:]
    body, fenced = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        body.append("#" + line if not fenced and re.match(r"^#{1,5} ", line) else line)
    return title, rebase_links("\n".join(body).strip("\n"), prefix)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_run(out: Path) -> dict[str, Any]:
    """What ``run_all.py`` recorded about the run in ``out`` (empty when it did not run there)."""
    return _read_json(out / RUN_FILE) or {}


def _status_note(section: Section, status: dict[str, Any] | None) -> str:
    if status is None:
        return f"Not run (`python {section.script} --out OUT` writes it)."
    if status.get("status") == "skipped":
        return f"Not run: {status.get('reason', 'skipped')}."
    return (f"Not run: `{section.script}` exited with {status.get('rc')} after {status.get('seconds', 0):.0f} s; "
            f"see `{section.name}/run.log`.")


def summary_rows(out: Path) -> list[list[str]]:
    rows = []
    for number, section in enumerate(SECTIONS, 1):
        result = _read_json(out / section.name / RESULT_FILE) if (out / section.name / REPORT_FILE).is_file() else None
        for h in (result or {}).get("headline", []):
            met = {True: "yes", False: "**no**", None: "-"}[h.get("met")]
            rows.append([f"{number}. {section.title}", h["claim"], h["measured"], h["target"], met])
    return rows


def stamp_rows(out: Path) -> list[list[str]]:
    """Each section's own stamp (``common.stamp``); a result written before stamps existed says so."""
    rows = []
    for number, section in enumerate(SECTIONS, 1):
        result = _read_json(out / section.name / RESULT_FILE) if (out / section.name / REPORT_FILE).is_file() else None
        if result is None:
            continue
        s = result.get("stamp")
        if not s:
            rows.append([f"{number}. {section.title}", "not stamped", "-", "-", "-", "-", "-"])
            continue
        load = " -> ".join("?" if v is None else f"{v:.2f}" for v in (s.get("load_before"), s.get("load_after")))
        rows.append([f"{number}. {section.title}", s.get("date", "?"), f"`{s.get('commit', '?')}`", s.get("cpu", "?"),
                     ", ".join(s.get("cpu_flags") or []) or "-", str(s.get("cores", "?")), load])
    return rows


def assemble(out: Path) -> Path:
    """Write ``<out>/REPORT.md`` from whatever sections are there."""
    if not out.is_dir():
        raise BenchError(f"{out} is not a directory of benchmark results")
    run = read_run(out)
    statuses = run.get("sections", {})
    head = ["# Benchmark report", "",
            f"Assembled {datetime.now(timezone.utc).isoformat(timespec='seconds')}."]
    if run:
        times = ", ".join(f"{name} {status['seconds']:.0f} s" if "seconds" in status else f"{name} {status['status']}"
                          for name, status in statuses.items())
        head.append(f"Latest `run_all.py` invocation: {'quick' if run.get('quick') else 'full'} profile; sections "
                    f"{times}; pool: {run.get('pool', {}).get('note', '-')}; it started on "
                    f"{describe_machine(run['machine'])}. Sections kept from earlier invocations keep their own "
                    "stamps (table below): read each section's numbers with its own stamp.")
    head += ["", "Comparisons were run side by side in the same run and are given as ratios; absolute times hold "
             "only for the machine named in each section's stamp.", "", "## Summary", ""]
    rows = summary_rows(out)
    head.append(markdown_table(["section", "claim", "measured", "target", "met"], rows, "lllrl") if rows
                else "No section has results yet.")
    stamps = stamp_rows(out)
    if stamps:
        head += ["", "Where and when each section was measured (1-minute load average before and after):", "",
                 markdown_table(["section", "finished (UTC)", "commit", "CPU", "flags", "cores", "load"], stamps,
                                "llllllr")]
    parts = ["\n".join(head)]
    for number, section in enumerate(SECTIONS, 1):
        report = out / section.name / REPORT_FILE
        if report.is_file():
            title, body = embed(report.read_text(), section.name)
            parts.append(f"## {number}. {title or section.title}\n\n{body}")
        else:
            parts.append(f"## {number}. {section.title}\n\n{_status_note(section, statuses.get(section.name))}")
    path = out / REPORT_NAME
    atomic_write_bytes(path, ("\n\n".join(parts) + "\n").encode())
    return path


def publish(out: Path, dest: Path) -> list[Path]:
    """Copy ``REPORT.md`` and every section's plots to ``dest`` (e.g. ``docs/bench``), keeping the links valid."""
    if not (out / REPORT_NAME).is_file():
        raise BenchError(f"{out / REPORT_NAME} does not exist; assemble the report first")
    files = [out / REPORT_NAME] + sorted(p for s in SECTIONS for p in (out / s.name).glob("*.png"))
    copied = []
    for src in files:
        target = dest / src.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, src.read_bytes())
        copied.append(target)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    ap = BenchArgumentParser(prog="report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="the directory the section scripts wrote into")
    ap.add_argument("--publish", metavar="DIR", help="also copy REPORT.md and the plots there (e.g. docs/bench)")
    args = ap.parse_args(argv)
    path = assemble(Path(args.out))
    print(f"wrote {path}")
    if args.publish:
        print(f"copied {len(publish(Path(args.out), Path(args.publish)))} files to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
