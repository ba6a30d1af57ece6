"""Which int8 scheme should the converter try first?  Accuracy and bytes of each, measured in one run.

Exports a pool's int8 fragments once per scheme (per-channel, per-tensor, int16
activations) with the accuracy gate opened wide, so every scheme is measured
rather than the first that passes, and tabulates the composite accuracy drop
against torch and the bytes against fp32.  Writes JSON and Markdown.

    python benchmarks/quant_schemes.py --pool runs/demo/pool --out runs/bench/quant_schemes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.export import ExportConfig, export_fragments  # noqa: E402
from converters.schemes import SCHEMES  # noqa: E402
from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from pool_builder.report import format_table  # noqa: E402


def measure(pool: str, scheme: str, eval_images: int | None, work: Path) -> dict:
    summary = export_fragments(ExportConfig(pool=pool, out=str(work / scheme), precisions=("fp32", "int8"),
                                            schemes=(scheme,), max_accuracy_drop=100.0, eval_images=eval_images,
                                            check_tflite_runtime=False), log=lambda m: print(m, file=sys.stderr)
                               ).summary
    rows = {}
    for fmt in ("tflite", "onnx"):
        queries = summary["composites"][f"{fmt}.int8"]
        everything = max(queries, key=lambda q: len(q.split(",")))
        rows[fmt] = {"all_tasks_accuracy": queries[everything]["accuracy"],
                     "torch_accuracy": queries[everything]["torch_accuracy"],
                     "worst_drop_points": max(q["drop_points"] for q in queries.values()),
                     "mean_drop_points": sum(q["drop_points"] for q in queries.values()) / len(queries),
                     "int8_bytes": summary["variant_bytes"][f"{fmt}.int8"],
                     "fp32_bytes": summary["variant_bytes"][f"{fmt}.fp32"],
                     "seconds": summary["stage_seconds"].get(f"{fmt}_int8_convert", 0.0)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--eval-images", type=int)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="poe-schemes-") as tmp:
        for scheme in args.schemes.split(","):
            results[scheme] = measure(args.pool, scheme, args.eval_images, Path(tmp))
    rows = [[scheme, fmt, f"{r['all_tasks_accuracy'] * 100:.2f}% ({r['torch_accuracy'] * 100:.2f}%)",
             f"{r['worst_drop_points']:+.2f}", f"{r['mean_drop_points']:+.2f}", f"{r['int8_bytes']:,}",
             f"{r['int8_bytes'] / r['fp32_bytes'] * 100:.1f}%"]
            for scheme, by_fmt in results.items() for fmt, r in by_fmt.items()]
    table = format_table(["scheme", "format", "all-task acc (torch)", "worst drop pts", "mean drop pts",
                          "int8 bytes", "of fp32"], rows)
    out = Path(args.out)
    atomic_write_json(out / "quant_schemes.json", {"pool": args.pool, "results": results})
    atomic_write_bytes(out / "quant_schemes.md", (f"pool `{args.pool}`\n\n```\n{table}\n```\n").encode())
    print(table)


if __name__ == "__main__":
    main()
