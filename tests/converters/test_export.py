"""A tiny real pool through the real toolchain: ONNX + onnxruntime, onnx2tf + TFLite interpreters."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.manifest import FORMATS, read_manifest, verified_path
from edge_runtime.runners import dequantize, open_runner, pass_between, quantize, run_batched, to_layout

from ..conftest import ROOT, TINY_GATE, run_cli_env

@pytest.fixture(scope="module")
def exported(tiny_fragments):
    return tiny_fragments


def test_every_fragment_in_every_format_and_precision(exported, tiny_pool_dir):
    out, result, summary = exported
    manifest = read_manifest(out)
    assert summary["ok"] and result.manifest == manifest
    pool = json.loads((tiny_pool_dir / "pool.json").read_text())
    assert manifest.pool_id == pool["pool_id"]
    assert manifest.variants() == sorted([("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"), ("tflite", "fp32"),
                                          ("tflite", "fp16"), ("tflite", "int8")])
    for fmt, precision in manifest.variants():
        lib = manifest.fragment("library", fmt, precision)
        assert verified_path(out, lib).stat().st_size == lib.bytes
        for task, class_ids in pool["tasks"].items():
            expert = manifest.fragment("expert", fmt, precision, task)
            assert expert.class_ids == tuple(class_ids) and expert.library_sha256 == lib.sha256
            assert verified_path(out, expert)
    assert not list(out.parent.glob(".fragments.staging-*"))


def test_fp32_matches_torch_and_int8_is_measured(exported):
    out, _, _ = exported
    manifest = read_manifest(out)
    for frag in manifest.fragments:
        a = frag.agreement
        if frag.precision == "fp32":
            assert a["max_abs_error"] < 1e-3
        if frag.role == "expert":
            assert 0.0 <= a["top1_agreement"] <= 1.0 and 0.0 <= a["accuracy"] <= 1.0
        if frag.format == "tflite":
            assert "tflite_runtime_max_abs_diff" in a
    for key, composite in manifest.composites.items():
        for query in composite["queries"].values():
            assert query["drop_points"] <= TINY_GATE
    int8 = manifest.fragment("library", "tflite", "int8")
    assert int8.inputs[0].dtype == "int8" and int8.inputs[0].layout == "NHWC"


def test_tflite_int8_seam_passes_through_and_files_shrink(exported):
    out, _, summary = exported
    manifest = read_manifest(out)
    lib = manifest.fragment("library", "tflite", "int8")
    for task in manifest.tasks:
        expert = manifest.fragment("expert", "tflite", "int8", task)
        assert expert.inputs[0].same_encoding(lib.outputs[0])
        assert expert.agreement["input_matches_library_output"] is True
    assert summary["size_ratios"]["tflite.int8/tflite.fp32"] < 0.4
    assert summary["size_ratios"]["onnx.int8/onnx.fp32"] < 0.55


def test_fragments_load_in_both_runtimes_without_foreign_ops(exported):
    from converters.checks import run_in_tflite_runtime, tflite_foreign_ops

    out, _, _ = exported
    manifest = read_manifest(out)
    jobs = []
    for frag in manifest.fragments:
        data = verified_path(out, frag).read_bytes()
        if frag.format == "onnx":
            onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        else:
            assert tflite_foreign_ops(data) == []
            shape = [2, *frag.inputs[0].shape[1:]]
            jobs.append((out / frag.file, np.zeros(shape, frag.inputs[0].dtype)))
    outputs = run_in_tflite_runtime(jobs)
    assert all(np.all(np.isfinite(o.astype(np.float32))) and o.shape[0] == 2 for o in outputs)


def _chained_logits(out, manifest, fmt, precision, tasks, images_nchw):
    lib = open_runner(out, manifest.fragment("library", fmt, precision), threads=2)
    raw = run_batched(lambda b: lib.run_raw(quantize(b, lib.input)), to_layout(images_nchw, "NCHW", lib.input.layout))
    columns, parts = [], []
    for task in sorted(tasks, key=lambda t: min(manifest.tasks[t])):
        expert = open_runner(out, manifest.fragment("expert", fmt, precision, task), threads=2)
        parts.append(dequantize(expert.run_raw(pass_between(raw, lib.output, expert.input)), expert.output))
        columns += list(manifest.tasks[task])
    logits = np.concatenate(parts, 1)
    return logits[:, np.argsort(columns, kind="stable")]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fused_onnx_equals_the_chained_fragments(exported, tmp_path, fmnist_small, precision):
    from converters.fuse import fuse_query
    from pool_builder.data.datasets import Normalizer

    out, _, _ = exported
    manifest = read_manifest(out)
    fused = fuse_query(out, ["footwear", "tops"], tmp_path / "q.onnx", precision)
    assert fused.class_ids == tuple(sorted(manifest.tasks["footwear"] + manifest.tasks["tops"]))
    model = onnx.load(fused.path)
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: json.loads(p.value) if p.key in ("class_ids", "tasks") else p.value for p in model.metadata_props}
    assert props["class_ids"] == list(fused.class_ids) and props["pool_id"] == manifest.pool_id
    pre = manifest.preprocessing
    x = Normalizer(pre.mean, pre.std)(fmnist_small.test.images[:64]).contiguous().numpy()
    got = ort.InferenceSession(str(fused.path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    want = _chained_logits(out, manifest, "onnx", precision, ["footwear", "tops"], x)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_onnx_export_is_byte_identical_when_repeated(tiny_pool_dir, exported, tmp_path):
    from converters.export import ExportConfig, export_fragments

    out, _, _ = exported
    runs = [tmp_path / "again1", tmp_path / "again2"]
    for again in runs:
        export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(again), formats=("onnx",),
                                      max_accuracy_drop=TINY_GATE), log=lambda m: None)
    first = read_manifest(out)
    for frag in read_manifest(runs[0]).fragments:
        assert frag.sha256 == first.fragment(frag.role, frag.format, frag.precision, frag.task).sha256, frag.id
    assert (runs[0] / "manifest.json").read_bytes() == (runs[1] / "manifest.json").read_bytes()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "converters", *args], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT, timeout=600)


def test_cli_fuse_and_bad_tasks(exported, tmp_path):
    out, _, _ = exported
    ok = _cli("fuse", "--fragments", str(out), "--tasks", "bags,bottoms", "--out", str(tmp_path / "f.onnx"))
    assert ok.returncode == 0, ok.stderr
    assert "class ids [1, 3, 8]" in ok.stdout
    bad = _cli("fuse", "--fragments", str(out), "--tasks", "bags,shoes", "--out", str(tmp_path / "g.onnx"))
    assert bad.returncode == 2 and "unknown task 'shoes'; valid: bags, bottoms, footwear, tops" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.onnx").exists()


def test_cli_rejects_unknown_format_and_precision(tiny_pool_dir, tmp_path):
    bad = _cli("export", "--pool", str(tiny_pool_dir), "--out", str(tmp_path / "o"), "--formats", "tflite,coreml")
    assert bad.returncode == 2 and "unknown format 'coreml'; valid: tflite, onnx" in bad.stderr
    bad = _cli("export", "--pool", str(tiny_pool_dir), "--out", str(tmp_path / "o"), "--precisions", "int4")
    assert bad.returncode == 2 and "unknown precision 'int4'; valid: fp32, fp16, int8" in bad.stderr
    bad = _cli("export", "--pool", str(tiny_pool_dir), "--out", str(tmp_path / "o"), "--formats", "onnx",
               "--precisions", "fp8")
    assert bad.returncode == 2 and "unknown precision 'fp8'" in bad.stderr
    assert not (tmp_path / "o").exists()
    assert set(FORMATS) == {"tflite", "onnx"}
