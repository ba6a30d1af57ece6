"""A user's own image folder, end to end: ~1,000 real Fashion-MNIST images written as PNG files by the test.

One build with the quick profile's rule (a step budget per stage, epochs derived from the folder's size,
early stopping on a held-out share), scaled down to about the tiny build's cost; then what it
recorded (composite check, colour, absolute paths) and each new error and warning.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pool_builder.build.config import epochs_for, config_for, resolve_schedule
from pool_builder.distillation.training import EarlyStop
from pool_builder.errors import PoolBuilderError

from ..conftest import FMNIST_DIR, run_cli_env

PER_CLASS = 100  # 1,000 images: 10 classes as folders named 0..9 (so the hierarchy names them by JSON numbers)
HIERARCHY = {"tops": [0, 2, 4, 6], "footwear": [5, 7, 9], "bottoms": [1, 3]}  # class 8 (Bag) left out on purpose
# the quick profile's rule with budgets ~1/10 of quick's and the small oracle of the tiny build
SMALL = ["--oracle-arch", "wrn_10_1", "--batch-size", "32", "--oracle-steps", "100", "--library-steps", "60",
         "--expert-steps", "200", "--patience", "5", "--threads", "2", "--no-progress"]


def _write_folder(root: Path) -> Path:
    from PIL import Image

    from pool_builder.data.datasets import load_dataset

    data = load_dataset("fashion_mnist", FMNIST_DIR).limited(10 * PER_CLASS, 10, seed=3)
    for i, (image, label) in enumerate(zip(data.train.images, data.train.labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0], "L").save(folder / f"img{i:05d}.png")
    return root


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pool_builder", *args], cwd=cwd, env=run_cli_env(),
                          capture_output=True, text=True, timeout=2400)


@pytest.fixture(scope="module")
def own_pool(tmp_path_factory):
    """Built through the CLI from a relative --data-dir and --hierarchy, with an oracle floor it cannot reach."""
    work = tmp_path_factory.mktemp("own")
    _write_folder(work / "images")
    (work / "tasks.json").write_text(json.dumps(HIERARCHY))
    run = _cli(["build", "--dataset", "image_folder", "--data-dir", "images", "--hierarchy", "tasks.json",
                "--out", "pool", "--oracle-floor", "0.99", *SMALL], work)
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "pool", run


def test_composite_check_figures_exist_and_are_sane(own_pool):
    pool, run = own_pool
    meta = json.loads((pool / "pool.json").read_text())
    checks = meta["checks"]
    assert sorted(c["tasks"] for c in checks["composites"]) == [
        ["bottoms", "footwear"], ["bottoms", "footwear", "tops"], ["bottoms", "tops"], ["footwear", "tops"]]
    for c in checks["composites"]:
        assert c["test_images"] > 30 and 0.2 < c["oracle_accuracy"] <= 1 and 0 <= c["poe_accuracy"] <= 1
        assert c["gap_points"] == pytest.approx(100 * (c["poe_accuracy"] - c["oracle_accuracy"]), abs=0.02)
        assert c["threshold_points"] >= 1.0
    assert checks["worst_gap"]["gap_points"] == min(c["gap_points"] for c in checks["composites"])
    assert set(checks["logit_scale"]) == {"tops", "footwear", "bottoms"}
    for s in checks["logit_scale"].values():
        assert s["oracle_mean_top_logit"] > 0 and s["ratio"] == pytest.approx(
            s["expert_mean_top_logit"] / s["oracle_mean_top_logit"], abs=0.002)
    # every figure beyond its threshold has its one warning line, and no other does
    tolerance = checks["thresholds"]["scale_tolerance"]
    off = {t for t, s in checks["logit_scale"].items() if not 1 / tolerance <= s["ratio"] <= tolerance}
    assert {t for t in checks["logit_scale"] if any(w.startswith(f"expert '{t}' logits") for w in
                                                    checks["warnings"])} == off
    below = [c for c in checks["composites"] if c["gap_points"] < -c["threshold_points"]]
    assert sum(w.startswith("composite ") for w in checks["warnings"]) == len(below)
    assert "composite check: worst gap" in run.stdout
    # the schedule was derived from the folder's size: ~720 training images at batch 32 -> 23 steps an epoch
    settings, build = meta["build"]["settings"], meta["build"]
    assert build["validation_images"] > 50 and build["train_images"] + build["validation_images"] < 1000
    assert settings["oracle_epochs"] == epochs_for(100, 32, build["train_images"], 1, 200)
    assert settings["expert_epochs"] == epochs_for(200, 32, build["train_images"], 1, 200) > 5
    assert 1 <= meta["oracle"]["metrics"]["best_epoch"] <= meta["oracle"]["metrics"]["epochs_run"]


def test_warnings_name_the_problem(own_pool):
    pool, run = own_pool
    warnings = json.loads((pool / "pool.json").read_text())["checks"]["warnings"]
    assert any("no task lists the class(es) '8'" in w for w in warnings)
    assert any("below the floor 99%" in w and "--oracle-steps" in w for w in warnings)
    assert sum(line.startswith("warning: ") for line in run.stdout.splitlines()) == len(warnings)


def test_paths_are_absolute_and_the_colour_recorded(own_pool, tmp_path):
    pool, _ = own_pool
    settings = json.loads((pool / "pool.json").read_text())["build"]["settings"]
    assert Path(settings["data_dir"]).is_absolute() and Path(settings["hierarchy"]).is_absolute()
    assert settings["color"] == "grey"
    run = _cli(["query", "--pool", str(pool), "--tasks", "tops,footwear", "--json"], tmp_path)  # another cwd
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["queries"][0]["test_images"] > 30


def test_an_expert_off_the_oracle_scale_is_named(own_pool, tmp_path):
    from pool_builder.data.datasets import reload_dataset
    from pool_builder.models.weights import save_state_dict
    from pool_builder.pool.checks import build_checks
    from pool_builder.pool.format import read_pool_json, write_pool_json
    from pool_builder.pool.loader import Pool

    pool = tmp_path / "pool"
    shutil.copytree(own_pool[0], pool, ignore=shutil.ignore_patterns("cache", "stages"))
    meta = read_pool_json(pool)
    before = meta.checks["logit_scale"]
    task = min(before, key=lambda t: abs(np.log(before[t]["ratio"])))  # the expert closest to the oracle's scale
    assert before[task]["ratio"] < 1.6  # so that half of it is off the scale
    head = Pool(pool, meta).expert(task)
    last = [k for k, v in head.state_dict().items() if v.ndim == 2][-1]  # the output layer
    with torch.no_grad():
        for key in (last, last.replace("weight", "bias")):
            head.state_dict()[key].mul_(0.5)  # logits at half their scale, as in the report (5.8 vs 10.5)
    meta.experts[task].sha256 = save_state_dict(head, pool / meta.experts[task].file)
    write_pool_json(pool, meta)
    test = reload_dataset("image_folder", meta.build["settings"]).test
    checks = build_checks(pool, test, log=lambda _m: None)
    assert checks["logit_scale"][task]["ratio"] == pytest.approx(0.5 * before[task]["ratio"], abs=0.01)
    assert any(w.startswith(f"expert '{task}' logits are 0.") and "--expert-steps" in w for w in checks["warnings"])


def test_mixed_colours_exit_2_with_counts(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("test", 1)):
        for cls, mode in (("a", "L"), ("b", "RGB")):  # "a" sorts first: it used to decide grey for all
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new(mode, (8, 8)).save(tmp_path / "imgs" / split / cls / f"{cls}{i}.png")
    run = _cli(["build", "--dataset", "image_folder", "--data-dir", "imgs", "--out", "p"], tmp_path)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "mixes 4 grey and 4 RGB images" in run.stderr and "--color grey or --color rgb" in run.stderr


def test_epochs_follow_a_step_budget():
    assert epochs_for(250, 128, 10800, 1, 200) == 3  # quick at 12k images: the former 3 oracle epochs
    assert epochs_for(250, 128, 1260, 1, 200) == 26  # a 1.4k-image folder gets the same number of steps
    assert epochs_for(250, 128, 60, 1, 200) == 200 and epochs_for(10, 128, 10 ** 6, 2, 200) == 2
    cfg = resolve_schedule(config_for("quick", out="x", expert_epochs=4), 1260)
    assert (cfg.oracle_epochs, cfg.library_epochs, cfg.expert_epochs) == (26, 51, 4)
    with pytest.raises(PoolBuilderError, match="validation share"):
        config_for("quick", out="x", val_share=0.7)


def test_early_stop_keeps_the_best_epoch():
    model = torch.nn.Linear(2, 2)
    scores = iter([3.0, 1.0, 2.0, 2.5, 9.0])
    stop = EarlyStop(lambda: next(scores), patience=2)
    kept = None
    for epoch in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        if epoch == 2:
            kept = model.weight.detach().clone()
        if stop.update(epoch, model):
            break
    assert epoch == 4 and stop.best_epoch == 2
    stop.restore(model)
    assert torch.equal(model.weight, kept)


def test_gap_threshold_is_two_paired_standard_errors_at_least_one_point():
    from pool_builder.pool.checks import gap_threshold
    from pool_builder.pool.evaluate import QueryReport

    def report(n: int, only_oracle: int, only_poe: int) -> QueryReport:
        return QueryReport(["a", "b"], [], n, 0.8, 0.85, -5.0, 1, 1, 0.0, 0.0, 0, 0, 0.0,
                           oracle_only_right=only_oracle, poe_only_right=only_poe)

    assert gap_threshold(report(200, 14, 2)) == pytest.approx(4.0)  # 2 * 100 * sqrt(16) / 200
    assert gap_threshold(report(10000, 30, 6)) == 1.0  # many images: the 1-point floor
