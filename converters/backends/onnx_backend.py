"""ONNX fragments: torch's NCHW graphs as exported (fp32) or QDQ-quantized by onnxruntime (int8).

QDQ keeps float inputs and outputs, so ONNX fragments of every precision join
at a float32 NCHW seam; the int8 encoding of the features lives inside each graph.
"""

from __future__ import annotations

from edge_runtime.manifest import TensorSpec

from ..checks import check_onnx
from ..onnx_export import OnnxSource
from ..onnx_quantize import quantize_onnx
from ..schemes import QuantScheme
from .base import FormatBackend, UnitKey
from .registry import register_backend


@register_backend
class OnnxBackend(FormatBackend):
    """fp32: the exported graph; int8: static QDQ quantization calibrated on the pool's own images."""

    name = "onnx"
    title = "ONNX"
    precisions = ("fp32", "int8")
    extension = "onnx"
    nhwc_seam = False
    seam = "float32 NCHW (N, C, H, W); int8 ONNX fragments quantize inside the graph (QDQ), their seam stays float32"

    def fragment_bytes(self, precision: str, key: UnitKey, source: OnnxSource, scheme: QuantScheme | None) -> bytes:
        model = source.model
        if precision == "int8":
            assert scheme is not None, "int8 is always converted under a quantization scheme"
            model = quantize_onnx(model, source.input_name, self.calibration.for_unit(key, "NCHW"), scheme)
        return model.SerializeToString()

    def tensor_specs(self, data: bytes, key: UnitKey, source: OnnxSource) -> tuple[TensorSpec, TensorSpec]:
        # QDQ graphs take and give float32 exactly as the torch export does
        return (TensorSpec(source.input_name, source.input_shape, "float32", "NCHW"),
                TensorSpec(source.output_name, source.output_shape, "float32", "NCHW" if key is None else "NC"))

    def check(self, data: bytes, what: str) -> None:
        check_onnx(data, what)
