"""Execution providers, ONNX fp16 fragments and I/O-binding composition (issue 22, Jetson).

Everything here runs on any machine with onnxruntime's CPU build; the tests marked ``gpu`` run only where
onnxruntime has the CUDAExecutionProvider (a Jetson with JetPack's onnxruntime-gpu: ``pytest -m gpu``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.device_compose import BoundComposer
from edge_runtime.manifest import read_manifest
from edge_runtime.providers import (ProviderError, available_providers, check_started, configure_session,
                                    explain_session_error, parse_providers, provider_options, trt_cache_dir)
from tests.conftest import ROOT, run_cli_env

QUERY = "footwear,tops"
HAS_CUDA = "CUDAExecutionProvider" in available_providers()
HAS_TRT = "TensorrtExecutionProvider" in available_providers()
# fp16 against fp32 on the same images (CPU): the composite's top-1 must barely move (measured 100 % on this
# bundle); the bound leaves room for one near-tie flipping.
FP16_MIN_TOP1_AGREEMENT = 0.98
TASKS = {"tops": (0, 2, 4, 6), "bottoms": (1, 3), "footwear": (5, 7, 9), "bags": (8,)}


@pytest.fixture(scope="module")
def onnx_fragments(tmp_path_factory) -> Path:
    """A seeded, untrained WRN-like library and four experts written as an ONNX fp32 + fp16 bundle through the
    converters' own ONNX backend and manifest classes.  Training a pool takes minutes on a loaded 2-core
    machine; what these tests check (providers, fp16 against fp32, I/O binding against host copies, fused
    against composed) needs no trained weights.  The trained path is test_runtime.py (onnxruntime fp16
    against torch) and test_export.py (the fp16 variant in the manifest).

    ``POE_TEST_ONNX_BUNDLE=DIR`` uses an exported bundle instead (ONNX fp32 and fp16 of a pool with the tasks
    bags, footwear, tops), so a Jetson can run ``pytest -m gpu`` without torch or the converters.
    """
    if os.environ.get("POE_TEST_ONNX_BUNDLE"):
        return Path(os.environ["POE_TEST_ONNX_BUNDLE"])
    import torch
    from torch import nn

    from converters.backends import Calibration, create_backend
    from converters.stages import ExpertUnit
    from edge_runtime.atomic_io import sha256_bytes
    from edge_runtime.manifest import Fragment, Manifest, Preprocessing, fragment_id, write_manifest

    torch.manual_seed(0)

    def block(c_in: int, c_out: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    library = nn.Sequential(block(1, 16, 1), block(16, 32, 2), block(32, 32, 1)).eval()
    experts = {t: nn.Sequential(block(32, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(ids)))
               .eval() for t, ids in TASKS.items()}
    for module in [library, *experts.values()]:  # BatchNorm statistics that are not the identity
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    cal = Calibration(rng.normal(size=(8, 1, 28, 28)).astype(np.float32),
                      rng.normal(size=(8, 32, 14, 14)).astype(np.float32))
    backend = create_backend("onnx", cal, lambda m: None)
    units = {t: ExpertUnit(t, None, m) for t, m in experts.items()}
    sources = backend.sources(library, units, (1, 28, 28), (32, 14, 14))
    root = tmp_path_factory.mktemp("onnx_fp16") / "fragments"
    fragments = []
    for precision in ("fp32", "fp16"):
        lib_sha = None
        for key in (None, *TASKS):
            data = backend.fragment_bytes(precision, key, sources[key], None)
            spec_in, spec_out = backend.tensor_specs(data, key, sources[key])
            rel = backend.file(precision, key)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            role = "library" if key is None else "expert"
            fragments.append(Fragment(id=fragment_id(role, key, "onnx", precision), role=role, format="onnx",
                                      precision=precision, file=rel, sha256=sha256_bytes(data), bytes=len(data),
                                      inputs=(spec_in,), outputs=(spec_out,), task=key,
                                      class_ids=TASKS[key] if key else (), library_sha256=lib_sha))
            lib_sha = lib_sha or fragments[-1].sha256
    write_manifest(root, Manifest(pool_id="synthetic-onnx-fp16", class_names=tuple(f"c{i}" for i in range(10)),
                                  preprocessing=Preprocessing(input_shape=(28, 28, 1), mean=(0.29,), std=(0.35,)),
                                  tasks=TASKS, fragments=tuple(fragments)))
    return root


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """70 uint8 images (N, H, W, C): more than two max_batch chunks of 32."""
    return np.random.default_rng(1).integers(0, 256, size=(70, 28, 28, 1), dtype=np.uint8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT, timeout=300)


# ----------------------------------------------------------------- provider names and checks (no bundle)

def test_provider_lists_keep_their_order_and_accept_both_spellings():
    assert parse_providers("tensorrt,cuda,cpu") == ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                    "CPUExecutionProvider")
    assert parse_providers(["CUDAExecutionProvider", "CPU"]) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert parse_providers(None) is None
    with pytest.raises(ProviderError, match=r"unknown execution provider 'tpu'; valid: cpu, cuda, tensorrt"):
        parse_providers("cuda,tpu")
    with pytest.raises(ProviderError, match="given twice"):
        parse_providers("cpu,CPUExecutionProvider")
    with pytest.raises(ProviderError, match="no execution provider given"):
        parse_providers(" , ")


class _Options:
    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


def test_without_cpu_in_the_list_nothing_falls_back_to_it():
    strict, lenient = _Options(), _Options()
    assert configure_session(strict, ("CUDAExecutionProvider",)) == {"enable_fallback": 0}
    assert strict.entries == {"session.disable_cpu_ep_fallback": "1"}
    assert configure_session(lenient, ("CUDAExecutionProvider", "CPUExecutionProvider")) == {}
    assert lenient.entries == {}


class _Session:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


def test_a_provider_that_did_not_start_is_an_error_unless_cpu_was_asked_for(capsys):
    with pytest.raises(ProviderError, match="CUDAExecutionProvider did not start for fragment 'lib'; the session "
                                            "runs on CPUExecutionProvider"):
        check_started(_Session(["CPUExecutionProvider"]), ("CUDAExecutionProvider",), "lib")
    check_started(_Session(["CPUExecutionProvider"]), ("CUDAExecutionProvider", "CPUExecutionProvider"), "lib")
    assert "warning: CUDAExecutionProvider did not start" in capsys.readouterr().err


def test_onnxruntime_refusals_about_providers_become_one_clear_line():
    strict = ("CUDAExecutionProvider",)
    refused = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned to "
                           "the default CPU EP, but fallback to CPU EP has been explicitly disabled by the user.")
    message = str(explain_session_error(refused, strict, "library.onnx.fp16"))
    assert message == ("fragment 'library.onnx.fp16' has nodes CUDAExecutionProvider cannot run; add cpu to let "
                       "onnxruntime run them on the CPU (--provider cuda,cpu)")
    broken = RuntimeError("Failed to load library libonnxruntime_providers_cuda.so: libcudnn.so.9: not found")
    assert "CUDAExecutionProvider failed to start for fragment 'x': Failed to load library" in \
        str(explain_session_error(broken, strict, "x"))
    assert explain_session_error(RuntimeError("InvalidProtobuf: damaged"), strict, "x") is None


def test_tensorrt_caches_its_engines_per_fragment_inside_the_bundle(tmp_path):
    cache = trt_cache_dir(tmp_path, "ab" * 32)
    assert cache == tmp_path / "trt_cache" / ("ab" * 8)
    options = provider_options(("TensorrtExecutionProvider", "CUDAExecutionProvider"), cache)
    assert options[0]["trt_engine_cache_enable"] == "True" and options[0]["trt_engine_cache_path"] == str(cache)
    assert options[1] == {} and cache.is_dir()


# ----------------------------------------------------------------- the runtime and the CLI

@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_an_unavailable_provider_is_refused_listing_the_available_ones(onnx_fragments, images, tmp_path):
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider is not available here; available: .*"
                                            r"CPUExecutionProvider"):
        Runtime.open(onnx_fragments, QUERY, precision="fp32", providers="cuda,cpu")
    np.save(tmp_path / "x.npy", images[:2])
    out = _cli("run", "--bundle", str(onnx_fragments), "--tasks", QUERY, "--precision", "fp32", "--provider",
               "cuda", str(tmp_path / "x.npy"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "edge-runtime: error: onnxruntime provider CUDAExecutionProvider is not available here; available: " \
           in out.stderr and "CPUExecutionProvider" in out.stderr


def test_cli_refuses_bad_provider_names_and_providers_with_tflite(onnx_fragments):
    out = _cli("bench", "--bundle", str(onnx_fragments), "--tasks", QUERY, "--provider", "tpu")
    assert out.returncode == 2 and "unknown execution provider 'tpu'; valid: cpu, cuda, tensorrt" in out.stderr
    out = _cli("bench", "--bundle", str(onnx_fragments), "--tasks", QUERY, "--backend", "ai_edge_litert",
               "--provider", "cpu")
    assert out.returncode == 2
    assert "execution providers apply to the onnxruntime backend only, not ai_edge_litert" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cpu_provider_picks_onnxruntime_and_matches_the_default(onnx_fragments, images):
    plain = Runtime.open(onnx_fragments, QUERY, precision="fp32")
    on_cpu = Runtime.open(onnx_fragments, QUERY, precision="fp32", providers="cpu")
    assert on_cpu.backend.name == "onnxruntime" and on_cpu.describe()["providers"] == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(on_cpu.predict(images).logits, plain.predict(images).logits)


def test_fp16_fragments_follow_fp32(onnx_fragments, images):
    manifest = read_manifest(onnx_fragments)
    assert ("onnx", "fp16") in manifest.variants()
    fp32 = {f.id.replace("fp32", "X"): f for f in manifest.fragments if f.precision == "fp32"}
    for frag in (f for f in manifest.fragments if f.precision == "fp16"):
        assert frag.inputs[0].dtype == frag.outputs[0].dtype == "float32"  # keep_io_types: a float32 seam
        assert frag.bytes < 0.6 * fp32[frag.id.replace("fp16", "X")].bytes
    a = Runtime.open(onnx_fragments, QUERY, precision="fp32").predict(images)
    b = Runtime.open(onnx_fragments, QUERY, precision="fp16").predict(images)
    assert b.logits.dtype == np.float32
    assert float(np.mean(a.class_ids == b.class_ids)) >= FP16_MIN_TOP1_AGREEMENT
    assert np.max(np.abs(a.logits - b.logits)) < 2e-2 * np.max(np.abs(a.logits))
    assert np.max(np.abs(a.logits - b.logits)) > 0  # really computed in float16


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_io_binding_composes_exactly_like_the_plain_path(onnx_fragments, images, precision):
    plain = Runtime.open(onnx_fragments, "bags,footwear,tops", precision=precision, max_batch=32)
    bound = Runtime.open(onnx_fragments, "bags,footwear,tops", precision=precision, max_batch=32, io_binding=True)
    assert bound.describe()["io_binding"] is True and plain.describe()["io_binding"] is False
    timings: dict[str, float] = {}
    got = bound.logits_from_encoded(bound.encode(images), timings)  # 70 images: chunks of 32, 32, 6
    np.testing.assert_array_equal(got, plain.logits_from_encoded(plain.encode(images)))
    assert set(timings) == {f.id for f in bound.selection.fragments}
    np.testing.assert_array_equal(bound.clone().predict(images[:1]).logits, plain.predict(images[:1]).logits)


def test_io_binding_is_refused_where_it_cannot_work(onnx_fragments):
    with pytest.raises(ValueError, match="io_binding needs the onnxruntime backend"):
        BoundComposer(object(), [])  # type: ignore[arg-type]  (a TFLite runner has no session to bind)


def test_fused_fp16_graph_equals_the_composition(onnx_fragments, images, tmp_path):
    import onnxruntime as ort

    from converters.fuse import fuse_query

    fused = fuse_query(onnx_fragments, QUERY, tmp_path / "q.onnx", precision="fp16")
    rt = Runtime.open(onnx_fragments, QUERY, precision="fp16")
    session = ort.InferenceSession(str(fused.path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {rt.library.input.name: rt.encode(images)})[0]
    assert fused.class_ids == rt.classes
    np.testing.assert_allclose(logits, rt.predict(images).logits, atol=1e-5)


def test_gpu_providers_benchmark_runs_on_any_machine_and_says_what_it_measured(onnx_fragments, tmp_path):
    import json

    from benchmarks.gpu_providers import main

    out = tmp_path / "jetson"
    assert main(["--bundle", str(onnx_fragments), "--providers", "cpu", "--batches", "1,3", "--seconds", "0.05",
                 "--rounds", "1", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["provider_sets_measured"] == ["cpu"] and record["gpu_measured"] is False
    assert {(r["precision"], r["batch"], r["path"]) for r in record["results"]} == {
        (p, b, path) for p in ("fp32", "fp16") for b in (1, 3)
        for path in ("composed_host", "composed_iobinding", "fused")}
    assert all(c["iobinding_vs_host_max_abs"] == 0.0 for c in record["checks"])
    assert all(c["fused_vs_composed_max_abs"] < 1e-4 for c in record["checks"])
    text = out.with_suffix(".md").read_text()
    assert "**No GPU was measured.**" in text and f"Commit {record['machine']['commit']}" in text


# ----------------------------------------------------------------- on a GPU only (pytest -m gpu on a Jetson)

@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_matches_the_cpu_and_io_binding_matches_plain(onnx_fragments, images, precision):
    cpu = Runtime.open(onnx_fragments, QUERY, precision=precision, providers="cpu").predict(images)
    cuda = Runtime.open(onnx_fragments, QUERY, precision=precision, providers="cuda")
    bound = Runtime.open(onnx_fragments, QUERY, precision=precision, providers="cuda", io_binding=True)
    assert cuda.describe()["providers"] == ["CUDAExecutionProvider"]
    got = cuda.predict(images)
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(got.probabilities, cpu.probabilities, atol=tolerance)
    np.testing.assert_allclose(bound.predict(images).logits, got.logits, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="onnxruntime has no TensorrtExecutionProvider here")
def test_tensorrt_engines_are_cached_in_the_bundle(onnx_fragments, images):
    rt = Runtime.open(onnx_fragments, QUERY, precision="fp16", providers="tensorrt,cuda")
    rt.predict(images[:1])
    cache = trt_cache_dir(onnx_fragments, rt.library.fragment.sha256)
    assert any(cache.iterdir()), "TensorRT wrote no engine into the bundle's cache"
    before = sorted(p.name for p in cache.iterdir())
    Runtime.open(onnx_fragments, QUERY, precision="fp16", providers="tensorrt,cuda").predict(images[:1])
    assert sorted(p.name for p in cache.iterdir()) == before  # loaded, not rebuilt under a new name
