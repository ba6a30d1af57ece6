"""Edge latency, bytes, memory and accuracy: composed fragments vs the fused graph vs the oracle.

For every backend (TFLite through ai-edge-litert, ONNX Runtime) and precision
(fp32, fp16 on TFLite, int8) and thread count, three ways to answer one query
are timed side by side in one process, interleaved round by round so that
background load hits all of them alike, at batch 1 and with the same
preprocessing and softmax around each:
- composed: the edge runtime (library once, each expert, hand-over, class order);
- fused: the same library and experts as one graph (ONNX: `poe-convert fuse`;
  TFLite: the torch composed model through the same onnx2tf path);
- oracle: the big model the pool came from, converted the same way, restricted
  to the query's classes.
It also reports accuracy on the held-out images of the query's classes (the
oracle restricted to them is the paper's reference), the runtime's agreement
with the torch composed model, bytes on disk, peak RSS (each variant alone in
a child process), speed-ups over the oracle at the *same* precision, and the
share of a matching GEMM probe (``benchmarks/gemm_probe.py``: the same
backend's kernels at the same precision) that the composed model reaches.

    python benchmarks/edge.py --pool runs/demo/pool --fragments runs/demo/fragments --out runs/bench [--quick]   (results in runs/bench/edge/)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Headline, render_section, run_main, section_parser  # noqa: E402
from benchmarks.gemm_probe import probe  # noqa: E402
from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json, sha256_bytes  # noqa: E402
from edge_runtime.bench import cpu_model, peak_rss_bytes, summarize  # noqa: E402
from edge_runtime.encoding import InputEncoder  # noqa: E402
from edge_runtime.images import load_inputs  # noqa: E402
from edge_runtime.manifest import Fragment, Preprocessing, TensorSpec, read_manifest  # noqa: E402
from edge_runtime.runners import Runner, dequantize, native_info_muted, open_runner, to_layout  # noqa: E402
from edge_runtime.runtime import Prediction, Runtime, softmax  # noqa: E402

VARIANTS = [("ai_edge_litert", "tflite", "fp32"), ("ai_edge_litert", "tflite", "fp16"),
            ("ai_edge_litert", "tflite", "int8"), ("onnxruntime", "onnx", "fp32"), ("onnxruntime", "onnx", "int8")]
KINDS = ("composed", "fused", "oracle")
QUICK_QUERIES = ("footwear,tops",)
FULL_QUERIES = ("footwear,tops", "bottoms,bags", "tops,bottoms,footwear", "bags,bottoms,footwear,tops")
TARGETS = {"composed_vs_fused_overhead_max": 0.10, "int8_composed_vs_oracle_fp32_speedup_min": 3.0,
           "accuracy_loss_vs_restricted_oracle_max_points": 1.0, "int8_top1_agreement_min": 0.99}


# ----------------------------------------------------------------------------- single-graph models
@dataclass
class SingleModel:
    """One graph image -> logits (fused query or oracle), fed and post-processed exactly like the runtime."""

    runner: Runner
    encoder: InputEncoder
    columns: np.ndarray | None  # oracle: the query's class columns; fused: None (already in class order)

    @classmethod
    def open(cls, cache: Path, fragment: Fragment, threads: int, backend: str, pre: Preprocessing,
             columns: np.ndarray | None = None) -> "SingleModel":
        runner = open_runner(cache, fragment, threads, backend)
        return cls(runner, InputEncoder(pre, runner.input), columns)

    def logits(self, images: np.ndarray) -> np.ndarray:
        raw = self.runner.run_raw(self.encoder(load_inputs(images, self.encoder.pre)))
        out = dequantize(raw, self.runner.output)
        return out if self.columns is None else out[:, self.columns]

    def predict(self, images: np.ndarray, host: Runtime) -> Prediction:
        """The same post-processing (softmax, class ids, labels) as the composed runtime ``host``."""
        return host.prediction(self.logits(images))


def _fragment_for(name: str, data: bytes, fmt: str, precision: str, in_spec: TensorSpec,
                  out_spec: TensorSpec, rel: str) -> Fragment:
    return Fragment(id=name, role="library", format=fmt, precision=precision, file=rel, sha256=sha256_bytes(data),
                    bytes=len(data), inputs=(in_spec,), outputs=(out_spec,))


def convert_single(module, name: str, chw: tuple[int, int, int], calib_nchw: np.ndarray, cache: Path,
                   log: Callable[[str], None]) -> dict[tuple[str, str], Fragment]:
    """A torch image classifier as ONNX fp32/int8 and TFLite fp32/fp16/int8 files under ``cache``."""
    from converters.onnx_export import export_classifier
    from converters.onnx_quantize import quantize_onnx
    from converters.schemes import SCHEMES
    from converters.tflite_convert import convert_with_onnx2tf, tflite_io_specs

    index = cache / f"{name}.json"
    if index.is_file():
        raw = json.loads(index.read_text())
        return {tuple(k.split("/")): Fragment.from_json(v) for k, v in raw.items()}  # type: ignore[misc]
    start = time.perf_counter()
    source = export_classifier(module, chw)
    n_out = source.output_shape[1]
    onnx_in = TensorSpec(source.input_name, source.input_shape, "float32", "NCHW")
    onnx_out = TensorSpec(source.output_name, (-1, n_out), "float32", "NC")
    files: dict[tuple[str, str], tuple[bytes, TensorSpec, TensorSpec]] = {
        ("onnx", "fp32"): (source.model.SerializeToString(), onnx_in, onnx_out),
        ("onnx", "int8"): (quantize_onnx(source.model, source.input_name, calib_nchw,
                                         SCHEMES["per_channel"]).SerializeToString(), onnx_in, onnx_out)}
    tflite = convert_with_onnx2tf(source, to_layout(calib_nchw, "NCHW", "NHWC"), per_channel=True,
                                  keep_nhwc_input=False)
    for precision in ("fp32", "fp16", "int8"):
        data = tflite.for_precision(precision, SCHEMES["per_channel"])
        files[("tflite", precision)] = (data, *tflite_io_specs(data, source.input_name, "NHWC",
                                                               source.output_name, "NC"))
    fragments = {}
    for (fmt, precision), (data, in_spec, out_spec) in files.items():
        rel = f"{name}.{precision}.{fmt}"
        atomic_write_bytes(cache / rel, data)
        fragments[(fmt, precision)] = _fragment_for(f"{name}.{fmt}.{precision}", data, fmt, precision, in_spec,
                                                    out_spec, rel)
    atomic_write_json(index, {f"{k[0]}/{k[1]}": _fragment_json(v) for k, v in fragments.items()})
    log(f"converted {name} to ONNX + TFLite in {time.perf_counter() - start:.1f} s")
    return fragments


def _fragment_json(frag: Fragment) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(frag)


def fused_onnx(fragments_dir: Path, query: str, precision: str, cache: Path, pre: Preprocessing) -> Fragment:
    """The product's own fused graph (`poe-convert fuse`) for ONNX."""
    from converters.fuse import fuse_query

    rel = f"fused_{query.replace(',', '_')}.{precision}.onnx"
    fused = fuse_query(fragments_dir, query.split(","), cache / rel, precision)
    data = (cache / rel).read_bytes()
    h, w, c = pre.input_shape
    return _fragment_for(f"fused.{query}.onnx.{precision}", data, "onnx", precision,
                         TensorSpec("image", (-1, c, h, w), "float32", "NCHW"),
                         TensorSpec("logits", (-1, len(fused.class_ids)), "float32", "NC"), rel)


