"""Per-image latency of ONNX fragments on each onnxruntime execution provider present: composed vs fused.

For every available provider list of (cpu), (cuda), (tensorrt,cuda), every
precision (fp32, fp16) and batch size (1, 64), three ways to run one query on
the same pre-encoded images (preprocessing and softmax excluded, so the three
compare like for like):

- composed, host copies: ``Runtime`` as by default - the library's features come
  back to the host as numpy and go to every expert from there;
- composed, I/O binding: ``Runtime(io_binding=True)`` - the features stay on the
  provider's device (an ``OrtValue``) and every expert reads them there;
- fused: one graph for the query (``poe-convert fuse``) in one session.

Cells are measured round-robin (a slice of each in turn) so that a change in the
machine's load hits all of them alike.  The record is stamped with commit, CPU,
cores, load and date; it says which providers were measured - on a machine
without a GPU only the CPU is, and the report says so.

    python benchmarks/gpu_providers.py --bundle runs/demo/fragments --tasks footwear,tops \\
        [--out docs/results/jetson]        (writes OUT.json and OUT.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.edge_stream import stamp  # noqa: E402
from edge_runtime import Runtime  # noqa: E402
from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from edge_runtime.providers import (available_providers, configure_session, parse_providers,  # noqa: E402
                                    provider_options)

PROVIDER_SETS = ("cpu", "cuda", "tensorrt,cuda")
PATHS = ("composed_host", "composed_iobinding", "fused")
PATH_NAMES = {"composed_host": "composed, host copies", "composed_iobinding": "composed, I/O binding",
              "fused": "fused graph"}


def fused_runner(bundle: str, tasks: str, precision: str, providers: tuple[str, ...], threads: int,
                 folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The query fused into one ONNX graph, in one session on ``providers`` (same strictness as the runtime)."""
    import onnxruntime as ort

    from converters.fuse import fuse_query

    fused = fuse_query(bundle, tasks, folder / f"fused_{precision}.onnx", precision)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    extra = configure_session(options, providers)
    session = ort.InferenceSession(str(fused.path), options, providers=list(providers),
                                   provider_options=provider_options(providers, folder / "trt_cache"), **extra)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def measure_cells(runs: dict[str, Callable[[], Any]], seconds: float, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each run, measured round-robin: ``rounds`` slices of ``seconds / rounds`` each."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm up: first calls allocate (and on TensorRT, build engines)
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for key, fn in runs.items():
            end = time.perf_counter() + seconds / rounds
            while True:
                start = time.perf_counter()
                fn()
                now = time.perf_counter()
                samples[key].append(now - start)
                if now >= end and len(samples[key]) >= 3:
                    break
    return samples


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = stamp()
    available = available_providers()
    sets = [s for s in (args.providers.split(";") if args.providers else PROVIDER_SETS)
            if all(p in available for p in parse_providers(s) or ())]
    results, checks = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-providers-") as tmp:
        for pset in sets:
            providers = parse_providers(pset) or ()
            for precision in args.precisions.split(","):
                plain = Runtime.open(args.bundle, args.tasks, precision=precision, num_threads=args.threads,
                                     providers=pset, max_batch=max(args.batches))
                bound = Runtime.open(args.bundle, args.tasks, precision=precision, num_threads=args.threads,
                                     providers=pset, max_batch=max(args.batches), io_binding=True)
                fused = fused_runner(args.bundle, args.tasks, precision, providers, args.threads, Path(tmp))
                h, w, c = plain.manifest.preprocessing.input_shape
                for batch in args.batches:
                    images = np.random.default_rng(batch).integers(0, 256, (batch, h, w, c), dtype=np.uint8)
                    x = plain.encode(images)
                    a, b, f = plain.logits_from_encoded(x), bound.logits_from_encoded(x), fused(x)
                    checks.append({"providers": pset, "precision": precision, "batch": batch,
                                   "iobinding_vs_host_max_abs": float(np.max(np.abs(a - b))),
                                   "fused_vs_composed_max_abs": float(np.max(np.abs(a - f)))})
                    samples = measure_cells({"composed_host": lambda: plain.logits_from_encoded(x),
                                             "composed_iobinding": lambda: bound.logits_from_encoded(x),
                                             "fused": lambda: fused(x)}, args.seconds, args.rounds)
                    for path, s in samples.items():
                        ms = np.asarray(s) * 1000.0
                        results.append({"providers": pset, "precision": precision, "batch": batch, "path": path,
                                        "calls": len(ms), "p50_ms_per_call": round(float(np.median(ms)), 4),
                                        "p90_ms_per_call": round(float(np.percentile(ms, 90)), 4),
                                        "p50_ms_per_image": round(float(np.median(ms)) / batch, 5)})
                    print(f"{pset} {precision} batch {batch}: " + ", ".join(
                        f"{r['path']} {r['p50_ms_per_image']:.4f} ms/image" for r in results[-3:]), file=sys.stderr)
    machine["load_after"] = [round(v, 2) for v in os.getloadavg()]
    gpu = [s for s in sets if s != "cpu"]
    return {"machine": machine, "onnxruntime_providers_available": available, "provider_sets_measured": sets,
            "gpu_measured": bool(gpu),
            "config": {"bundle": args.bundle_label or args.bundle, "tasks": args.tasks,
                       "precisions": args.precisions.split(","), "batches": list(args.batches),
                       "threads": args.threads, "seconds_per_cell": args.seconds, "rounds": args.rounds},
            "results": results, "checks": checks}


def report(r: dict[str, Any]) -> str:
    m, cfg = r["machine"], r["config"]
    by = {(x["providers"], x["precision"], x["batch"], x["path"]): x for x in r["results"]}
    rows = []
    for pset in r["provider_sets_measured"]:
        for precision in cfg["precisions"]:
            for batch in cfg["batches"]:
                cells = [by[(pset, precision, batch, p)] for p in PATHS]
                rows.append(f"| {pset} | {precision} | {batch} | " + " | ".join(
                    f"{c['p50_ms_per_image']:.4f}" for c in cells) + f" | {cells[0]['p50_ms_per_call']:.3f} |")
    ratios = {(x["providers"], x["batch"]): [] for x in r["results"]}
    for (pset, precision, batch, path), x in by.items():
        if path != "composed_host":
            ratios[(pset, batch)].append((path, x["p50_ms_per_call"] / by[(pset, precision, batch, "composed_host")]
                                          ["p50_ms_per_call"]))
    ratio_lines = [f"  - {pset}, batch {batch}: " + ", ".join(
        f"{PATH_NAMES[p]} {min(v for q, v in rs if q == p):.2f}-{max(v for q, v in rs if q == p):.2f}x"
        for p in PATHS[1:]) for (pset, batch), rs in sorted(ratios.items())]
    fp16 = [by[(k[0], "fp16", k[2], k[3])]["p50_ms_per_call"] / x["p50_ms_per_call"]
            for k, x in by.items() if k[1] == "fp32" and (k[0], "fp16", k[2], k[3]) in by]
    batching = [by[(k[0], k[1], max(cfg["batches"]), k[3])]["p50_ms_per_image"] / x["p50_ms_per_image"]
                for k, x in by.items() if k[2] == min(cfg["batches"]) and max(cfg["batches"]) > k[2]]
    batch_range = f"{min(batching):.2f}-{max(batching):.2f}x" if batching else "(one batch size only)"
    worst_bound = max(c["iobinding_vs_host_max_abs"] for c in r["checks"])
    worst_fused = max(c["fused_vs_composed_max_abs"] for c in r["checks"])
    gpu_line = ("" if r["gpu_measured"] else
                "**No GPU was measured.** This machine has no GPU and its onnxruntime offers "
                f"{', '.join(r['onnxruntime_providers_available'])}; the CUDA and TensorRT rows are missing, not "
                "zero. The CPU rows say nothing about a Jetson's GPU: run this script there "
                "(docs/devices.md#jetson) and add its JSON beside this one.\n\n")
    return f"""# ONNX execution providers (Jetson issue): composed vs I/O binding vs fused

Data: [jetson.json](jetson.json). Script: `python benchmarks/gpu_providers.py --bundle BUNDLE
--tasks {cfg['tasks']} --threads {cfg['threads']}`.

{gpu_line}**Conditions.** Bundle: {cfg['bundle']}; query `{cfg['tasks']}`; onnxruntime, {cfg['threads']} intra-op
thread(s); pre-encoded input (no preprocessing or softmax); {cfg['seconds_per_cell']:g} s per cell measured
round-robin in {cfg['rounds']} slices. Commit {m['commit']}; CPU {m['cpu']} (flags: {m['cpu_flags']});
{m['cores']} cores; Python {m['python']}, numpy {m['numpy']}; load average before {m['load_before'][0]:.2f}, after
{m['load_after'][0]:.2f}; {m['date']}. A shared, loaded machine: the figures are this machine's, not general.

Median ms **per image** (p50 of calls / batch); last column the host-copy path's ms per call:

| providers | precision | batch | {' | '.join(PATH_NAMES[p] for p in PATHS)} | ms/call (host) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- Same numbers on every path: I/O binding against host copies differs by at most {worst_bound:.2g} (max |logit|
  difference over all cells), the fused graph against the composition by at most {worst_fused:.2g}.
- Time per call relative to composed with host copies (range over precisions):
{chr(10).join(ratio_lines)}
- On the CPU, I/O binding has nothing to save (the features already live in host memory): what the rows show
  is its own cost here (binding calls, outputs allocated per run, the logits copied out) plus this shared
  machine's noise. What it removes on a GPU - a device-to-host copy of the features and one host-to-device
  copy per expert - does not exist here, so these rows say nothing about its value on a Jetson; it stays off
  by default until it is measured there.
- fp16 against fp32, same path and batch: {min(fp16):.2f}-{max(fp16):.2f}x the time per call. On an x86 CPU
  onnxruntime's optimizer turns the fp16 graph back into float32 (float16 weights, float32 activations: seen
  in its optimized model), so no speed-up is expected from fp16 here and the differences are this machine's
  noise between cells measured at different times. fp16 is there for GPUs (CUDA, TensorRT, where
  activations are float16 too) and for size (about half the bytes).
- Batch {max(cfg['batches'])} against batch {min(cfg['batches'])}, per image: {batch_range}
  (one intra-op thread on a loaded 2-core machine; not investigated further).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="fragment directory with ONNX fp32 and fp16 fragments")
    ap.add_argument("--bundle-label", help="how the report names the bundle (default: its path)")
    ap.add_argument("--tasks", default="footwear,tops")
    ap.add_argument("--providers", help="';'-separated provider lists to measure (default: each of "
                                        f"{', '.join(PROVIDER_SETS)} that is available)")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--batches", type=lambda t: tuple(int(v) for v in t.split(",")), default=(1, 64))
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell (default 2)")
    ap.add_argument("--rounds", type=int, default=4, help="round-robin slices per cell (default 4)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "jetson"))
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing")
    args = ap.parse_args(argv)
    if not args.report_only:
        atomic_write_json(f"{args.out}.json", run(args))
    atomic_write_bytes(f"{args.out}.md", report(json.loads(Path(f"{args.out}.json").read_text())).encode())
    print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
