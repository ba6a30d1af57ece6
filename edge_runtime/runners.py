"""Run one verified fragment with the interpreter that is installed, nothing else.

A runner owns one interpreter, built once and kept (never rebuilt per call),
and knows from the manifest how to quantize its input and dequantize its
output.  The converters measure agreement through these same runners, so the
numbers in the manifest are what a device computes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from .manifest import Fragment, ManifestError, TensorSpec, check_choice, verified_path

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
TFLITE_INTERPRETERS = ("ai_edge_litert", "tflite_runtime")


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float values -> the integer encoding ``spec`` describes (identity for float tensors)."""
    if not spec.quantized:
        return np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = _INT_RANGES[spec.dtype]
    q = np.round(np.asarray(x, dtype=np.float32) / np.float32(spec.scale)) + spec.zero_point
    return np.clip(q, lo, hi).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if not spec.quantized:
        return np.asarray(q, dtype=np.float32)
    return (q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)


def pass_between(values: np.ndarray, produced: TensorSpec, consumed: TensorSpec) -> np.ndarray:
    """Hand one fragment's raw output to the next: as is when encodings match, else via float."""
    if consumed.same_encoding(produced):
        return values
    as_float = dequantize(values, produced)
    if produced.layout != consumed.layout:
        as_float = to_layout(as_float, produced.layout, consumed.layout)
    return quantize(as_float, consumed)


def to_layout(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst or x.ndim != 4:
        return x
    if (src, dst) == ("NCHW", "NHWC"):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if (src, dst) == ("NHWC", "NCHW"):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise ManifestError(f"cannot convert layout {src} to {dst}")


def _tflite_interpreter_class(name: str) -> Callable[..., Any]:
    check_choice("TFLite interpreter", name, TFLITE_INTERPRETERS)
    module = "ai_edge_litert.interpreter" if name == "ai_edge_litert" else "tflite_runtime.interpreter"
    try:
        return importlib.import_module(module).Interpreter
    except ImportError:
        raise ManifestError(f"TFLite interpreter {name!r} is not installed (pip install "
                            f"{'ai-edge-litert' if name == 'ai_edge_litert' else 'tflite-runtime'})") from None


class TFLiteRunner:
    """A TFLite fragment; the batch dimension is resized on demand (the interpreter is kept)."""

    def __init__(self, path: Path, fragment: Fragment, threads: int | None = None,
                 interpreter: str = "ai_edge_litert") -> None:
        self.fragment = fragment
        self.input, self.output = fragment.inputs[0], fragment.outputs[0]
        cls = _tflite_interpreter_class(interpreter)
        self._interp = cls(model_path=str(path), num_threads=threads)
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]
        self._out_index = self._interp.get_output_details()[0]["index"]
        self._batch = int(self._in["shape"][0])

    def ops(self) -> list[str]:
        return sorted({op["op_name"] for op in self._interp._get_ops_details()})

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self._batch:
            self._interp.resize_tensor_input(self._in["index"], [x.shape[0], *x.shape[1:]], strict=True)
            self._interp.allocate_tensors()
            self._batch = x.shape[0]
        self._interp.set_tensor(self._in["index"], np.ascontiguousarray(x))
        self._interp.invoke()
        return self._interp.get_tensor(self._out_index).copy()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float input in the fragment's layout -> float output."""
        return dequantize(self.run_raw(quantize(x, self.input)), self.output)


class OnnxRunner:
    """An ONNX fragment in onnxruntime (CPU)."""

    def __init__(self, path: Path, fragment: Fragment, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ManifestError("onnxruntime is not installed (pip install onnxruntime)") from None
        self.fragment = fragment
        self.input, self.output = fragment.inputs[0], fragment.outputs[0]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        return self._session.run([self.output.name], {self.input.name: np.ascontiguousarray(x)})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        return dequantize(self.run_raw(quantize(x, self.input)), self.output)


Runner = Union[TFLiteRunner, OnnxRunner]


def open_runner(fragments_dir: str | Path, fragment: Fragment, threads: int | None = None,
                interpreter: str = "ai_edge_litert") -> Runner:
    """Verify the fragment's bytes against the manifest, then load it."""
    path = verified_path(fragments_dir, fragment)
    if fragment.format == "tflite":
        return TFLiteRunner(path, fragment, threads, interpreter)
    return OnnxRunner(path, fragment, threads)


def run_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
