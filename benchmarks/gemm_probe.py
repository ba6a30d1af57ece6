"""Hardware-use denominators for the edge section: what this CPU's kernels reach on one plain matrix multiply.

A model's "share of peak" only means something against a peak measured with
the same kernels at the same precision.  Earlier reports divided TFLite int8
by onnxruntime's MatMulInteger, a different library.  Here each backend gets
its own probe:

- TFLite (LiteRT with its default XNNPACK delegate): a one-op model, a
  FullyConnected of shape ``M x K -> M x N``, built with TensorFlow's converter
  in fp32 and in full int8 (representative data), run by the same
  ``ai_edge_litert`` interpreter and thread count the edge runtime uses;
- ONNX Runtime: MatMul (fp32) and MatMulInteger (int8) of the same shape.

The default shape is a convolution of the library's middle group written as a
GEMM (14 x 14 output pixels, 3 x 3 x 32 inputs, 32 outputs): the size of work
these models actually do at batch 1, not a large square GEMM no layer here
resembles.  Throughput is 2 M K N / best time, in G(FL)OP/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

DEFAULT_SHAPE = (196, 288, 32)  # M (output pixels), K (kernel x kernel x in-channels), N (out-channels)


@dataclass(frozen=True)
class Probe:
    """One measured denominator, named so a report can say exactly what it divided by."""

    backend: str
    precision: str
    threads: int
    shape: tuple[int, int, int]
    gops: float

    @property
    def name(self) -> str:
        m, k, n = self.shape
        kernel = {"tflite": "LiteRT/XNNPACK FullyConnected", "onnx": "ONNX Runtime MatMul" +
                  ("Integer" if self.precision == "int8" else "")}[self.backend]
        return f"{kernel} {self.precision} {m}x{k}x{n}, {self.threads} thread(s)"


def _best_seconds(call: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def tflite_gemm_model(shape: tuple[int, int, int], precision: str) -> bytes:
    """A one-layer TFLite model (FullyConnected ``M x K -> M x N``) in fp32 or full int8."""
    import tensorflow as tf

    m, k, n = shape
    rng = np.random.default_rng(0)
    weights = tf.constant(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k))

    @tf.function(input_signature=[tf.TensorSpec([m, k], tf.float32)])
    def gemm(x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, weights)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([gemm.get_concrete_function()], gemm)
    if precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([rng.standard_normal((m, k), dtype=np.float32)] for _ in range(8))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def tflite_gemm_gops(precision: str, threads: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                     repeats: int = 50) -> Probe:
    """The probe run by the edge runtime's TFLite interpreter (``ai_edge_litert``, XNNPACK by default)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite_gemm_model(shape, precision), num_threads=threads)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    rng = np.random.default_rng(1)
    x = (rng.integers(-128, 128, detail["shape"], dtype=np.int8) if precision == "int8"
         else rng.standard_normal(detail["shape"], dtype=np.float32))
    interp.set_tensor(detail["index"], x)
    best = _best_seconds(interp.invoke, repeats)
    m, k, n = shape
    return Probe("tflite", precision, threads, shape, 2 * m * k * n / best / 1e9)


def onnx_gemm_gops(precision: str, threads: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                   repeats: int = 50) -> Probe:
    """The same shape through ONNX Runtime's CPU provider: MatMul (fp32) or MatMulInteger (int8)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = shape
    rng = np.random.default_rng(0)
    if precision == "int8":
        weights = numpy_helper.from_array(rng.integers(-128, 128, (k, n), dtype=np.int8), "b")
        node, in_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
        x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    else:
        weights = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")
        node, in_type, out_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
        x = rng.standard_normal((m, k), dtype=np.float32)
    graph = helper.make_graph([helper.make_node(node, ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", in_type, [m, k])],
                              [helper.make_tensor_value_info("c", out_type, [m, n])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    best = _best_seconds(lambda: session.run(None, {"a": x}), repeats)
    return Probe("onnx", precision, threads, shape, 2 * m * k * n / best / 1e9)


def probe(fmt: str, precision: str, threads: int, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> Probe:
    """The denominator for ``fmt`` ("tflite" or "onnx") at ``precision``; fp16 TFLite models compute in fp32
    on CPU (XNNPACK dequantises fp16 weights), so they share the fp32 probe."""
    measure = tflite_gemm_gops if fmt == "tflite" else onnx_gemm_gops
    return measure("int8" if precision == "int8" else "fp32", threads, shape)
