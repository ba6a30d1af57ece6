"""Gather `edge-runtime bench --out FILE` records from several boards into one Markdown table.

Users time the runtime on their own Raspberry Pi / Jetson / x86 machines and
bring the JSON back; this puts them side by side (one row per board, query,
variant and thread count) with the machine each number came from.

    python benchmarks/edge_boards.py pi4.json pi5.json x86.json [--out boards.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.atomic_io import atomic_write_bytes  # noqa: E402
from edge_runtime.bench import BENCH_SCHEMA  # noqa: E402

HEADER = ["board / CPU", "arch", "Python", "numpy", "interpreter", "variant", "tasks", "batch", "threads",
          "p50 ms", "p90 ms", "p99 ms", "images/s", "peak RSS MiB", "bytes"]


def load_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != BENCH_SCHEMA:
        raise ValueError(f"{path}: not an edge-runtime bench record (schema {BENCH_SCHEMA}); "
                         f"write one with `edge-runtime bench ... --out FILE`")
    return record


def rows(record: dict[str, Any]) -> list[list[str]]:
    m, loaded, cfg = record["machine"], record["loaded"], record["config"]
    rss = record.get("peak_rss_bytes")
    out = []
    for r in record["results"]:
        t = r["total_ms"]
        out.append([m.get("board") or m["cpu"], m["machine"], m["python"], m["numpy"],
                    f"{m['backend']} {m['backend_version']}".strip(), f"{loaded['format']} {loaded['precision']}",
                    ",".join(loaded["tasks"]), str(cfg["batch"]), str(r["threads"]), f"{t['p50']:.3f}",
                    f"{t['p90']:.3f}", f"{t['p99']:.3f}", f"{r['images_per_s']:.0f}",
                    f"{rss / 2**20:.1f}" if rss else "n/a", f"{loaded['bytes']:,}"])
    return out


def table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for record in records:
        lines += ["| " + " | ".join(row) + " |" for row in rows(record)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", help="JSON files written by `edge-runtime bench --out`")
    ap.add_argument("--out", help="write the Markdown table here as well")
    args = ap.parse_args(argv)
    try:
        text = table([load_record(Path(p)) for p in args.records])
    except ValueError as exc:
        print(f"edge_boards.py: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
