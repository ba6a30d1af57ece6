"""ONNX fp16: weights and activations in float16, float32 kept at the graph's input and output.

Why float32 at the edges (``keep_io_types``): ONNX fragments of every precision
then join at the same float32 NCHW seam (fp32 as exported, int8 QDQ inside the
graph, fp16 casts inside the graph), so the manifest's tensor dtypes, the
runtime's hand-over and ``poe-convert fuse`` stay as they are, and an older
runtime still reads a manifest that lists fp16 ONNX fragments.  The cost is one
Cast at each end of each fragment; values crossing the seam were produced in
float16, so the float32 round trip loses nothing.  On a GPU with I/O binding
the seam tensor never leaves the device (``edge_runtime/device_compose.py``).

The conversion is onnxruntime's own ``onnxruntime.transformers.float16`` (the
copy of onnxconverter-common that ships in the onnxruntime wheel), so no
dependency is added.  On an x86 CPU, onnxruntime's optimizer turns the graph back
into float32 (the casts it inserts around nodes without float16 kernels are then
removed): the CPU - and so the export's accuracy gate - sees float16-rounded
weights with float32 activations; a GPU also rounds activations (docs/converters.md).
"""

from __future__ import annotations

import logging

import onnx

# The largest |value| float16 holds.  convert_float_to_float16 would clamp larger weights silently;
# the backend refuses such a graph by name instead (fp16_overflow), before the accuracy gate runs.
FP16_MAX = 65504.0


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` with float32 input and output (Casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    log = logging.getLogger("onnxruntime.transformers.float16")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns per clamped initializer; fp16_overflow() names them instead
    try:
        converted = convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()),
                                             keep_io_types=True, disable_shape_infer=False)
    finally:
        log.setLevel(level)
    _sort_nodes(converted.graph)  # the converter appends its input Casts after their consumers
    return converted


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder ``graph``'s nodes so every node comes after the producers of its inputs (stable otherwise)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("fp16 graph has a cycle or an input nothing produces: " + pending[0].name)
        for node in ready:
            known.update(node.output)
        ordered += ready
        pending = [n for n in pending if not any(n is r for r in ready)]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def fp16_overflow(model: onnx.ModelProto) -> list[str]:
    """Initializers of the float32 ``model`` with values float16 cannot hold (|x| > 65504): names, for messages."""
    from onnx import numpy_helper

    too_big = []
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            values = numpy_helper.to_array(init)
            if values.size and float(abs(values).max()) > FP16_MAX:
                too_big.append(init.name)
    return too_big
