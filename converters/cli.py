"""``poe-convert``: pool -> checked fragments (``export``), fragments -> one ONNX per query (``fuse``).

Errors caused by input print one line and exit 2 (``--debug`` shows the
traceback); a failed accuracy gate exits 1 after writing the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from edge_runtime.cli_errors import missing_extra, run_command

EXIT_GATE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poe-convert", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="convert a pool's library and experts into checked TFLite/ONNX fragments")
    p.add_argument("--pool", required=True, help="pool directory (pool.json)")
    p.add_argument("--out", required=True, help="fragment directory to write (replaced as a whole on success)")
    p.add_argument("--formats", default="tflite,onnx", help="comma list of tflite, onnx (default both)")
    p.add_argument("--precisions", default="fp32,fp16,int8",
                   help="comma list of fp32, fp16, int8 (default all)")
    p.add_argument("--calibration-images", type=int, default=200, help="training images used to calibrate int8")
    p.add_argument("--calibration-file", help=".npy of uint8 images (N×H×W×C) to calibrate on instead")
    p.add_argument("--eval-images", type=int, help="held-out images to measure agreement on (default: all)")
    p.add_argument("--data-dir", help="data directory, if not where the pool was built from")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="gate: fp16/int8 composite accuracy may be at most this many points below torch")
    p.add_argument("--schemes", default="per_channel,per_tensor,int16_act",
                   help="int8 schemes to try in order until the gate passes")
    p.add_argument("--query", action="append", default=[], metavar="TASKS",
                   help="extra query to gate on, e.g. tops,footwear (all tasks and every pair are always checked)")
    p.add_argument("--overwrite", action="store_true", help="replace fragments of a different pool in --out")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads while measuring")
    p.add_argument("--skip-tflite-runtime", action="store_true", help="do not cross-check with tflite-runtime")
    p.add_argument("--latency", default="auto", choices=["auto", "always", "never"],
                   help="measure every fragment's latency at batch 1, 1 thread, into the manifest "
                        "(auto: only for progressive experts, which the device's --budget-ms planner needs)")
    p.add_argument("--summary", help="write the JSON summary here (also when a gate fails)")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of a table")
    f = sub.add_parser("fuse", help="one ONNX file for a query, from existing ONNX fragments (no TensorFlow)")
    f.add_argument("--fragments", required=True, help="fragment directory (manifest.json)")
    f.add_argument("--tasks", required=True, help="comma list of primitive tasks")
    f.add_argument("--out", required=True, help="ONNX file to write")
    f.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="which ONNX fragments to fuse")
    return parser


def _table(summary: dict[str, Any]) -> str:
    from pool_builder.report import format_table

    rows = []
    for frag in summary["fragments"]:
        a = frag["agreement"]
        rows.append([frag["id"], f"{frag['bytes']:,}", f"{a.get('max_abs_error', float('nan')):.2e}",
                     "" if "top1_agreement" not in a else f"{a['top1_agreement'] * 100:.2f}%",
                     "" if "accuracy" not in a else f"{a['accuracy'] * 100:.2f}% ({a['torch_accuracy'] * 100:.2f}%)",
                     "" if "composite_accuracy" not in a else f"{a['composite_accuracy'] * 100:.2f}%"])
    lines = [format_table(["fragment", "bytes", "max |err|", "top-1 agree", "task acc (torch)", "all-task acc"],
                          rows)]
    for key, ratio in summary["size_ratios"].items():
        lines.append(f"bytes {key}: {ratio * 100:.1f}%")
    lines.append(f"wall time {summary.get('wall_seconds', 0):.1f} s; " + ("all gates passed" if summary["ok"]
                                                                         else "FAILED: " + summary["failures"][0]))
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    from .errors import GateError
    from .export import Export, ExportConfig
    from edge_runtime.atomic_io import atomic_write_json

    cfg = ExportConfig(pool=args.pool, out=args.out, formats=args.formats, precisions=args.precisions,
                       calibration_images=args.calibration_images, calibration_file=args.calibration_file,
                       eval_images=args.eval_images, data_dir=args.data_dir, max_accuracy_drop=args.max_accuracy_drop,
                       schemes=tuple(args.schemes.split(",")),
                       queries=tuple(args.query),
                       overwrite=args.overwrite, threads=args.threads,
                       check_tflite_runtime=not args.skip_tflite_runtime, latency=args.latency)
    result = Export(cfg).run()
    if args.summary:
        atomic_write_json(args.summary, result.summary)
    print(json.dumps(result.summary, indent=2, sort_keys=True) if args.json else _table(result.summary))
    if not result.summary["ok"]:
        print(f"poe-convert: error: {GateError.__doc__.splitlines()[0]}", file=sys.stderr)
        return EXIT_GATE
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from .fuse import fuse_query

    fused = fuse_query(args.fragments, args.tasks, args.out, args.precision)
    print(f"wrote {fused.path} ({fused.bytes:,} bytes) for tasks {','.join(fused.tasks)}: output columns = "
          f"class ids {list(fused.class_ids)}; fused in {fused.milliseconds:.1f} ms")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    needs = ("torch", "onnx", "onnxruntime", "onnx2tf") if args.command == "export" else ("onnx",)
    missing = missing_extra("poe-convert", "convert", needs)
    if missing is not None:
        return missing
    return run_command("poe-convert", _export if args.command == "export" else _fuse, args,
                       interrupted="interrupted; nothing was published")


if __name__ == "__main__":
    sys.exit(main())
