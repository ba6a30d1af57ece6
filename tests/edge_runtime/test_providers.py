"""Execution providers, ONNX fp16 fragments and I/O-binding composition (issue 22, Jetson).

Everything here runs on any machine with onnxruntime's CPU build; the tests marked ``gpu`` run only where
onnxruntime has the CUDAExecutionProvider (a Jetson with JetPack's onnxruntime-gpu: ``pytest -m gpu``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.device_compose import BoundComposer
from edge_runtime.manifest import read_manifest
from edge_runtime.providers import (ProviderError, available_providers, check_started, configure_session,
                                    parse_providers, provider_options, trt_cache_dir)
from tests.conftest import ROOT, TINY_GATE, run_cli_env

QUERY = "footwear,tops"
HAS_CUDA = "CUDAExecutionProvider" in available_providers()
HAS_TRT = "TensorrtExecutionProvider" in available_providers()
# fp16 against fp32 on the same images (CPU): the composite's top-1 must barely move; measured 100 % on the
# tiny pool, the bound leaves room for a near-tie flipping.
FP16_MIN_TOP1_AGREEMENT = 0.98


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def onnx_fragments(tiny_pool_dir, tmp_path_factory) -> Path:
    """The tiny pool exported to ONNX only, fp32 and fp16 (no TensorFlow run: seconds, not minutes)."""
    from converters.export import ExportConfig, export_fragments

    out = tmp_path_factory.mktemp("onnx_fp16") / "fragments"
    export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(out), formats=("onnx",),
                                  precisions=("fp32", "fp16"), max_accuracy_drop=TINY_GATE,
                                  check_tflite_runtime=False), log=_quiet)
    return out


@pytest.fixture(scope="module")
def images(tiny_pool_dir) -> np.ndarray:
    """70 held-out uint8 images (N, H, W, C) of the pool's data set: more than one max_batch chunk of 32."""
    from pool_builder.pool.evaluate import held_out_split
    from pool_builder.pool.loader import Pool

    return held_out_split(Pool.open(tiny_pool_dir)).images[:70]


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


def test_tensorrt_caches_its_engines_per_fragment_inside_the_bundle(tmp_path):
    cache = trt_cache_dir(tmp_path, "ab" * 32)
    assert cache == tmp_path / "trt_cache" / ("ab" * 8)
    options = provider_options(("TensorrtExecutionProvider", "CUDAExecutionProvider"), cache)
    assert options[0]["trt_engine_cache_enable"] == "True" and options[0]["trt_engine_cache_path"] == str(cache)
    assert options[1] == {} and cache.is_dir()


# ----------------------------------------------------------------- the runtime and the CLI

@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_an_unavailable_provider_is_refused_listing_the_available_ones(onnx_fragments):
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider is not available here; available: .*"
                                            r"CPUExecutionProvider"):
        Runtime.open(onnx_fragments, QUERY, precision="fp32", providers="cuda,cpu")
    out = _cli("run", "--bundle", str(onnx_fragments), "--tasks", QUERY, "--precision", "fp32", "--provider",
               "cuda", str(onnx_fragments / "manifest.json"))
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


def test_fp16_fragments_follow_fp32_and_pass_the_gate(onnx_fragments, images):
    manifest = read_manifest(onnx_fragments)
    assert ("onnx", "fp16") in manifest.variants()
    fp32 = {f.id.replace("fp32", "X"): f for f in manifest.fragments if f.precision == "fp32"}
    for frag in (f for f in manifest.fragments if f.precision == "fp16"):
        assert frag.inputs[0].dtype == frag.outputs[0].dtype == "float32"  # keep_io_types: a float32 seam
        assert frag.bytes < 0.6 * fp32[frag.id.replace("fp16", "X")].bytes
    composite = manifest.composites["onnx.fp16"]["queries"]
    assert all(q["drop_points"] <= TINY_GATE for q in composite.values())
    a = Runtime.open(onnx_fragments, QUERY, precision="fp32").predict(images)
    b = Runtime.open(onnx_fragments, QUERY, precision="fp16").predict(images)
    assert float(np.mean(a.class_ids == b.class_ids)) >= FP16_MIN_TOP1_AGREEMENT
    assert np.max(np.abs(a.probabilities - b.probabilities)) < 0.05


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
