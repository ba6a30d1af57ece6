"""Progressive experts (B-DISTIL): stages distilled one after another, partial sums usable, per-stage resume."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from pool_builder.build import build_pool, config_for
from pool_builder.cli import main
from pool_builder.pool.consolidate import consolidate
from pool_builder.errors import PoolBuilderError
from pool_builder.pool.evaluate import Evaluator, held_out_split
from pool_builder.models.wrn import ProgressiveExpert
from pool_builder.pool.loader import Pool

from ..conftest import FMNIST_DIR, PROGRESSIVE_BUILD, TINY_BUILD

STAGES = PROGRESSIVE_BUILD["expert_stages"]


def test_pool_json_records_stages_and_per_stage_accuracy(progressive_pool_dir):
    meta = Pool.open(progressive_pool_dir).meta
    settings = meta.build["settings"]
    assert settings["expert_stages"] == STAGES and settings["stage_width"] == PROGRESSIVE_BUILD["stage_width"]
    for task, entry in meta.experts.items():
        arch = entry.architecture
        assert arch["kind"] == "wrn_progressive_expert" and arch["stages"] == STAGES
        rows = entry.metrics["stages"]
        assert [r["stages"] for r in rows] == list(range(1, STAGES + 1))
        assert rows[-1]["parameters"] == entry.parameters == STAGES * rows[0]["parameters"]
        assert rows[-1]["accuracy"] == entry.metrics["accuracy"]
        for k in range(1, STAGES + 1):
            assert (progressive_pool_dir / f"experts/{task}.stage{k}.pt").is_file()
            assert (progressive_pool_dir / f"stages/expert-{task}.stage{k}.json").is_file()


def test_partial_sums_add_up_and_every_stage_count_is_usable(progressive_pool_dir, fmnist_small):
    pool = Pool.open(progressive_pool_dir)
    features = pool.library()(pool.normalizer(fmnist_small.test.images[:64]))
    for task in pool.meta.tasks:
        expert = pool.expert(task)
        assert isinstance(expert, ProgressiveExpert)
        with torch.no_grad():
            stages = [stage(features) for stage in expert.stages]
            for k, partial in enumerate(expert.partial_sums(features), start=1):
                torch.testing.assert_close(partial, sum(stages[:k]))
                torch.testing.assert_close(expert.partial(k)(features), partial)
            torch.testing.assert_close(expert(features), sum(stages))
    # every stage count gives a usable composite (tiny data: 300 test images), and L_scale keeps partial
    # sums on the oracle's scale: their mean |logit - oracle| stays well below the oracle's mean |logit|
    evaluator = Evaluator(pool, held_out_split(pool))
    tasks = sorted(pool.meta.tasks)
    accuracies = [evaluator.query(tasks, repeats=1, stages=k).poe_accuracy for k in range(1, STAGES + 1)]
    oracle = evaluator.query(tasks, repeats=1).oracle_accuracy
    assert min(accuracies) > oracle - 0.15, (accuracies, oracle)
    assert accuracies[-1] == pytest.approx(evaluator.query(tasks, repeats=1).poe_accuracy)
    for entry in pool.meta.experts.values():
        for row in entry.metrics["stages"]:
            assert row["mean_abs_logit_gap"] < 0.5 * entry.metrics["oracle_mean_abs_logit"]
    with pytest.raises(PoolBuilderError, match="stage count must be >= 1"):
        consolidate(pool, tasks, stages=0)


def test_resume_reuses_finished_stages_and_rebuilds_the_same_bits(progressive_pool_dir, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(progressive_pool_dir, out)
    before = json.loads((out / "pool.json").read_text())["experts"]["tops"]["sha256"]
    for name in (f"experts/tops.stage{STAGES}.pt", "experts/tops.pt", "stages/expert-tops.json", "pool.json"):
        (out / name).unlink()  # as if killed during tops' last stage
    messages: list[str] = []
    build = config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), **PROGRESSIVE_BUILD)
    meta = build_pool(build, log=messages.append, show_progress=False)
    ran = [m.split("]")[0][1:] for m in messages if m.endswith("running")]
    assert ran == [f"expert-tops.stage{STAGES}", "expert-tops"], messages
    assert any(f"[expert-tops.stage{STAGES - 1}] done earlier" in m for m in messages)
    assert meta.experts["tops"].sha256 == before


def test_one_stage_is_todays_build_bit_for_bit(tiny_pool_dir, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(tiny_pool_dir, out)
    before = json.loads((out / "pool.json").read_text())
    messages: list[str] = []
    meta = build_pool(config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), expert_stages=1, **TINY_BUILD),
                      log=messages.append, show_progress=False)
    assert not [m for m in messages if m.endswith("running")], messages  # every fingerprint unchanged
    assert "expert_stages" not in meta.build["settings"] and "stage_width" not in meta.build["settings"]
    assert {t: e.sha256 for t, e in meta.experts.items()} == {t: e["sha256"] for t, e in before["experts"].items()}
    assert all(e.architecture["kind"] == "wrn_expert" for e in meta.experts.values())


@pytest.mark.parametrize("flags, message", [
    (["--expert-stages", "0"], "expert stages must be >= 1"),
    (["--expert-stages", "2", "--stage-width", "1.5"], "stage width must be in (0, 1]"),
])
def test_bad_stage_settings_are_one_line_errors(flags, message, tmp_path, capsys):
    assert main(["build", "--out", str(tmp_path / "p"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pool-builder: error:") and message in err and len(err.splitlines()) == 1
