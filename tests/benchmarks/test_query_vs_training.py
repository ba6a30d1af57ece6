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
                           cap_epochs=2, evals_per_epoch=2, train_repeats=2, repeats=3, cold_repeats=2)
    result = run(cfg)
    return result, render(result, out)


def test_tiny_query_vs_training_numbers_are_sane(tiny_result):
    result, _ = tiny_result
    assert [q["query"] for q in result["queries"]] == ["bottoms,bags", "footwear,bags"]
    for q in result["queries"]:
        poe = q["poe"]
        assert 0.5 < poe["accuracy"] <= 1.0 and 0.0 < poe["warm"]["ms"] < poe["cold"]["ms"]
        assert q["test_images"] == 30 * len(q["classes"]) and q["train_images"] == 60 * len(q["classes"])
        assert set(q["baselines"]) == {"scratch", "kd", "ckd", "transfer"}
        for name, b in q["baselines"].items():
            assert len(b["runs"]) == 2 and b["summary"]["repeats"] == 2
            for r in b["runs"]:
                assert r["parameters"] == poe["parameters"]  # same architecture as library + experts
                times = [p["cpu_s"] for p in r["curve"]]
                assert times == sorted(times)
                assert all(0.0 <= p["accuracy"] <= 1.0 for p in r["curve"])
                assert r["final_accuracy"] == r["curve"][-1]["accuracy"]
                if r["reached"]:  # training stops at the first evaluation at PoE's accuracy
                    assert r["final_accuracy"] >= poe["accuracy"] and r["cpu_s_to_target"] == r["cpu_s"]
                    assert all(p["accuracy"] < poe["accuracy"] for p in r["curve"][:-1])
                else:  # ran to the cap
                    assert r["epochs"] == pytest.approx(2.0, abs=0.2)
            if name == "transfer":  # only the heads train
                assert b["summary"]["trainable_parameters"] < b["summary"]["parameters"]
            else:
                assert b["summary"]["trainable_parameters"] == b["summary"]["parameters"]
        for key, ms in (("fastest_cold", poe["cold"]["ms"]), ("fastest_warm", poe["warm"]["ms"])):
            f = q[key]
            assert f["ratio"] == pytest.approx(f["seconds"] / (ms / 1000))
            assert f["ratio"] > 1  # training anything takes longer than composing
        assert q["fastest_warm"]["ratio"] > q["fastest_cold"]["ratio"]


def test_transfer_keeps_the_library_frozen(tiny_pool_dir):
    import torch

    from benchmarks.baselines import transfer_architecture
    from pool_builder.pool.loader import Pool

    pool = Pool.open(tiny_pool_dir)
    lib = pool.library()
    model = transfer_architecture(lib, lib.cfg, {"bags": pool.hierarchy.class_ids("bags")}, {"bags": 0.25})
    before = {k: v.clone() for k, v in model.library.state_dict().items()}
    model.train()
    assert not model.library.training and not model.library.library.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    after = model.library.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics unchanged


def test_tiny_query_vs_training_writes_report_and_plots(tiny_result):
    result, out = tiny_result
    saved = json.loads((out / "result.json").read_text())
    first = saved["headline"][0]
    assert first["claim"].startswith("fastest baseline's median CPU time to PoE's accuracy over PoE's cold")
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
