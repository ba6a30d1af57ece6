"""One ONNX file per query: library + chosen experts + concatenation, built from existing fragments.

Pure graph editing with ``onnx`` (no torch, no TensorFlow): each expert's
names get a prefix, its input is wired to the library's output, the expert
logits are concatenated and gathered into ascending global class-id order -
the same order ``pool_builder``'s ComposedModel uses.  Fragments are verified
against the manifest before their bytes are read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.atomic_io import atomic_write_bytes
from edge_runtime.manifest import Fragment, Manifest, ManifestError, read_manifest, verified_bytes
from edge_runtime.query import Query, QueryError, QueryLike

from .errors import ConvertError

FUSED_OUTPUT = "logits"


@dataclass(frozen=True)
class FusedModel:
    path: Path
    tasks: tuple[str, ...]
    class_ids: tuple[int, ...]
    bytes: int
    milliseconds: float


def fuse_models(library: onnx.ModelProto, experts: dict[str, onnx.ModelProto],
                class_ids: dict[str, Sequence[int]]) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """The fused graph and the global class id of each output column."""
    lib = library  # keeps its names ("image" in, "features" out); experts get a task prefix
    feature_name = lib.graph.output[0].name
    nodes, inits = list(lib.graph.node), list(lib.graph.initializer)
    logit_names, columns = [], []
    for task in sorted(experts, key=lambda t: min(class_ids[t])):
        model = onnx.compose.add_prefix(experts[task], f"{task}/")
        nodes.append(helper.make_node("Identity", [feature_name], [model.graph.input[0].name], name=f"{task}/seam"))
        nodes += list(model.graph.node)
        inits += list(model.graph.initializer)
        logit_names.append(model.graph.output[0].name)
        columns += list(class_ids[task])
    order = np.argsort(np.asarray(columns), kind="stable")
    nodes.append(helper.make_node("Concat", logit_names, ["concat_logits"], axis=1, name="concat"))
    inits.append(numpy_helper.from_array(order.astype(np.int64), "class_order"))
    nodes.append(helper.make_node("Gather", ["concat_logits", "class_order"], [FUSED_OUTPUT], axis=1, name="order"))
    output = helper.make_tensor_value_info(FUSED_OUTPUT, TensorProto.FLOAT, ["batch", len(columns)])
    graph = helper.make_graph(nodes, "pool_of_experts_query", [lib.graph.input[0]], [output], inits)
    opsets = {o.domain: o.version for m in [library, *experts.values()] for o in m.opset_import}
    fused = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="poe-convert")
    fused.ir_version = library.ir_version
    ordered = tuple(int(c) for c in np.asarray(columns)[order])
    return fused, ordered


def fuse_verified(manifest: Manifest, blob: Callable[[Fragment], bytes], tasks: QueryLike,
                  precision: str = "fp32") -> tuple[bytes, tuple[str, ...], tuple[int, ...]]:
    """The serialized fused model, the query's tasks and each output column's class id.

    ``blob`` hands over each fragment's already verified bytes (the query service passes its in-memory copy,
    so what is fused is what was verified, not whatever is on disk now).
    """
    try:
        chosen = Query.parse(tasks).validate(manifest.tasks).tasks
    except QueryError as exc:
        raise ConvertError(str(exc)) from None
    if manifest.staged:
        raise ConvertError("the fragments are progressive experts (stage fragments); fuse does not build staged "
                           "graphs - run them with `edge-runtime run --stages K` or `--budget-ms MS`, or export a "
                           "pool built with --expert-stages 1 to fuse it")
    try:
        lib_frag = manifest.fragment("library", "onnx", precision)
        expert_frags = {t: manifest.fragment("expert", "onnx", precision, t) for t in chosen}
    except ManifestError as exc:
        raise ConvertError(str(exc)) from None
    fused, ordered = fuse_models(onnx.load_from_string(blob(lib_frag)),
                                 {t: onnx.load_from_string(blob(f)) for t, f in expert_frags.items()},
                                 {t: manifest.tasks[t] for t in chosen})
    for key, value in (("pool_id", manifest.pool_id), ("tasks", json.dumps(list(chosen))),
                       ("class_ids", json.dumps(list(ordered))),
                       ("class_names", json.dumps([manifest.class_names[c] for c in ordered])),
                       ("precision", precision)):
        helper.set_model_props(fused, {**{p.key: p.value for p in fused.metadata_props}, key: value})
    onnx.checker.check_model(fused)
    return fused.SerializeToString(), chosen, ordered


def fuse_query(fragments_dir: str | Path, tasks: QueryLike, out: str | Path,
               precision: str = "fp32") -> FusedModel:
    """Write one ONNX model for ``tasks`` from the verified ONNX fragments of ``precision``."""
    start = time.perf_counter()
    root = Path(fragments_dir)
    data, chosen, ordered = fuse_verified(read_manifest(root), lambda f: verified_bytes(root, f), tasks, precision)
    atomic_write_bytes(out, data)
    return FusedModel(Path(out), chosen, ordered, len(data), (time.perf_counter() - start) * 1000.0)
