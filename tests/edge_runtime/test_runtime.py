"""The edge runtime on real fragments of the tiny pool, against the torch composed model."""

import json
import shutil

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.backends import installed_backends
from edge_runtime.images import InputError
from edge_runtime.manifest import MANIFEST_NAME, ManifestError

# The one tolerance of fp32 fragments against torch, on composite logits (float32 arithmetic
# in other kernels; measured max error is ~1e-5 on the tiny pool).
FP32_LOGITS_ATOL = 1e-3
# The demo pool reaches >= 99 % (README, benchmarks/edge_compose.py); the tiny pool's 12k-parameter
# experts, calibrated on 200 images, disagree with torch on ~2 % of 210 images.
INT8_MIN_TOP1_AGREEMENT = 0.97
QUERY = ("footwear", "tops")
BACKEND_CASES = [("ai_edge_litert", "fp32"), ("ai_edge_litert", "fp16"), ("ai_edge_litert", "int8"),
                 ("tflite_runtime", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"),
                 ("onnxruntime", "int8")]


@pytest.fixture(scope="module")
def reference(tiny_pool_dir):
    """Held-out uint8 images of the query's classes and the torch composed model's logits on them."""
    import torch

    from pool_builder.pool.consolidate import consolidate
    from pool_builder.pool.evaluate import held_out_split
    from pool_builder.pool.loader import Pool

    pool = Pool.open(tiny_pool_dir)
    split = held_out_split(pool)
    composed = consolidate(pool, QUERY)
    mask = np.isin(split.labels, composed.class_ids)
    images, labels = split.images[mask], split.labels[mask]
    with torch.no_grad():
        logits = composed.model(pool.normalizer(images)).numpy()
    return images, labels, logits, tuple(composed.class_ids)


@pytest.fixture
def bundle_copy(tiny_fragments, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_fragments[0], dest)
    return dest


@pytest.mark.parametrize("backend,precision", BACKEND_CASES)
def test_runtime_matches_the_torch_composed_model(tiny_fragments, reference, backend, precision):
    images, labels, torch_logits, class_ids = reference
    runtime = Runtime.open(tiny_fragments[0], ",".join(QUERY), backend=backend, precision=precision)
    assert runtime.classes == class_ids and runtime.backend.name == backend
    prediction = runtime.predict(images)
    assert prediction.probabilities.shape == (len(images), len(class_ids))
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(prediction.class_ids) == [class_ids[j] for j in prediction.probabilities.argmax(axis=1)]
    assert prediction.labels[0] == runtime.manifest.class_names[prediction.class_ids[0]]
    agreement = float(np.mean(prediction.logits.argmax(1) == torch_logits.argmax(1)))
    if precision == "fp32":
        assert np.max(np.abs(prediction.logits - torch_logits)) < FP32_LOGITS_ATOL
        assert agreement == 1.0
    else:
        assert agreement >= INT8_MIN_TOP1_AGREEMENT, f"{backend} {precision}: top-1 agreement {agreement:.4f}"
    # The converters measured this query on the same held-out images through the same fragments:
    # the device's composition must reproduce their accuracy exactly.
    measured = runtime.manifest.composites[f"{runtime.selection.format}.{precision}"]["queries"][",".join(QUERY)]
    if backend != "tflite_runtime":  # the converters measure with ai-edge-litert's kernels
        assert round(float(np.mean(prediction.class_ids == labels)), 6) == measured["accuracy"]


def test_int8_features_pass_straight_through(tiny_fragments):
    for backend in ("ai_edge_litert", "onnxruntime"):
        runtime = Runtime.open(tiny_fragments[0], "tops,bags", backend=backend, precision="int8")
        assert all(runtime.describe()["int8_passthrough"].values())
    lib = Runtime.open(tiny_fragments[0], "tops", backend="ai_edge_litert", precision="int8").library
    assert lib.output.dtype == "int8"  # so the TFLite seam really passes int8 bytes


def test_every_input_form_gives_the_same_prediction(tiny_fragments, reference, tmp_path):
    from PIL import Image

    images = reference[0][:5]
    runtime = Runtime.open(tiny_fragments[0], QUERY, precision="fp32")
    want = runtime.predict(images).logits
    np.save(tmp_path / "batch.npy", images)
    Image.fromarray(images[0, :, :, 0]).save(tmp_path / "first.png")
    forms = {"NHWC": images, "NCHW": images.transpose(0, 3, 1, 2), "NHW": images[..., 0],
             "float 0..1": images.astype(np.float32) / 255.0, "npy file": [tmp_path / "batch.npy"]}
    for name, form in forms.items():
        np.testing.assert_allclose(runtime.predict(form).logits, want, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(runtime.predict(images[0, :, :, 0]).logits, want[:1], atol=1e-5)  # HW
    np.testing.assert_allclose(runtime.predict(images[0]).logits, want[:1], atol=1e-5)  # HWC
    np.testing.assert_allclose(runtime.predict([str(tmp_path / "first.png")]).logits, want[:1], atol=1e-5)


@pytest.mark.parametrize("backend", ["ai_edge_litert", "onnxruntime"])
def test_batches_of_any_size_agree_image_by_image(tiny_fragments, reference, backend):
    images = reference[0][:70]
    runtime = Runtime.open(tiny_fragments[0], QUERY, backend=backend, precision="int8", max_batch=32)
    whole = runtime.predict(images).logits  # 32 + 32 + 6
    singles = np.concatenate([runtime.predict(images[i:i + 1]).logits for i in range(len(images))])
    odd = np.concatenate([runtime.predict(images[i:i + 3]).logits for i in range(0, len(images), 3)])
    np.testing.assert_allclose(whole, singles, atol=1e-5)
    np.testing.assert_allclose(whole, odd, atol=1e-5)


def test_only_requested_fragments_are_read(bundle_copy, reference):
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    for frag in manifest["fragments"]:
        if frag["role"] == "expert" and frag["task"] == "bags":
            (bundle_copy / frag["file"]).unlink()
        elif frag["role"] == "expert" and frag["task"] == "bottoms":
            (bundle_copy / frag["file"]).write_bytes(b"corrupt")
    for backend in ("ai_edge_litert", "onnxruntime"):
        runtime = Runtime.open(bundle_copy, QUERY, backend=backend, precision="int8")
        assert runtime.predict(reference[0][:4]).class_ids.shape == (4,)
        with pytest.raises(ManifestError, match="expert.bags.*missing.*fetch"):
            Runtime.open(bundle_copy, "bags,tops", backend=backend, precision="int8")
        with pytest.raises(ManifestError, match="expert.bottoms.*checksum"):
            Runtime.open(bundle_copy, "bottoms", backend=backend, precision="int8")


def test_installed_backends_are_found_in_order(tiny_fragments):
    assert installed_backends() == ["ai_edge_litert", "tflite_runtime", "onnxruntime"]
    assert Runtime.open(tiny_fragments[0], "tops").backend.name == "ai_edge_litert"


def test_bad_images_are_refused_with_what_was_expected(tiny_fragments, reference, tmp_path):
    runtime = Runtime.open(tiny_fragments[0], QUERY)
    images = reference[0][:3]
    cases = {
        "wrong shape": (np.zeros((2, 32, 32, 1), np.uint8), "shape .* do not fit.*28x28"),
        "wrong layout": (images, "read as NCHW give \\(28, 1, 28\\)"),
        "wrong dtype": (images.astype(np.int32), "dtype int32 .*valid: uint8"),
        "nan": (np.full((1, 28, 28, 1), np.nan, np.float32), "image 0 contains NaN"),
        "inf": (np.concatenate([np.zeros((1, 28, 28), np.float32), np.full((1, 28, 28), np.inf, np.float32)]),
                "image 1 contains NaN or inf"),
        "float out of range": (images.astype(np.float32), r"\[0, 1\].*pass uint8"),
        "empty batch": (np.zeros((0, 28, 28, 1), np.uint8), "empty batch"),
    }
    for name, (array, message) in cases.items():
        layout = "NCHW" if name == "wrong layout" else "auto"
        with pytest.raises(InputError, match=message):
            runtime.predict(array, layout=layout)
    with pytest.raises(InputError, match="empty batch"):
        runtime.predict([])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=r"unknown file type \.txt; valid: \.npy, \.png"):
        runtime.predict([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="not found"):
        runtime.predict([tmp_path / "absent.npy"])
    np.save(tmp_path / "mixed.npy", images.astype(np.float32) / 255)
    with pytest.raises(InputError, match="mix uint8 and float"):
        runtime.predict([images, tmp_path / "mixed.npy"])


def test_bad_queries_are_refused_listing_the_choices(tiny_fragments):
    root = tiny_fragments[0]
    with pytest.raises(ManifestError, match="unknown task 'hats'; valid: bags, bottoms, footwear, tops"):
        Runtime.open(root, "tops,hats")
    with pytest.raises(ManifestError, match="no tasks given"):
        Runtime.open(root, " , ")
    with pytest.raises(ManifestError, match="unknown precision 'int4'; valid: fp32, fp16, int8"):
        Runtime.open(root, "tops", precision="int4")
    with pytest.raises(ManifestError, match="unknown backend 'tensorrt'; valid: auto, ai_edge_litert"):
        Runtime.open(root, "tops", backend="tensorrt")
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        Runtime.open(root, "tops", num_threads=0)


def _edit_manifest(bundle, edit):
    path = bundle / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_damaged_or_foreign_bundles_are_refused(bundle_copy, tiny_fragments):
    def newer(raw):
        raw["schema_version"] = 3

    def escaping(raw):
        next(f for f in raw["fragments"] if f["id"] == "library.tflite.int8")["file"] = "../outside.tflite"

    def other_pool(raw):
        expert = next(f for f in raw["fragments"] if f["id"] == "expert.tops.tflite.int8")
        expert["library_sha256"] = "0" * 64

    for edit, message in [(newer, "schema_version 3 is newer .*upgrade"),
                          (escaping, "unsafe fragment path '../outside.tflite'"),
                          (other_pool, "expert.tops.tflite.int8.*not built for this manifest's tflite int8 library")]:
        shutil.copy(tiny_fragments[0] / MANIFEST_NAME, bundle_copy / MANIFEST_NAME)
        _edit_manifest(bundle_copy, edit)
        with pytest.raises(ManifestError, match=message):
            Runtime.open(bundle_copy, "tops")
    # An expert file swapped in from another export: the bytes do not match the manifest.
    shutil.copy(tiny_fragments[0] / MANIFEST_NAME, bundle_copy / MANIFEST_NAME)
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    files = {f["id"]: f["file"] for f in manifest["fragments"]}
    shutil.copy(bundle_copy / files["expert.footwear.tflite.int8"], bundle_copy / files["expert.tops.tflite.int8"])
    with pytest.raises(ManifestError, match="expert.tops.tflite.int8.*another pool or export"):
        Runtime.open(bundle_copy, "tops")
    (bundle_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="not a fragment directory"):
        Runtime.open(bundle_copy, "tops")


def test_tflite_runtime_under_numpy_2_is_caught_up_front(monkeypatch, tiny_fragments):
    import edge_runtime.backends as backends

    monkeypatch.setattr(backends, "numpy_major", lambda: 2)
    with pytest.raises(ManifestError, match=r"tflite-runtime .*numpy 1.x.*pip install 'numpy<2'.*ai-edge-litert"):
        Runtime.open(tiny_fragments[0], "tops", backend="tflite_runtime")
    assert "tflite_runtime" not in backends.installed_backends()
