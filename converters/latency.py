"""Per-fragment latency at batch 1, measured on the export machine, for the device's anytime planner.

The edge runtime's budget planner (``edge_runtime/anytime.py``) needs to know
what each stage costs before it runs anything.  These numbers are measured
through the device's own runners (same interpreters, same hand-over from the
library) with one interpreter thread; a device whose speed differs measures
its own with ``edge-runtime run --calibrate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edge_runtime.anytime import measure_latencies
from edge_runtime.manifest import Fragment
from edge_runtime.runners import native_info_muted, open_runner

LATENCY_THREADS = 1
LATENCY_WARMUP = 10
LATENCY_ITERATIONS = 100
LATENCY_CONDITIONS = {"statistic": "median ms per interpreter call", "batch": 1, "threads": LATENCY_THREADS,
                      "iterations": LATENCY_ITERATIONS, "where": "export machine"}


def fragment_latencies(fragments_dir: Path, fragments: Sequence[Fragment]) -> dict[str, float]:
    """Median ms per call of every fragment at batch 1 and one thread, variant by variant."""
    out: dict[str, float] = {}
    variants = sorted({(f.format, f.precision) for f in fragments})
    with native_info_muted():
        for fmt, precision in variants:
            frags = [f for f in fragments if (f.format, f.precision) == (fmt, precision)]
            library = next(f for f in frags if f.role == "library")
            lib = open_runner(fragments_dir, library, LATENCY_THREADS)
            experts = [open_runner(fragments_dir, f, LATENCY_THREADS) for f in frags if f.role == "expert"]
            encoded = np.zeros((1, *lib.input.shape[1:]), dtype=lib.input.dtype)
            out.update(measure_latencies(experts, lib, encoded, LATENCY_WARMUP, LATENCY_ITERATIONS))
    return out
