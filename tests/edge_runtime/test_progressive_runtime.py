"""Anytime inference over progressive experts: exported partial sums match torch, budgets hold on this device."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from converters.errors import ConvertError
from converters.fuse import fuse_query
from edge_runtime.anytime import Overhead, plan_stages
from edge_runtime.manifest import MANIFEST_NAME, ManifestError, read_manifest
from edge_runtime.runners import native_info_muted
from edge_runtime.runtime import Runtime
from pool_builder.pool.consolidate import consolidate
from pool_builder.pool.loader import Pool

from ..conftest import PROGRESSIVE_BUILD, ROOT, run_cli_env

STAGES = PROGRESSIVE_BUILD["expert_stages"]
ALL = "bags,bottoms,footwear,tops"


@pytest.fixture(scope="module")
def images(fmnist_small) -> np.ndarray:
    return fmnist_small.test.images[:64]


def _torch_logits(pool_dir, images, stages):
    pool = Pool.open(pool_dir)
    model = consolidate(pool, ALL.split(","), stages).model
    with torch.no_grad():
        return model(pool.normalizer(images)).numpy()


def _open(bundle, **kwargs) -> Runtime:
    with native_info_muted():
        return Runtime.open(bundle, ALL, **kwargs)


def test_manifest_records_stages_latencies_and_per_stage_accuracy(progressive_fragments):
    bundle, _result = progressive_fragments
    manifest = read_manifest(bundle)
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest.schema_version == raw["schema_version"] == 2 and manifest.staged
    assert raw["tools"]["latency"]["batch"] == 1 and raw["tools"]["latency"]["threads"] == 1
    for fmt, precision in manifest.variants():
        for task in manifest.tasks:
            frags = manifest.expert_stages(task, fmt, precision)
            assert [f.stage for f in frags] == list(range(1, STAGES + 1))
            assert [f.id for f in frags] == [f"expert.{task}.stage{k}.{fmt}.{precision}" for k in range(1, STAGES + 1)]
            assert all(f.latency is not None and f.latency > 0 for f in frags)
            assert all("accuracy" in f.agreement and "torch_accuracy" in f.agreement for f in frags)
        queries = manifest.composites[f"{fmt}.{precision}"]["queries"]
        assert {f"{ALL}@stage{k}" for k in range(1, STAGES)} <= set(queries)
        assert manifest.fragment("library", fmt, precision).latency > 0


@pytest.mark.parametrize("fmt, precision", [("tflite", "fp32"), ("onnx", "fp32"), ("tflite", "int8")])
def test_partial_sums_match_torch_at_every_stage_count(progressive_fragments, progressive_pool_dir, images, fmt,
                                                       precision):
    bundle, _ = progressive_fragments
    backend = "onnxruntime" if fmt == "onnx" else "ai_edge_litert"
    for k in range(1, STAGES + 1):
        runtime = _open(bundle, backend=backend, precision=precision, stages=k)
        assert runtime.plan.stages == {t: k for t in ALL.split(",")}
        got = runtime.predict(images, "NHWC").logits
        want = _torch_logits(progressive_pool_dir, images, k)
        if precision == "fp32":
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
        else:  # int8 partial sums: same decisions on nearly every image
            assert np.mean(np.argmax(got, 1) == np.argmax(want, 1)) >= 0.9
            assert np.mean(np.abs(got - want)) < 0.25 * np.mean(np.abs(want))


def test_planner_spends_the_budget_round_robin():
    lat = {"a": [1.0, 0.5, 0.5], "b": [1.0, 0.5, 0.5], "c": [1.0]}
    assert plan_stages(2.0, lat, budget_ms=0.1) == ({"a": 1, "b": 1, "c": 1}, 5.0)  # library + stage 1 always
    assert plan_stages(2.0, lat, budget_ms=5.7) == ({"a": 2, "b": 1, "c": 1}, 5.5)
    assert plan_stages(2.0, lat, budget_ms=6.0) == ({"a": 2, "b": 2, "c": 1}, 6.0)
    assert plan_stages(2.0, lat, budget_ms=6.6) == ({"a": 3, "b": 2, "c": 1}, 6.5)
    assert plan_stages(2.0, lat, budget_ms=100) == ({"a": 3, "b": 3, "c": 1}, 7.0)
    assert plan_stages(2.0, lat, stages=2) == ({"a": 2, "b": 2, "c": 1}, 6.0)
    assert plan_stages(2.0, lat) == ({"a": 3, "b": 3, "c": 1}, 7.0)
    # an expert whose next stage does not fit gets no later one, even if that would fit
    assert plan_stages(0.0, {"a": [1.0, 3.0, 0.1]}, budget_ms=2.0) == ({"a": 1}, 1.0)
    # preprocessing + softmax (fixed) and glue per fragment call count against the budget
    over = Overhead(fixed_ms=0.5, per_call_ms=0.1)
    assert plan_stages(2.0, lat, budget_ms=0.1, overhead=over) == ({"a": 1, "b": 1, "c": 1}, pytest.approx(5.9))
    assert plan_stages(2.0, lat, budget_ms=6.55, overhead=over) == ({"a": 2, "b": 1, "c": 1}, pytest.approx(6.5))
    assert plan_stages(2.0, lat, overhead=over) == ({"a": 3, "b": 3, "c": 1}, pytest.approx(8.3))
    for kwargs, message in [(dict(budget_ms=0), "positive"), (dict(stages=0), ">= 1"),
                            (dict(budget_ms=1, stages=1), "not both")]:
        with pytest.raises(ValueError, match=message):
            plan_stages(1.0, lat, **kwargs)


@pytest.mark.parametrize("calibrate", [False, True])
def test_budget_plans_fewer_stages_within_the_budget(progressive_fragments, images, calibrate):
    """The plan fits the budget with the fragments' measured latencies; whether the wall time then holds is a
    benchmark's question (benchmarks/progressive.py reports p50/p95 against the budget), not a unit test's."""
    bundle, _ = progressive_fragments
    full = _open(bundle, precision="int8", calibrate=calibrate)
    lat = full.plan.latencies_ms
    minimum = lat["library.tflite.int8"] + sum(lat[f"expert.{t}.stage1.tflite.int8"] for t in ALL.split(","))
    budget = minimum + 0.5 * (full.plan.predicted_ms - minimum)  # room for about half the later stages
    # the overhead is given, not measured: the plan is then a function of the latencies alone
    runtime = _open(bundle, precision="int8", budget_ms=budget, calibrate=calibrate, overhead=Overhead())
    plan = runtime.plan
    assert plan.latency_source == ("calibrated" if calibrate else "manifest")
    assert plan.predicted_ms <= budget and 1 < sum(plan.stages.values()) / len(plan.stages) < STAGES
    assert runtime.predict(images[:4], "NHWC").logits.shape == full.predict(images[:4], "NHWC").logits.shape


def test_budget_counts_the_measured_overhead(progressive_fragments):
    """Without ``overhead`` the runtime measures it and the plan counts it (no timing asserted)."""
    bundle, _ = progressive_fragments
    plan = _open(bundle, precision="int8", budget_ms=1000.0).plan
    assert plan.overhead_fixed_ms > 0 and plan.overhead_per_call_ms >= 0
    lat = plan.latencies_ms
    calls = 1 + sum(plan.stages.values())
    fragments = sum(v for k, v in lat.items() if k == "library.tflite.int8" or
                    any(k == f"expert.{t}.stage{i}.tflite.int8" for t, n in plan.stages.items() for i in range(1, n + 1)))
    assert plan.predicted_ms == pytest.approx(plan.overhead_fixed_ms + fragments + calls * plan.overhead_per_call_ms)
    assert plan.to_json()["overhead_fixed_ms"] == round(plan.overhead_fixed_ms, 4)


def test_early_exit_is_an_option_with_the_expected_extremes(progressive_fragments, images):
    bundle, _ = progressive_fragments
    first = _open(bundle, precision="fp32", backend="ai_edge_litert", stages=1).predict(images, "NHWC").logits
    full = _open(bundle, precision="fp32", backend="ai_edge_litert").predict(images, "NHWC").logits
    everyone_exits = _open(bundle, precision="fp32", backend="ai_edge_litert", early_exit=1e-6)
    np.testing.assert_allclose(everyone_exits.predict(images, "NHWC").logits, first, atol=1e-6)
    assert everyone_exits.composer.stages_run == [4] * len(images)
    nobody_exits = _open(bundle, precision="fp32", backend="ai_edge_litert", early_exit=1.0)
    np.testing.assert_allclose(nobody_exits.predict(images, "NHWC").logits, full, atol=1e-5)
    assert _open(bundle, precision="fp32").composer.early_exit is None  # off unless asked for


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT)


def test_cli_reports_the_stages_it_ran_and_refuses_bad_settings(progressive_fragments, images, tmp_path):
    bundle, _ = progressive_fragments
    npy = tmp_path / "x.npy"
    np.save(npy, images[:2])
    done = _cli("run", "--bundle", str(bundle), "--tasks", ALL, "--budget-ms", "1000", str(npy))
    assert done.returncode == 0, done.stderr
    assert f"stages run: bags {STAGES}/{STAGES}" in done.stdout and "manifest latencies" in done.stdout
    done = _cli("run", "--bundle", str(bundle), "--tasks", "tops", "--stages", "1", "--json", str(npy))
    assert json.loads(done.stdout)["loaded"]["plan"]["stages"] == {"tops": 1}
    for flags, message in [(["--stages", "0"], "stage count must be >= 1"),
                           (["--early-exit", "1.5"], "early exit threshold must be a probability"),
                           (["--budget-ms", "-1"], "budget must be a positive number")]:
        done = _cli("run", "--bundle", str(bundle), "--tasks", "tops", *flags, str(npy))
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr
    done = _cli("run", "--bundle", str(bundle), "--tasks", "tops", "--budget-ms", "1", "--stages", "1", str(npy))
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_missing_latencies_ask_for_calibration_and_fuse_refuses_stages(progressive_fragments, tmp_path):
    bundle, _ = progressive_fragments
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    for frag in raw["fragments"]:
        frag.pop("latency", None)
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="no measured latency.*--calibrate"):
        _open(copy, budget_ms=1.0)
    assert _open(copy, budget_ms=1.0, calibrate=True).plan.latency_source == "calibrated"
    raw["schema_version"] = 1
    (copy / MANIFEST_NAME).write_text(json.dumps({**raw, "fragments": [
        {**f, "latency": 0.1} for f in raw["fragments"]]}))
    with pytest.raises(ManifestError, match="needs manifest schema_version 2"):
        read_manifest(copy)
    with pytest.raises(ConvertError, match="progressive experts"):
        fuse_query(bundle, ["tops"], tmp_path / "fused.onnx")
