"""ONNX fragments: torch's NCHW graphs as exported (fp32), cast to float16 inside (fp16) or QDQ-quantized
by onnxruntime (int8).

fp16 keeps float32 inputs and outputs (``keep_io_types``) and QDQ keeps float inputs and outputs, so
ONNX fragments of every precision join at a float32 NCHW seam; the fp16 or int8 encoding of the
features lives inside each graph.
"""

from __future__ import annotations

from edge_runtime.manifest import TensorSpec

from ..checks import check_onnx
from ..errors import ConvertError
from ..onnx_export import OnnxSource
from ..onnx_fp16 import FP16_MAX, convert_to_fp16, fp16_overflow
from ..onnx_quantize import quantize_onnx
from ..schemes import QuantScheme
from .base import FormatBackend, UnitKey
from .registry import register_backend


@register_backend
class OnnxBackend(FormatBackend):
    """fp32: the exported graph; fp16: float16 inside, float32 at the edges; int8: static QDQ quantization
    calibrated on the pool's own images."""

    name = "onnx"
    title = "ONNX"
    precisions = ("fp32", "fp16", "int8")
    extension = "onnx"
    nhwc_seam = False
    seam = ("float32 NCHW (N, C, H, W); fp16 ONNX fragments cast to float16 inside the graph and int8 ONNX "
            "fragments quantize inside it (QDQ): the seam stays float32 for every precision")

    def fragment_bytes(self, precision: str, key: UnitKey, source: OnnxSource, scheme: QuantScheme | None) -> bytes:
        model = source.model
        if precision == "fp16":
            too_big = fp16_overflow(model)
            if too_big:
                what = "library" if key is None else f"expert {key!r}"
                raise ConvertError(f"onnx fp16 {what}: weights {', '.join(too_big[:3])} exceed float16's range "
                                   f"(|x| > {FP16_MAX:g}); export fp32 or int8 instead")
            model = convert_to_fp16(model)
        elif precision == "int8":
            if scheme is None:
                raise ConvertError("onnx int8 needs a quantization scheme (per_channel or per_tensor); none was chosen")
            model = quantize_onnx(model, source.input_name, self.calibration.for_unit(key, "NCHW"), scheme)
        return model.SerializeToString()

    def tensor_specs(self, data: bytes, key: UnitKey, source: OnnxSource) -> tuple[TensorSpec, TensorSpec]:
        # QDQ and keep_io_types fp16 graphs take and give float32 exactly as the torch export does
        return (TensorSpec(source.input_name, source.input_shape, "float32", "NCHW"),
                TensorSpec(source.output_name, source.output_shape, "float32", "NCHW" if key is None else "NC"))

    def check(self, data: bytes, what: str) -> None:
        check_onnx(data, what)
