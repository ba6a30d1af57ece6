"""ONNX -> TFLite fp32 / fp16 / full-integer int8 through onnx2tf, calibrated on our data.

onnx2tf writes every variant of one graph in one run; it runs in a private
temporary directory with its console output captured, and only the bytes of
the requested files come back.  It turns NCHW image inputs into NHWC; the
NHWC seam graphs from ``onnx_export`` keep their layout (``keep_nhwc``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import onnx

from edge_runtime.manifest import TensorSpec

from .errors import ConvertError
from .onnx_export import OnnxSource
from .schemes import QuantScheme

_VARIANT_FILES = {"fp32": "float32", "fp16": "float16", "int8": "full_integer_quant",
                  "int8_int16act": "full_integer_quant_with_int16_act"}


@dataclass(frozen=True)
class TFLiteModels:
    """The bytes onnx2tf produced for one graph and one weight granularity."""

    fp32: bytes
    fp16: bytes
    int8: bytes
    int8_int16act: bytes

    def for_precision(self, precision: str, scheme: QuantScheme | None) -> bytes:
        if precision != "int8":
            return self.fp32 if precision == "fp32" else self.fp16
        return self.int8_int16act if scheme is not None and scheme.activation_bits == 16 else self.int8


@contextlib.contextmanager
def _captured_output(log_path: Path) -> Iterator[None]:
    """Send stdout and stderr - Python's and the C++ libraries' file descriptors 1 and 2 - to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "wb") as log, contextlib.redirect_stdout(io.StringIO()) as py_out:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            log.write(py_out.getvalue().encode())


def convert_with_onnx2tf(source: OnnxSource, calibration_nhwc: np.ndarray, per_channel: bool,
                         keep_nhwc_input: bool) -> TFLiteModels:
    """Run onnx2tf once; ``calibration_nhwc`` are float inputs exactly as the graph receives them (NHWC)."""
    with tempfile.TemporaryDirectory(prefix="poe-onnx2tf-") as tmp:
        onnx_path, calib_path, out_dir = Path(tmp) / "model.onnx", Path(tmp) / "calib.npy", Path(tmp) / "out"
        onnx.save(source.model, onnx_path)
        np.save(calib_path, np.ascontiguousarray(calibration_nhwc, dtype=np.float32))
        log_path = Path(tmp) / "onnx2tf.log"
        try:
            with _captured_output(log_path):
                import onnx2tf  # first import loads TensorFlow, which logs to fd 2

                onnx2tf.convert(
                    input_onnx_file_path=str(onnx_path), output_folder_path=str(out_dir),
                    output_integer_quantized_tflite=True, quant_type="per-channel" if per_channel else "per-tensor",
                    custom_input_op_name_np_data_path=[[source.input_name, str(calib_path), [[[[0.0]]]], [[[[1.0]]]]]],
                    keep_nwc_or_nhwc_or_ndhwc_input_names=[source.input_name] if keep_nhwc_input else None,
                    copy_onnx_input_output_names_to_tflite=True, non_verbose=True, verbosity="error")
        except (Exception, SystemExit) as exc:  # onnx2tf reports some failures by sys.exit
            tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
            raise ConvertError(f"onnx2tf failed on {source.input_name}->{source.output_name}: {exc!r}; {tail}") from None
        files = {key: out_dir / f"model_{suffix}.tflite" for key, suffix in _VARIANT_FILES.items()}
        missing = [str(p.name) for p in files.values() if not p.is_file()]
        if missing:
            raise ConvertError(f"onnx2tf did not write {', '.join(missing)}")
        return TFLiteModels(**{key: path.read_bytes() for key, path in files.items()})


def _spec(detail: dict, name: str, layout: str) -> TensorSpec:
    dtype = np.dtype(detail["dtype"]).name
    scale, zero_point = detail["quantization"]
    shape = [int(d) for d in detail["shape_signature"]]
    shape[0] = -1
    if dtype == "float32":
        return TensorSpec(name, tuple(shape), dtype, layout)
    return TensorSpec(name, tuple(shape), dtype, layout, float(scale), int(zero_point))


def tflite_io_specs(data: bytes, input_name: str, input_layout: str, output_name: str,
                    output_layout: str) -> tuple[TensorSpec, TensorSpec]:
    """Input and output specs (dtype, shape, scale, zero point) read back from the flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConvertError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
    return _spec(inputs[0], input_name, input_layout), _spec(outputs[0], output_name, output_layout)
