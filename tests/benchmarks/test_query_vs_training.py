"""A tiny query-vs-training run on the tiny pool gives sane, self-consistent numbers and all its files."""

import json

import pytest

from benchmarks.baselines import Curve
from benchmarks.common import NO_PLOTS, pyplot
from benchmarks.query_vs_training import QueryBenchConfig, render, run


def test_time_to_reach_is_the_first_evaluation_at_or_above_the_target():
    curve = Curve(steps_per_epoch=10)
    for step, seconds, acc in [(5, 1.0, 0.50), (10, 2.0, 0.80), (15, 3.0, 0.90), (20, 4.0, 0.85)]:
        curve.add(step, seconds, seconds, acc)
    assert curve.time_to_reach(0.80) == (2.0, 1.0)
    assert curve.time_to_reach(0.90) == (3.0, 2.0)
    assert curve.time_to_reach(0.95) == (None, 4.0)
    assert curve.points[0]["epoch"] == 0.5


@pytest.fixture(scope="module")
def tiny_result(tiny_pool_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qvt")
    cfg = QueryBenchConfig(pool=str(tiny_pool_dir), out=str(out), queries=("bottoms,bags", "footwear,bags"),
                           epochs=2, evals_per_epoch=2, repeats=3)
    result = run(cfg)
    return result, render(result, out)


def test_tiny_query_vs_training_numbers_are_sane(tiny_result):
    result, _ = tiny_result
    assert [q["query"] for q in result["queries"]] == ["bottoms,bags", "footwear,bags"]
    for q in result["queries"]:
        poe = q["poe"]
        assert 0.5 < poe["accuracy"] <= 1.0 and 0.0 < poe["consolidation_ms"] < poe["cold_query_ms"]
        assert q["test_images"] == 30 * len(q["classes"]) and q["train_images"] == 60 * len(q["classes"])
        assert set(q["baselines"]) == {"scratch", "kd", "ckd"}
        for b in q["baselines"].values():
            assert b["parameters"] == poe["parameters"]  # same architecture as library + experts
            times = [p["train_s"] for p in b["curve"]]
            assert times == sorted(times) and times[0] > 0
            assert [p["epoch"] for p in b["curve"]][-1] == pytest.approx(2.0, abs=0.2)
            assert all(0.0 <= p["accuracy"] <= 1.0 for p in b["curve"])
            assert b["final_accuracy"] == b["curve"][-1]["accuracy"]
            if b["time_to_poe_s"] is not None:
                assert b["time_to_poe_s"] <= b["train_s"]
        fastest = q["fastest"]
        assert fastest["ratio"] == pytest.approx(fastest["seconds"] / (poe["consolidation_ms"] / 1000))
        assert fastest["ratio"] > 1  # training anything takes longer than composing


def test_tiny_query_vs_training_writes_report_and_plots(tiny_result):
    result, out = tiny_result
    saved = json.loads((out / "result.json").read_text())
    first = saved["headline"][0]
    assert first["claim"].startswith("PoE query time vs fastest baseline")
    bound = first["measured"].startswith("> ")  # no baseline got there: a lower bound, under target = unknown
    assert first["met"] == (True if first["value"] >= 10_000 else (None if bound else False))
    report = (out / "report.md").read_text()
    assert "| bottoms,bags | 3 |" in report and " cores, Python " in report
    if pyplot() is None:  # `make test` does not install the bench extra: numbers without plots
        assert NO_PLOTS in report and not list(out.glob("*.png"))
        return
    for png in ("accuracy_vs_time.png", "time_to_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
