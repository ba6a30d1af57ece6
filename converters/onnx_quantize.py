"""ONNX int8: static QDQ quantization with onnxruntime, calibrated on training images.

QDQ keeps float inputs and outputs, so ONNX int8 fragments join at a float32
seam; the quantization of the features lives inside each graph.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from .schemes import QuantScheme


class ArrayReader(CalibrationDataReader):
    """Feeds one named input from an array, ``batch_size`` rows at a time."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = 64) -> None:
        self.input_name = input_name
        self.batches = [np.ascontiguousarray(data[i:i + batch_size], dtype=np.float32)
                        for i in range(0, len(data), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}


def quantize_onnx(model: onnx.ModelProto, input_name: str, calibration: np.ndarray,
                  scheme: QuantScheme) -> onnx.ModelProto:
    """A QDQ-quantized copy of ``model`` (weights int8; activations uint8, or int16 for ``int16_act``)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice on the root logger for every model
    try:
        return _quantize(model, input_name, calibration, scheme)
    finally:
        root.setLevel(level)


def _quantize(model: onnx.ModelProto, input_name: str, calibration: np.ndarray, scheme: QuantScheme) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="poe-onnx-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(
            model_input=str(src), model_output=str(dst),
            calibration_data_reader=ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ, per_channel=scheme.per_channel,
            activation_type=QuantType.QInt16 if scheme.activation_bits == 16 else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"UseQDQContribOps": scheme.activation_bits == 16})
        return onnx.load(dst)
