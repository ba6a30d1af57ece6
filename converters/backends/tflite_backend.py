"""TFLite fragments: fp32, fp16 and full-integer int8 from onnx2tf, cross-checked in tflite-runtime.

The graphs handed to onnx2tf already meet in NHWC (see ``onnx_export``), so
the library's output spec can equal each expert's input spec and int8
features pass between them without requantizing.  onnx2tf writes every
precision of one graph in one run; the runs are cached per graph and weight
granularity, so fp32, fp16 and int8 of a graph cost one conversion.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_runtime.manifest import Fragment, TensorSpec
from edge_runtime.runners import dequantize, open_runner, quantize, to_layout

from ..agreement import TOLERANCES, Reference
from ..checks import check_tflite_ops, run_in_tflite_runtime
from ..onnx_export import OnnxSource
from ..schemes import QuantScheme
from ..tflite_convert import TFLiteModels, convert_with_onnx2tf, tflite_io_specs
from .base import Calibration, FormatBackend, Log, UnitKey
from .registry import register_backend


@register_backend
class TFLiteBackend(FormatBackend):
    """onnx2tf conversions calibrated on the pool's own images; only builtin ops allowed."""

    name = "tflite"
    title = "TFLite"
    precisions = ("fp32", "fp16", "int8")
    extension = "tflite"
    nhwc_seam = True
    seam = ("NHWC (N, H, W, C); full-integer int8 fragments exchange int8 with the scale/zero_point in each "
            "tensor spec: when an expert's input spec equals the library's output spec the bytes pass through, "
            "otherwise the runtime requantizes (dequantize with the library's, quantize with the expert's)")
    second_runtime = "tflite-runtime"

    def __init__(self, calibration: Calibration, log: Log) -> None:
        super().__init__(calibration, log)
        self._runs: dict[tuple[UnitKey, bool], TFLiteModels] = {}

    def fragment_bytes(self, precision: str, key: UnitKey, source: OnnxSource, scheme: QuantScheme | None) -> bytes:
        per_channel = scheme.per_channel if scheme is not None else True
        run = (key, per_channel)
        if run not in self._runs:
            t0 = time.perf_counter()
            self._runs[run] = convert_with_onnx2tf(source, self.calibration.for_unit(key, "NHWC"), per_channel,
                                                   keep_nhwc_input=key is not None)
            self.log(f"  onnx2tf {'library' if key is None else 'expert ' + key} "
                     f"({'per-channel' if per_channel else 'per-tensor'}): {time.perf_counter() - t0:.1f} s")
        return self._runs[run].for_precision(precision, scheme)

    def tensor_specs(self, data: bytes, key: UnitKey, source: OnnxSource) -> tuple[TensorSpec, TensorSpec]:
        # onnx2tf turns the NCHW image input into NHWC
        return tflite_io_specs(data, source.input_name, "NHWC", source.output_name, "NHWC" if key is None else "NC")

    def check(self, data: bytes, what: str) -> None:
        check_tflite_ops(data, what)

    @classmethod
    def cross_check(cls, fragments_dir: Path, fragments: Sequence[Fragment], ref: Reference,
                    threads: int | None) -> list[str]:
        """Every TFLite fragment must give tflite-runtime the same raw outputs as ai-edge-litert."""
        frags = [f for f in fragments if f.format == cls.name]
        jobs, expected = [], []
        for frag in frags:
            runner = open_runner(fragments_dir, frag, threads)
            source = ref.images_nchw[:8] if frag.role == "library" else ref.features_nchw[:8]
            x = quantize(to_layout(source, "NCHW", runner.input.layout), runner.input)
            jobs.append((fragments_dir / frag.file, x))
            expected.append(runner.run_raw(x))
        outputs = run_in_tflite_runtime(jobs)
        failures = []
        for frag, got, want in zip(frags, outputs, expected):
            got_f, want_f = dequantize(got, frag.outputs[0]), dequantize(want, frag.outputs[0])
            diff = float(np.max(np.abs(got_f - want_f)))
            relative = diff / (float(np.max(np.abs(want_f))) + 1e-6)
            frag.agreement["tflite_runtime_max_abs_diff"] = diff
            # the two runtimes use different int8 kernels, whose rounding may differ by a few steps
            limit = TOLERANCES["tflite_runtime"]["max_relative_diff_" + ("int" if frag.outputs[0].quantized else "float")]
            if relative > limit:
                failures.append(f"{frag.id}: tflite-runtime output differs from ai-edge-litert by {diff:.3g} "
                                f"({relative:.1%} of the output range; limit {limit:.1%})")
        return failures
