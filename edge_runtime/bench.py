"""Latency of one composite on this device: per fragment and in total, for 1..N threads.

Users benchmark on their own boards and bring the JSON back; ``machine_info``
names the board, CPU, Python, numpy and interpreter so that results from
several devices can be gathered into one table (``benchmarks/edge_boards.py``).
Times are wall-clock ``perf_counter`` around each interpreter call (per
fragment) and around the whole ``predict`` (total: preprocessing, fragments,
hand-over and softmax).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .backends import interpreter_version
from .providers import available_providers, parse_providers
from .query import Query
from .runners import native_info_muted
from .runtime import Runtime

BENCH_SCHEMA = "edge-runtime-bench/1"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class BenchConfig:
    bundle: str
    tasks: str  # any form ``Query.parse`` takes; held in canonical form so records of one query compare equal
    backend: str = "auto"
    precision: str = "int8"
    threads: tuple[int, ...] = (1, 2)
    batch: int = 1
    warmup: int = 20
    iterations: int = 200
    providers: str | None = None  # onnxruntime execution providers, "cuda,cpu" (None: onnxruntime's CPU)
    io_binding: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", Query.parse(self.tasks).canonical)
        parsed = parse_providers(self.providers)  # a bad name fails before anything loads
        object.__setattr__(self, "providers", ",".join(parsed) if parsed else None)
        if not self.threads or any(t < 1 for t in self.threads):
            raise ValueError(f"threads must be positive integers, got {list(self.threads)}")
        for name in ("batch", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass
class ThreadResult:
    threads: int
    total_ms: dict[str, float]
    fragments_ms: dict[str, dict[str, float]]
    glue_ms_p50: float  # total minus the fragments' interpreter time: preprocessing, hand-over, softmax
    images_per_s: float
    open_ms: float
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(samples_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    out = {f"p{p}": round(float(np.percentile(ms, p)), 4) for p in PERCENTILES}
    out["mean"] = round(float(ms.mean()), 4)
    return out


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (None where the platform does not say).

    Linux's VmHWM is reset by exec; ``ru_maxrss`` is not (a process started from a big
    parent, e.g. a test runner with torch loaded, inherits the parent's peak).
    """
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine()


def machine_info(backend: str) -> dict[str, Any]:
    """Where a result came from: enough to put several boards side by side."""
    return {"hostname": platform.node(), "board": _read("/proc/device-tree/model") or None,
            "machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "backend": backend, "backend_version": interpreter_version(backend),
            **({"onnxruntime_providers": available_providers()} if backend == "onnxruntime" else {})}


def bench_images(runtime: Runtime, batch: int, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 images of the model's size (latency does not depend on their content)."""
    h, w, c = runtime.manifest.preprocessing.input_shape
    return np.random.default_rng(seed).integers(0, 256, size=(batch, h, w, c), dtype=np.uint8)


def time_predict(runtime: Runtime, images: np.ndarray, warmup: int, iterations: int) -> tuple[list[float], dict[str, list[float]]]:
    """Wall time of whole predictions, and of each fragment inside them."""
    for _ in range(warmup):
        runtime.predict(images)
    totals: list[float] = []
    per_fragment: dict[str, list[float]] = {f.id: [] for f in runtime.selection.fragments}
    for _ in range(iterations):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        runtime.prediction(runtime.logits_from_encoded(runtime.encode(images), timings))
        totals.append(time.perf_counter() - start)
        for key, seconds in timings.items():
            per_fragment[key].append(seconds)
    return totals, per_fragment


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The whole record: machine, what was loaded, and latencies for each thread count."""
    results = []
    describe: dict[str, Any] = {}
    for threads in cfg.threads:
        start = time.perf_counter()
        with native_info_muted():
            runtime = Runtime.open(cfg.bundle, cfg.tasks, cfg.backend, cfg.precision, num_threads=threads,
                                   providers=cfg.providers, io_binding=cfg.io_binding)
        open_ms = (time.perf_counter() - start) * 1000.0
        describe = runtime.describe()
        images = bench_images(runtime, cfg.batch)
        totals, per_fragment = time_predict(runtime, images, cfg.warmup, cfg.iterations)
        total = summarize(totals)
        fragments = {fid: summarize(s) for fid, s in per_fragment.items()}
        glue = float(np.median(np.asarray(totals) - np.sum([per_fragment[f] for f in per_fragment], axis=0))) * 1000
        result = ThreadResult(threads=threads, total_ms=total, fragments_ms=fragments, glue_ms_p50=round(glue, 4),
                              images_per_s=round(cfg.batch / (total["mean"] / 1000.0), 1), open_ms=round(open_ms, 2))
        log(f"threads {threads}: total p50 {total['p50']:.3f} ms, p99 {total['p99']:.3f} ms "
            f"({result.images_per_s:g} images/s)")
        results.append(asdict(result))
    return {"schema": BENCH_SCHEMA, "machine": machine_info(describe.get("backend", cfg.backend)),
            "config": {**asdict(cfg), "threads": list(cfg.threads)}, "loaded": describe,
            "results": results, "peak_rss_bytes": peak_rss_bytes()}


def format_bench(record: dict[str, Any]) -> str:
    """A short human-readable table of one bench record."""
    m, loaded = record["machine"], record["loaded"]
    lines = [f"{m['board'] or m['cpu']} ({m['machine']}, {m['cpu_count']} CPUs), Python {m['python']}, "
             f"numpy {m['numpy']}, {m['backend']} {m['backend_version']}"
             + (f" on {','.join(loaded['providers'])}" + (" (I/O binding)" if loaded.get("io_binding") else "")
                if loaded.get("providers") else ""),
             f"pool {loaded['pool_id']} {loaded['format']} {loaded['precision']} tasks {','.join(loaded['tasks'])}: "
             f"{loaded['bytes']:,} bytes; batch {record['config']['batch']}",
             f"{'threads':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'glue ms':>8} {'img/s':>9}  per fragment p50 ms"]
    for r in record["results"]:
        parts = ", ".join(f"{fid.rsplit('.', 2)[0].removeprefix('expert.') if fid.startswith('expert') else 'library'} "
                          f"{s['p50']:.3f}" for fid, s in r["fragments_ms"].items())
        t = r["total_ms"]
        lines.append(f"{r['threads']:>7} {t['p50']:>8.3f} {t['p90']:>8.3f} {t['p99']:>8.3f} {r['glue_ms_p50']:>8.3f} "
                     f"{r['images_per_s']:>9.1f}  {parts}")
    rss = record.get("peak_rss_bytes")
    if rss:
        lines.append(f"peak RSS {rss / 2**20:.1f} MiB")
    return "\n".join(lines)
