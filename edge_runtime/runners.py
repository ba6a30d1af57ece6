"""Run one verified fragment with the interpreter that is installed, nothing else.

A runner owns one interpreter, built once and kept (never rebuilt per call),
and knows from the manifest how to quantize its input and dequantize its
output.  The converters measure agreement through these same runners, so the
numbers in the manifest are what a device computes.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np

from .backends import BACKEND_FORMAT, BACKENDS, BackendError, resolve_backend, tflite_interpreter_class, unusable_reason
from .manifest import Fragment, ManifestError, TensorSpec, check_choice, verified_bytes
from .providers import (ProviderError, check_available, check_started, configure_session, device_of,
                        explain_session_error, parse_providers, provider_options, trt_cache_dir)

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float values -> the integer encoding ``spec`` describes (identity for float tensors)."""
    if not spec.quantized:
        return np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = _INT_RANGES[spec.dtype]
    q = np.divide(np.asarray(x, dtype=np.float32), np.float32(spec.scale))  # in place from here: hot path
    np.round(q, out=q)
    q += np.float32(spec.zero_point)
    np.minimum(q, hi, out=q)
    np.maximum(q, lo, out=q)
    return q.astype(spec.dtype)


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


class TFLiteRunner:
    """A TFLite fragment; the batch dimension is resized on demand (the interpreter is kept)."""

    def __init__(self, content: bytes, fragment: Fragment, threads: int | None = None,
                 interpreter: str = "ai_edge_litert") -> None:
        self.fragment = fragment
        self.input, self.output = fragment.inputs[0], fragment.outputs[0]
        self._content = content  # the interpreter reads the model from this buffer for its whole life
        self._interp = tflite_interpreter_class(interpreter)(model_content=content, num_threads=threads)
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
        return self._interp.get_tensor(self._out_index)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float input in the fragment's layout -> float output."""
        return dequantize(self.run_raw(quantize(x, self.input)), self.output)


class OnnxRunner:
    """An ONNX fragment in onnxruntime; CPU unless ``providers`` names others (Jetson: TensorRT, CUDA).

    ``providers`` are onnxruntime's names in priority order (``providers.parse_providers``); they are
    checked strictly (``edge_runtime/providers.py``).  ``trt_cache`` is where TensorRT keeps its engines.
    """

    def __init__(self, content: bytes, fragment: Fragment, threads: int | None = None,
                 providers: Sequence[str] | None = None, trt_cache: Path | None = None) -> None:
        reason = unusable_reason("onnxruntime")
        if reason:
            raise BackendError(reason)
        import onnxruntime as ort

        self.fragment = fragment
        self.input, self.output = fragment.inputs[0], fragment.outputs[0]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        wanted = tuple(parse_providers(providers) or ("CPUExecutionProvider",))
        check_available(wanted)
        extra = configure_session(options, wanted)
        banner = io.StringIO()  # onnxruntime prints its "EP Error ... Falling back" banner on stdout
        try:
            with contextlib.redirect_stdout(banner):
                self.session = ort.InferenceSession(content, options, providers=list(wanted),
                                                    provider_options=provider_options(wanted, trt_cache), **extra)
        except Exception as exc:  # onnxruntime's errors are not RuntimeErrors; unrelated ones are re-raised
            explained = explain_session_error(exc, wanted, fragment.id)
            if explained is None:
                raise
            raise explained from None
        check_started(self.session, wanted, fragment.id)
        self.providers = wanted
        self.device = device_of(wanted)
        self._output_names = [self.output.name]

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(self._output_names, {self.input.name: np.ascontiguousarray(x)})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        return dequantize(self.run_raw(quantize(x, self.input)), self.output)


Runner = Union[TFLiteRunner, OnnxRunner]


def open_runner(fragments_dir: str | Path, fragment: Fragment, threads: int | None = None,
                backend: str | None = None, providers: Sequence[str] | None = None) -> Runner:
    """Read the fragment's bytes, check them against the manifest, and load exactly those bytes.

    ``backend`` is the interpreter (``ai_edge_litert`` or ``tflite_runtime`` for TFLite;
    ``onnxruntime`` for ONNX); None takes the first usable one for the fragment's format.  ``providers``
    (onnxruntime only) are checked strictly; TensorRT caches its engines under ``<bundle>/trt_cache/``.
    """
    if backend is None:
        backend = resolve_backend("auto", [fragment.format]).name
    check_choice("backend", backend, BACKENDS)
    if BACKEND_FORMAT[backend] != fragment.format:
        raise BackendError(f"backend {backend} cannot run {fragment.format} fragment {fragment.id!r}")
    if providers is not None and fragment.format != "onnx":
        raise ProviderError(f"execution providers apply to onnxruntime only; backend {backend} runs TFLite "
                            f"fragment {fragment.id!r} on the CPU: use --backend onnxruntime for --provider")
    content = verified_bytes(fragments_dir, fragment)
    if fragment.format == "tflite":
        return TFLiteRunner(content, fragment, threads, backend)
    return OnnxRunner(content, fragment, threads, providers, trt_cache_dir(fragments_dir, fragment.sha256))


def run_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@contextlib.contextmanager
def native_info_muted() -> Iterator[None]:
    """Drop the interpreters' native ``INFO:`` lines (XNNPACK's banner) from fd 2; keep every other line.

    TFLite prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ on every
    interpreter and offers no Python switch; CLIs promise one line per error on stderr.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("INFO: ")]
            if kept:
                sys.stderr.write("".join(kept))