# ----------------------------------------------------------------------------- measurements
def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Latency of each call, measured round-robin so that drift and background load hit all alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            samples[key].append(time.perf_counter() - start)
    return {k: summarize(v) for k, v in samples.items()}


def count_macs(module, chw: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear (what dominates these CNNs)."""
    import torch
    from torch import nn

    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += output.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += output.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(torch.zeros(1, *chw))
    for h in handles:
        h.remove()
    return total


def rss_in_child(kind: str, args: dict[str, Any]) -> int | None:
    """Peak RSS of a fresh process that loads one variant and predicts 50 images (nothing else loaded)."""
    payload = json.dumps({"kind": kind, **args})
    out = subprocess.run([sys.executable, __file__, "--rss-child", payload], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return int(out.stdout.strip().splitlines()[-1])


def _rss_child(payload: str) -> int:
    args = json.loads(payload)
    images = np.zeros((1, *args["hwc"]), np.uint8)
    with native_info_muted():
        if args["kind"] == "composed":
            rt = Runtime.open(args["bundle"], args["query"], args["backend"], args["precision"], num_threads=1)
            call = lambda: rt.predict(images)  # noqa: E731
        else:
            model = SingleModel.open(Path(args["dir"]), Fragment.from_json(args["fragment"]), 1, args["backend"],
                                     read_manifest(args["bundle"]).preprocessing)
            call = lambda: softmax(model.logits(images))  # noqa: E731
    for _ in range(50):
        call()
    print(peak_rss_bytes())
    return 0


# ----------------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from converters.calibration import calibration_images, evaluation_images, torch_outputs
    from pool_builder.pool.consolidate import consolidate
    from pool_builder.pool.loader import Pool

    torch.set_num_threads(2)
    pool = Pool.open(args.pool)
    manifest = read_manifest(args.fragments)
    pre = manifest.preprocessing
    queries = tuple(args.queries.split(";")) if args.queries else (QUICK_QUERIES if args.quick else FULL_QUERIES)
    cache = Path(args.out) / "models"
    cache.mkdir(parents=True, exist_ok=True)
    chw = tuple(pool.meta.dataset.input_shape)
    calib = calibration_images(pool, 200)
    evaluation = evaluation_images(pool, None)
    uint8_images, labels = _held_out_uint8(pool)
    if not np.array_equal(labels, evaluation.labels):
        raise RuntimeError("held-out images differ between the runtime's and the converters' view of the pool")

    oracle_module = pool.oracle()
    oracle_frags = convert_single(oracle_module, "oracle", chw, calib.images, cache, log)
    oracle_logits_torch = torch_outputs(oracle_module, evaluation.images)
    probes = {(fmt, prec, t): probe(fmt, prec, t) for _b, fmt, prec in VARIANTS for t in args.threads}
    log("GEMM probes: " + "; ".join(f"{p.name}: {p.gops:.1f} G/s" for p in probes.values()))
    results: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    fused_frags: dict[tuple[str, str, str], Fragment] = {}
    for query in queries:
        composed_torch = consolidate(pool, query)
        class_ids = np.asarray(composed_torch.class_ids)
        mask = np.isin(labels, class_ids)
        q_images, q_labels = uint8_images[mask], labels[mask]
        torch_logits = torch_outputs(composed_torch.model, evaluation.images[mask])
        restricted = float(np.mean(class_ids[np.argmax(oracle_logits_torch[mask][:, class_ids], 1)] == q_labels))
        macs = {"composed": count_macs(composed_torch.model, chw), "oracle": count_macs(oracle_module, chw)}
        fused_tflite = convert_single(composed_torch.model, f"fused_{query.replace(',', '_')}", chw, calib.images,
                                      cache, log)
        for backend, fmt, precision in VARIANTS:
            fused_frag = (fused_onnx(Path(args.fragments), query, precision, cache, pre)
                          if fmt == "onnx" else fused_tflite[(fmt, precision)])
            fused_frags[(query, fmt, precision)] = fused_frag
            oracle_frag = oracle_frags[(fmt, precision)]
            acc_row = {"query": query, "backend": backend, "format": fmt, "precision": precision,
                       "images": int(mask.sum()), "restricted_oracle_torch": restricted}
            for threads in args.threads:
                with native_info_muted():
                    composed = Runtime.open(args.fragments, query, backend, precision, num_threads=threads)
                    fused = SingleModel.open(cache, fused_frag, threads, backend, pre)
                    oracle = SingleModel.open(cache, oracle_frag, threads, backend, pre, class_ids)
                one = q_images[:1]
                timing = time_interleaved({"composed": lambda: composed.predict(one),
                                           "fused": lambda: fused.predict(one, composed),
                                           "oracle": lambda: oracle.predict(one, composed)},
                                          rounds=args.rounds, warmup=args.warmup)
                row = {"query": query, "backend": backend, "format": fmt, "precision": precision,
                       "threads": threads, "latency_ms": timing,
                       "bytes": {"composed": composed.selection.bytes, "fused": fused_frag.bytes,
                                 "oracle": oracle_frag.bytes},
                       "macs": macs}
                gemm = probes[(fmt, precision, threads)]
                row["gemm_probe"] = {"name": gemm.name, "gops": gemm.gops}
                row["overhead_vs_fused"] = timing["composed"]["p50"] / timing["fused"]["p50"] - 1.0
                row["speedup_vs_oracle_same_precision"] = timing["oracle"]["p50"] / timing["composed"]["p50"]
                row["composed_gflops"] = 2 * macs["composed"] / (timing["composed"]["p50"] / 1000) / 1e9
                row["fraction_of_peak"] = row["composed_gflops"] / gemm.gops
                results.append(row)
                log(f"{query:<28} {fmt:>6} {precision} t{threads}: composed {timing['composed']['p50']:.3f} ms, "
                    f"fused {timing['fused']['p50']:.3f} ms ({row['overhead_vs_fused'] * 100:+.1f}%), "
                    f"oracle {timing['oracle']['p50']:.3f} ms")
                if threads == args.threads[0]:
                    got = composed.predict(q_images)
                    acc_row["composed"] = float(np.mean(got.class_ids == q_labels))
                    acc_row["composed_top1_agreement_with_torch"] = float(
                        np.mean(got.logits.argmax(1) == torch_logits.argmax(1)))
                    acc_row["composed_max_abs_logit_error"] = float(np.max(np.abs(got.logits - torch_logits)))
                    acc_row["fused"] = float(np.mean(fused.predict(q_images, composed).class_ids == q_labels))
                    acc_row["oracle_restricted"] = float(np.mean(
                        oracle.predict(q_images, composed).class_ids == q_labels))
            accuracy.append(acc_row)
    rss = []
    first = queries[0]
    for backend, fmt, precision in VARIANTS:
        fused_frag = fused_frags[(first, fmt, precision)]
        common = {"bundle": str(args.fragments), "query": first, "backend": backend, "precision": precision,
                  "hwc": list(pre.input_shape), "dir": str(cache)}
        rss.append({"backend": backend, "format": fmt, "precision": precision, "query": first,
                    "composed": rss_in_child("composed", common),
                    "fused": rss_in_child("single", {**common, "fragment": _fragment_json(fused_frag)}),
                    "oracle": rss_in_child("single", {**common, "fragment": _fragment_json(
                        oracle_frags[(fmt, precision)])})})
    return {"machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                        "numpy": np.__version__, "load_average": os.getloadavg()},
            "pool_id": manifest.pool_id, "queries": list(queries), "threads": list(args.threads),
            "rounds": args.rounds, "targets": TARGETS, "latency": results, "accuracy": accuracy, "peak_rss": rss,
            "gemm_probes": [{"format": f, "precision": pr, "threads": t, "name": p.name, "gops": p.gops}
                            for (f, pr, t), p in probes.items()]}


def _held_out_uint8(pool) -> tuple[np.ndarray, np.ndarray]:
    from pool_builder.pool.evaluate import held_out_split

    split = held_out_split(pool)
    return split.images, split.labels


# ----------------------------------------------------------------------------- report
def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The ratios the issues name as targets, from the first thread count."""
    t0 = result["threads"][0]
    lat = [r for r in result["latency"] if r["threads"] == t0]
    overheads = [r["overhead_vs_fused"] for r in lat]
    int8_overheads = [r["overhead_vs_fused"] for r in lat if r["format"] == "tflite" and r["precision"] == "int8"]
    speedups = []
    for q in result["queries"]:
        oracle_fp32 = next(r for r in lat if r["query"] == q and r["format"] == "tflite" and r["precision"] == "fp32")
        int8 = next(r for r in lat if r["query"] == q and r["format"] == "tflite" and r["precision"] == "int8")
        speedups.append(oracle_fp32["latency_ms"]["oracle"]["p50"] / int8["latency_ms"]["composed"]["p50"])
    int8_acc = [a for a in result["accuracy"] if a["precision"] == "int8"]

    def same(precision: str) -> float:
        return float(min(r["speedup_vs_oracle_same_precision"] for r in lat
                         if r["format"] == "tflite" and r["precision"] == precision))

    return {"threads": t0, "tflite_int8_vs_oracle_int8_speedup_min": same("int8"),
            "tflite_fp32_vs_oracle_fp32_speedup_min": same("fp32"), "composed_vs_fused_overhead_median": float(np.median(overheads)),
            "composed_vs_fused_overhead_max": float(max(overheads)),
            "tflite_int8_composed_vs_fused_overhead_max": float(max(int8_overheads)),
            "tflite_int8_composed_vs_oracle_fp32_speedup_min": float(min(speedups)),
            "int8_accuracy_loss_vs_restricted_oracle_points_max": float(max(
                (a["restricted_oracle_torch"] - a["composed"]) * 100 for a in int8_acc)),
            # The TFLite headline is judged on TFLite's own loss, not on the worst of every int8 backend.
            "tflite_int8_accuracy_loss_vs_restricted_oracle_points_max": float(max(
                (a["restricted_oracle_torch"] - a["composed"]) * 100 for a in int8_acc if a["format"] == "tflite")),
            "int8_top1_agreement_with_torch_min": float(min(a["composed_top1_agreement_with_torch"]
                                                            for a in int8_acc)),
            "fp32_max_abs_logit_error": float(max(a["composed_max_abs_logit_error"] for a in result["accuracy"]
                                                  if a["precision"] == "fp32")),
            "fraction_of_gemm_peak_tflite_int8": float(np.median(
                [r["fraction_of_peak"] for r in lat if r["format"] == "tflite" and r["precision"] == "int8"])),
            "fraction_of_gemm_peak_tflite_fp32": float(np.median(
                [r["fraction_of_peak"] for r in lat if r["format"] == "tflite" and r["precision"] == "fp32"])),
            "probe_tflite_int8": next(r["gemm_probe"]["name"] for r in lat
                                      if r["format"] == "tflite" and r["precision"] == "int8"),
            "probe_tflite_fp32": next(r["gemm_probe"]["name"] for r in lat
                                      if r["format"] == "tflite" and r["precision"] == "fp32")}


def headlines(result: dict[str, Any]) -> list[Headline]:
    """The edge claims for the report's summary table."""
    h = headline(result)
    t = h["threads"]
    speedup = h["tflite_int8_composed_vs_oracle_fp32_speedup_min"]
    loss = h["tflite_int8_accuracy_loss_vs_restricted_oracle_points_max"]
    same8, same32 = h["tflite_int8_vs_oracle_int8_speedup_min"], h["tflite_fp32_vs_oracle_fp32_speedup_min"]
    return [
        Headline(f"TFLite composed vs oracle at the same precision, {t} thread (worst query): int8 vs int8",
                 f"{same8:.2f}x faster, {loss:+.2f} pts vs restricted oracle",
                 f">= {TARGETS['int8_composed_vs_oracle_fp32_speedup_min']:g}x at <= "
                 f"{TARGETS['accuracy_loss_vs_restricted_oracle_max_points']:g} pt loss",
                 same8 >= TARGETS["int8_composed_vs_oracle_fp32_speedup_min"]
                 and loss <= TARGETS["accuracy_loss_vs_restricted_oracle_max_points"], same8),
        Headline(f"TFLite composed fp32 vs oracle fp32, {t} thread (worst query)", f"{same32:.2f}x faster", "-", None,
                 same32),
        Headline(f"TFLite int8 composed vs oracle fp32 (mixed precision, for comparison with older reports)",
                 f"{speedup:.2f}x faster", "-", None, speedup),
        Headline(f"composed vs fused overhead, TFLite int8, {t} thread (worst query)",
                 f"{h['tflite_int8_composed_vs_fused_overhead_max'] * 100:+.1f}%",
                 f"<= +{TARGETS['composed_vs_fused_overhead_max'] * 100:.0f}%",
                 h["tflite_int8_composed_vs_fused_overhead_max"] <= TARGETS["composed_vs_fused_overhead_max"],
                 h["tflite_int8_composed_vs_fused_overhead_max"]),
        Headline(f"composed vs fused overhead, every backend and precision, {t} thread (worst)",
                 f"{h['composed_vs_fused_overhead_max'] * 100:+.1f}% (median {h['composed_vs_fused_overhead_median'] * 100:+.1f}%)",
                 f"<= +{TARGETS['composed_vs_fused_overhead_max'] * 100:.0f}%",
                 h["composed_vs_fused_overhead_max"] <= TARGETS["composed_vs_fused_overhead_max"],
                 h["composed_vs_fused_overhead_max"]),
        Headline("int8 top-1 agreement with the torch composed model (worst query)",
                 f"{h['int8_top1_agreement_with_torch_min'] * 100:.2f}%",
                 f">= {TARGETS['int8_top1_agreement_min'] * 100:.0f}%",
                 h["int8_top1_agreement_with_torch_min"] >= TARGETS["int8_top1_agreement_min"],
                 h["int8_top1_agreement_with_torch_min"]),
        Headline(f"TFLite int8 composed: share of the int8 probe ({h['probe_tflite_int8']})",
                 f"{h['fraction_of_gemm_peak_tflite_int8'] * 100:.1f}%", "-", None,
                 h["fraction_of_gemm_peak_tflite_int8"]),
        Headline(f"TFLite fp32 composed: share of the fp32 probe ({h['probe_tflite_fp32']})",
                 f"{h['fraction_of_gemm_peak_tflite_fp32'] * 100:.1f}%", "-", None,
                 h["fraction_of_gemm_peak_tflite_fp32"]),
    ]


def markdown(result: dict[str, Any], plots: Sequence[str]) -> str:
    h = headline(result)
    m = result["machine"]
    lines = ["# Edge: composed fragments vs fused graph vs oracle", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, Python {m['python']}, numpy {m['numpy']} "
             f"(load average at the end {', '.join(f'{v:.1f}' for v in m['load_average'])}). Pool {result['pool_id']}; "
             f"batch 1; {result['rounds']} interleaved rounds; latency = preprocessing + model(s) + softmax.", "",
             f"- Composition overhead vs the fused graph at {h['threads']} thread: median "
             f"{h['composed_vs_fused_overhead_median'] * 100:+.1f}%, worst {h['composed_vs_fused_overhead_max'] * 100:+.1f}% "
             f"(target <= +{TARGETS['composed_vs_fused_overhead_max'] * 100:.0f}%).",
             f"- Composed vs oracle at the same precision (TFLite, worst query): int8 vs int8 "
             f"{h['tflite_int8_vs_oracle_int8_speedup_min']:.2f}x, fp32 vs fp32 "
             f"{h['tflite_fp32_vs_oracle_fp32_speedup_min']:.2f}x (target >= "
             f"{TARGETS['int8_composed_vs_oracle_fp32_speedup_min']:g}x, judged int8 vs int8); int8 composed vs fp32 "
             f"oracle {h['tflite_int8_composed_vs_oracle_fp32_speedup_min']:.2f}x mixes two effects and is shown "
             "for comparison with older reports only.",
             f"- int8 accuracy loss vs the restricted oracle: at most "
             f"{h['int8_accuracy_loss_vs_restricted_oracle_points_max']:.2f} points (TFLite int8: "
             f"{h['tflite_int8_accuracy_loss_vs_restricted_oracle_points_max']:.2f}; this includes the fp32 composed "
             f"model's own distillation gap, in the accuracy table below); int8 top-1 agreement with the torch "
             f"composed model: >= {h['int8_top1_agreement_with_torch_min'] * 100:.2f}%; fp32 max |logit error| "
             f"{h['fp32_max_abs_logit_error']:.1e}.",
             f"- Hardware use at batch 1: TFLite int8 composed reaches {h['fraction_of_gemm_peak_tflite_int8'] * 100:.1f}% "
             f"of {h['probe_tflite_int8']}, fp32 composed {h['fraction_of_gemm_peak_tflite_fp32'] * 100:.1f}% of "
             f"{h['probe_tflite_fp32']} (each backend and precision against its own probe, per row below). Probes: "
             + "; ".join(f"{p['name']} {p['gops']:.1f} G/s" for p in result.get("gemm_probes", []))
             + ". Model ops = 2 x multiply-accumulates of its convolutions and linear layers.", "",
             "| query | backend | precision | threads | composed p50 / p99 ms | fused p50 ms | oracle p50 ms | "
             "overhead vs fused | speed-up vs oracle (same precision) | share of probe | composed / fused / oracle "
             "bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["latency"]:
        lat, b = r["latency_ms"], r["bytes"]
        lines.append(f"| {r['query']} | {r['format']} | {r['precision']} | {r['threads']} | "
                     f"{lat['composed']['p50']:.3f} / {lat['composed']['p99']:.3f} | {lat['fused']['p50']:.3f} | "
                     f"{lat['oracle']['p50']:.3f} | {r['overhead_vs_fused'] * 100:+.1f}% | "
                     f"{r['speedup_vs_oracle_same_precision']:.2f}x | {r['fraction_of_peak'] * 100:.1f}% | "
                     f"{b['composed']:,} / {b['fused']:,} / {b['oracle']:,} |")
    lines += ["", "| query | backend | precision | images | composed acc | fused acc | oracle restricted acc "
              "(torch) | agreement with torch | max abs logit err |", "|---|---|---|---|---|---|---|---|---|"]
    for a in result["accuracy"]:
        lines.append(f"| {a['query']} | {a['format']} | {a['precision']} | {a['images']} | {a['composed'] * 100:.2f}% | "
                     f"{a['fused'] * 100:.2f}% | {a['oracle_restricted'] * 100:.2f}% "
                     f"({a['restricted_oracle_torch'] * 100:.2f}%) | "
                     f"{a['composed_top1_agreement_with_torch'] * 100:.2f}% | {a['composed_max_abs_logit_error']:.1e} |")
    lines += ["", "Peak RSS of a process that loads one variant and predicts (MiB):", "",
              "| backend | precision | composed | fused | oracle |", "|---|---|---|---|---|"]
    for r in result["peak_rss"]:
        cells = [f"{r[k] / 2**20:.1f}" if r[k] else "n/a" for k in KINDS]
        lines.append(f"| {r['format']} | {r['precision']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    t0 = result["threads"][0]
    query = result["queries"][0]
    rows = [r for r in result["latency"] if r["threads"] == t0 and r["query"] == query]
    labels = [f"{r['format']}\n{r['precision']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, kind in enumerate(KINDS):
        ax.bar(x + (i - 1) * 0.27, [r["latency_ms"][kind]["p50"] for r in rows], 0.27, label=kind)
    ax.set_xticks(x, labels)
    ax.set_ylabel("p50 latency, batch 1 (ms)")
    ax.set_title(f"{query}, {t0} thread: composed vs fused vs oracle")
    ax.legend()
    fig.tight_layout()
    path = out / "edge_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


SECTION = "edge"


def main(argv: Sequence[str] | None = None) -> int:
    ap = section_parser("edge.py", __doc__, SECTION, "one query, fewer rounds")
    ap.add_argument("--fragments", default="runs/demo/fragments", help="the pool's exported fragments")
    ap.add_argument("--queries", help="';'-separated queries (default: the demo's)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child)
    try:
        args.threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        ap.error(f"--threads takes a comma list of integers, got {args.threads!r}")
    args.rounds = args.rounds or (300 if args.quick else 1000)
    for path, what in ((args.pool, "pool.json"), (args.fragments, "manifest.json")):
        if not (Path(path) / what).is_file():
            ap.error(f"{path}/{what} not found; run `make demo` first (it builds the pool and its fragments)")
    out = Path(args.out) / SECTION
    args.out = str(out)  # run() keeps its converted models in OUT/edge/models
    start = time.perf_counter()
    result = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["wall_seconds"] = time.perf_counter() - start
    render_section(out, result, plot, markdown, headlines)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
