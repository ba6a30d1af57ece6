"""The manifest schema: round trip, validation with clear messages, checksum before load."""

import json

import numpy as np
import pytest

from edge_runtime.atomic_io import sha256_bytes
from edge_runtime.manifest import (Fragment, Manifest, ManifestError, Preprocessing, TensorSpec, read_manifest,
                                   safe_relative_path, verified_path, write_manifest)
from edge_runtime.runners import dequantize, pass_between, quantize, to_layout

LIB_BYTES, EXPERT_BYTES = b"library-bytes", b"expert-bytes"


def _fragments(lib_sha=None):
    lib = Fragment(id="library.tflite.int8", role="library", format="tflite", precision="int8",
                   file="tflite/int8/library.tflite", sha256=sha256_bytes(LIB_BYTES), bytes=len(LIB_BYTES),
                   inputs=(TensorSpec("image", (-1, 28, 28, 1), "int8", "NHWC", 0.01, -55),),
                   outputs=(TensorSpec("features", (-1, 14, 14, 32), "int8", "NHWC", 0.05, -8),))
    expert = Fragment(id="expert.tops.tflite.int8", role="expert", format="tflite", precision="int8",
                      file="tflite/int8/experts/tops.tflite", sha256=sha256_bytes(EXPERT_BYTES),
                      bytes=len(EXPERT_BYTES), inputs=lib.outputs,
                      outputs=(TensorSpec("logits", (-1, 2), "int8", "NC", 0.1, 3),), task="tops", class_ids=(0, 2),
                      library_sha256=lib_sha or lib.sha256)
    return lib, expert


def _manifest(**overrides):
    lib, expert = _fragments()
    fields = dict(pool_id="abc", preprocessing=Preprocessing((28, 28, 1), (0.286,), (0.353,)),
                  class_names=("a", "b", "c"), tasks={"tops": (0, 2)}, fragments=(lib, expert))
    fields.update(overrides)
    return Manifest(**fields)


def _write_dir(tmp_path, manifest):
    (tmp_path / "tflite/int8/experts").mkdir(parents=True)
    (tmp_path / "tflite/int8/library.tflite").write_bytes(LIB_BYTES)
    (tmp_path / "tflite/int8/experts/tops.tflite").write_bytes(EXPERT_BYTES)
    write_manifest(tmp_path, manifest)


def test_round_trip_and_lookup(tmp_path):
    manifest = _manifest()
    _write_dir(tmp_path, manifest)
    back = read_manifest(tmp_path)
    assert back == manifest
    assert back.fragment("expert", "tflite", "int8", "tops").class_ids == (0, 2)
    assert back.variants() == [("tflite", "int8")]
    assert verified_path(tmp_path, back.fragment("library", "tflite", "int8")).read_bytes() == LIB_BYTES


def test_lookup_errors_list_the_choices():
    manifest = _manifest()
    with pytest.raises(ManifestError, match="valid: tops"):
        manifest.fragment("expert", "tflite", "int8", "shoes")
    with pytest.raises(ManifestError, match="present: tflite/int8"):
        manifest.fragment("library", "onnx", "fp32")


def test_tampered_or_missing_file_is_refused(tmp_path):
    manifest = _manifest()
    _write_dir(tmp_path, manifest)
    (tmp_path / "tflite/int8/library.tflite").write_bytes(b"library-bytez")
    with pytest.raises(ManifestError, match="does not match its manifest checksum"):
        verified_path(tmp_path, manifest.fragment("library", "tflite", "int8"))
    (tmp_path / "tflite/int8/experts/tops.tflite").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verified_path(tmp_path, manifest.fragment("expert", "tflite", "int8", "tops"))


@pytest.mark.parametrize("name", ["../x.tflite", "/etc/passwd", "a//b", "a\\b", ""])
def test_unsafe_paths(name):
    with pytest.raises(ManifestError, match="unsafe fragment path"):
        safe_relative_path(name)


def test_validation_messages(tmp_path):
    with pytest.raises(ManifestError, match="unknown format 'tf'; valid: tflite, onnx"):
        Fragment.from_json({**json.loads(json.dumps(_manifest().to_json()))["fragments"][0], "format": "tf"})
    with pytest.raises(ManifestError, match="not built for this manifest"):
        lib, expert = _fragments(lib_sha="0" * 64)
        _manifest(fragments=(lib, expert))
    with pytest.raises(ManifestError, match="has no valid scale"):
        TensorSpec("x", (-1, 4), "int8", "NC")
    with pytest.raises(ManifestError, match="schema_version 3 is newer than this runtime reads"):
        Manifest.from_json({**_manifest().to_json(), "schema_version": 3})
    with pytest.raises(ManifestError, match="schema_version 0 is not supported"):
        Manifest.from_json({**_manifest().to_json(), "schema_version": 0})
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_quantization_arithmetic_by_hand():
    spec = TensorSpec("f", (-1, 2), "int8", "NC", 0.5, -8)
    q = quantize(np.array([[0.0, 1.26], [100.0, -100.0]], np.float32), spec)
    assert q.tolist() == [[-8, -5], [127, -128]]  # 1.26/0.5 = 2.52 -> 3; saturates at the int8 range
    assert dequantize(q, spec).tolist() == [[0.0, 1.5], [67.5, -60.0]]
    other = TensorSpec("g", (-1, 2), "int8", "NC", 0.25, 0)
    assert pass_between(q, spec, spec) is q  # same encoding: the bytes pass through untouched
    assert pass_between(q, spec, other).tolist() == [[0, 6], [127, -128]]
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    assert np.array_equal(to_layout(to_layout(x, "NCHW", "NHWC"), "NHWC", "NCHW"), x)


def test_same_encoding_tolerates_one_float32_ulp_only():
    a = TensorSpec("f", (-1, 14, 14, 32), "int8", "NHWC", 0.09531641751527786, -7)
    assert a.same_encoding(TensorSpec("f", (1, 14, 14, 32), "int8", "NHWC", 0.09531642496585846, -7))
    assert not a.same_encoding(TensorSpec("f", (1, 14, 14, 32), "int8", "NHWC", 0.0954, -7))
    assert not a.same_encoding(TensorSpec("f", (1, 14, 14, 32), "int8", "NHWC", 0.09531641751527786, -6))
    assert not a.same_encoding(TensorSpec("f", (1, 32, 14, 14), "int8", "NCHW", 0.09531641751527786, -7))
