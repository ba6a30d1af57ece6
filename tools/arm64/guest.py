"""Runs INSIDE the emulated aarch64 Python (and, for the reference, on x86): logits of every image.

Imports only the standard library, numpy and ``edge_runtime`` - exactly what a
Pi has - and writes, per precision, the composite logits over all tasks as
``<precision>.npy`` plus ``meta.json`` (machine, versions, int8 step, seconds).
Kept to one process: qemu-user cannot follow ``execve`` of aarch64 programs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_runtime.atomic_io import atomic_write_json


def int8_output_step(manifest: Any, tasks: Sequence[str]) -> float | None:
    """One quantization step of the queried experts' int8 outputs (the largest), from the manifest.

    ONNX int8 fragments dequantize inside the graph and carry no output scale;
    the same expert's TFLite int8 fragment, quantized from the same calibration,
    gives the step then.
    """
    scales = [o.scale for f in manifest.fragments if f.role == "expert" and f.task in tasks
              and f.precision == "int8" for o in f.outputs if o.scale]
    return max(scales) if scales else None


def predict_all(bundle: str, images: np.ndarray, tasks: str, backend: str, precisions: Sequence[str],
                fp32_images: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Composite logits per precision and what produced them; fp32 on the first ``fp32_images`` only
    (float kernels are the slow part of emulation)."""
    from edge_runtime.backends import interpreter_version
    from edge_runtime.runners import native_info_muted
    from edge_runtime.runtime import Runtime

    logits, meta = {}, {"machine": platform.machine(), "python": platform.python_version(),
                        "numpy": np.__version__, "backend": backend, "version": interpreter_version(backend),
                        "seconds": {}, "int8_step": None}
    for precision in precisions:
        start = time.perf_counter()
        with native_info_muted():
            runtime = Runtime.open(bundle, tasks, backend, precision, num_threads=1)
        batch = images[:fp32_images] if precision != "int8" else images
        logits[precision] = runtime.predict(batch, "NHWC").logits.astype(np.float32)
        meta["seconds"][precision] = round(time.perf_counter() - start, 3)
        if precision == "int8":
            meta["int8_step"] = int8_output_step(runtime.manifest, runtime.tasks)
    return logits, meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", required=True, help=".npy of uint8 images, NHWC")
    p.add_argument("--tasks", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--fp32-images", type=int, help="run fp32 on the first N images only (default: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logits, meta = predict_all(args.bundle, np.load(args.images, allow_pickle=False), args.tasks, args.backend,
                               args.precisions.split(","), args.fp32_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for precision, values in logits.items():
        np.save(out / f"{precision}.npy", values)
    atomic_write_json(out / "meta.json", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
