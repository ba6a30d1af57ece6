"""Structural checks every fragment passes before it is listed in a manifest.

ONNX: ``onnx.checker`` with full shape inference, then an onnxruntime session.
TFLite: no Flex (TensorFlow) or custom ops in the flatbuffer, loads and runs in
ai-edge-litert, and - in a separate process, since two TFLite runtimes should
not share one - in tflite-runtime, whose outputs must match ai-edge-litert's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import ConvertError

_TFLITE_RUNTIME_SCRIPT = r"""
import json, sys
import numpy as np
from tflite_runtime.interpreter import Interpreter
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    x = np.load(job["input"])
    it = Interpreter(model_path=job["model"], num_threads=1)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], list(x.shape), strict=True)
    it.allocate_tensors()
    it.set_tensor(d["index"], x)
    it.invoke()
    np.save(job["output"], it.get_tensor(it.get_output_details()[0]["index"]))
print("ok")
"""


def check_onnx(data: bytes, what: str) -> None:
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ConvertError(f"{what}: onnx.checker rejected the file: {exc}") from None


def tflite_foreign_ops(data: bytes) -> list[str]:
    """Names of Flex (select TensorFlow) and custom ops in a TFLite flatbuffer; empty when all are builtins."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    foreign = []
    for code in model.operatorCodes:
        # the schema keeps a deprecated 8-bit code beside the 32-bit one; the larger is the real code
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.CUSTOM:
            name = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            foreign.append(name)
    return sorted(set(foreign))


def check_tflite_ops(data: bytes, what: str) -> None:
    foreign = tflite_foreign_ops(data)
    if foreign:
        raise ConvertError(f"{what}: TFLite file needs non-builtin ops {foreign} (Flex/custom); "
                           "a plain interpreter on the device cannot run it")


def run_in_tflite_runtime(jobs: list[tuple[Path, np.ndarray]], timeout_s: float = 300) -> list[np.ndarray]:
    """Run each (model, raw input) in tflite-runtime in a child process; returns the raw outputs."""
    with tempfile.TemporaryDirectory(prefix="poe-tflite-runtime-") as tmp:
        spec = []
        for i, (model, x) in enumerate(jobs):
            inp, out = Path(tmp) / f"in{i}.npy", Path(tmp) / f"out{i}.npy"
            np.save(inp, x)
            spec.append({"model": str(model), "input": str(inp), "output": str(out)})
        (Path(tmp) / "jobs.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-c", _TFLITE_RUNTIME_SCRIPT, str(Path(tmp) / "jobs.json")],
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            hint = ("; install tflite-runtime (the convert extra has it) or pass --skip-tflite-runtime"
                    if "No module named" in tail else "")
            raise ConvertError(f"tflite-runtime could not load or run the TFLite fragments: {tail}{hint}")
        return [np.load(s["output"]) for s in spec]
