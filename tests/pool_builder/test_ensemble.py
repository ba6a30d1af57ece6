"""Multi-teacher oracles: each fusion rule on hand-checkable numbers, bad input, a tiny real ensemble build."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pool_builder.cli import main
from pool_builder.models.ensemble import (Ensemble, EnsembleConfig, FusionConfig, TeacherSpec, check_teachers_agree,
                                   fit_weights, list_fusions, stack_logits, validation_indices)
from pool_builder.errors import PoolBuilderError

from ..conftest import FMNIST_DIR, TINY_BUILD


def _log(*probs):
    """Logits whose softmax is exactly ``probs`` (one image)."""
    return [math.log(p) for p in probs]


# --------------------------------------------------------------------------- fusion rules by hand

def test_registry_lists_the_four_rules():
    assert list_fusions() == ["mean_logits", "mean_probs", "vote", "weighted"]


def test_mean_logits():
    z = np.array([[[1.0, 0.0, 0.0]], [[3.0, 2.0, 0.0]]])  # K=2, N=1, C=3
    assert FusionConfig("mean_logits").fuse(z).tolist() == [[2.0, 1.0, 0.0]]


def test_mean_probs_is_log_of_mean_softmax():
    z = np.array([[_log(0.8, 0.2)], [_log(0.4, 0.6)]])
    fused = FusionConfig("mean_probs").fuse(z)
    np.testing.assert_allclose(fused.exp().numpy(), [[0.6, 0.4]], rtol=1e-6)
    # mean logits of the same teachers is the geometric mean: softmax = [sqrt(.32), sqrt(.12)] / sum
    geo = FusionConfig("mean_logits").fuse(z).softmax(1).numpy()
    np.testing.assert_allclose(geo, [[math.sqrt(.32) / (math.sqrt(.32) + math.sqrt(.12)),
                                      math.sqrt(.12) / (math.sqrt(.32) + math.sqrt(.12))]], rtol=1e-6)


def test_vote_majority_beats_one_confident_teacher():
    z = np.array([[[20.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.5]]])  # votes: class 0 once, class 1 twice
    fused = FusionConfig("vote").fuse(z)
    assert fused.argmax(1).item() == 1
    assert FusionConfig("mean_probs").fuse(z).argmax(1).item() == 0  # the confident teacher would win on probs
    assert torch.isfinite(fused).all()


def test_vote_tie_is_broken_by_mean_probability():
    z = np.array([[_log(0.7, 0.2, 0.1)], [_log(0.2, 0.5, 0.3)]])  # one vote each for classes 0 and 1
    shares = FusionConfig("vote").fuse(z).exp().numpy()
    # (votes + 0.5 * mean_prob) / (K + 0.5) with mean_prob = [0.45, 0.35, 0.2]
    np.testing.assert_allclose(shares, [[1.225 / 2.5, 1.175 / 2.5, 0.1 / 2.5]], rtol=1e-6)
    assert shares.sum() == pytest.approx(1.0)


def test_weighted_with_given_weights():
    z = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert FusionConfig("weighted", (3.0, 1.0)).fuse(z).tolist() == [[0.75, 0.25]]
    assert FusionConfig("weighted", (0.0, 2.0)).fuse(z).tolist() == [[0.0, 1.0]]  # a zero weight drops a teacher


def test_fitted_weights_trust_the_teacher_that_is_right():
    labels = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(3)[labels] * 4.0
    wrong = np.eye(3)[(labels + 1) % 3] * 4.0
    weights = fit_weights(np.stack([wrong, right]), labels)
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert weights[1] > 0.9 > weights[0]


def test_validation_share_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), 50)
    rows = validation_indices(labels, 0.1, seed=3)
    assert np.bincount(labels[rows]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(rows, validation_indices(labels, 0.1, seed=3))
    assert not np.array_equal(rows, validation_indices(labels, 0.1, seed=4))


# --------------------------------------------------------------------------- bad input

def test_unknown_fusion_lists_valid_ones():
    with pytest.raises(PoolBuilderError, match="unknown fusion 'median'; valid fusions: mean_logits, mean_probs, "
                                               "vote, weighted"):
        FusionConfig("median")


@pytest.mark.parametrize("weights, message", [
    ((0.0, 0.0), "sum to a positive value"),
    ((1.0, -0.5), "must be >= 0"),
    ((1.0, float("nan")), "finite"),
])
def test_bad_weights(weights, message):
    with pytest.raises(PoolBuilderError, match=message):
        FusionConfig("weighted", weights)


def test_weights_must_match_the_teachers():
    teachers = (TeacherSpec(arch="wrn_10_1"), TeacherSpec(arch="wrn_10_1", seed=1), TeacherSpec(arch="wrn_16_1"))
    with pytest.raises(PoolBuilderError, match="2 fusion weights for 3 teachers"):
        EnsembleConfig(teachers, FusionConfig("weighted", (0.5, 0.5)))
    with pytest.raises(PoolBuilderError, match="2 fusion weights for 3 teachers"):
        FusionConfig("weighted", (0.5, 0.5)).fuse(np.zeros((3, 1, 2)))
    with pytest.raises(PoolBuilderError, match="only used by the 'weighted' fusion"):
        FusionConfig("vote", (0.5, 0.5))
    with pytest.raises(PoolBuilderError, match="at least 2 teachers"):
        EnsembleConfig(teachers[:1])


def test_teachers_with_different_class_counts_or_input_shapes():
    with pytest.raises(PoolBuilderError, match=r"teacher 1 gives logits of shape \(4, 7\), but teacher 0 gives \(4, 10\)"):
        stack_logits([np.zeros((4, 10)), np.zeros((4, 7))])
    grey10 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    grey7 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))
    rgb10 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(PoolBuilderError, match="teacher b gives 7 classes, but teacher a gives 10"):
        Ensemble([grey10, grey7], FusionConfig(), ["a", "b"], input_shape=(1, 28, 28))
    with pytest.raises(PoolBuilderError, match=r"teacher rgb fails on input of shape \(N, 1, 28, 28\)"):
        check_teachers_agree([grey10, rgb10], ["grey", "rgb"], (1, 28, 28))
    with pytest.raises(PoolBuilderError, match="teacher a gives 10 classes, but the data set has 7"):
        check_teachers_agree([grey10], ["a"], (1, 28, 28), num_classes=7)


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pool-builder: error:") and "Traceback" not in "\n".join(err), err
    assert expected in err[-1], err[-1]


def test_cli_bad_ensemble_flags(capsys, tmp_path):
    out = ["--out", str(tmp_path / "p"), "--data-dir", str(FMNIST_DIR)]
    _one_line_error(capsys, ["build", "--teacher-archs", "wrn_10_1,wrn_16_1", "--fusion", "median", *out],
                    "unknown fusion 'median'; valid fusions: mean_logits, mean_probs, vote, weighted")
    _one_line_error(capsys, ["build", "--teacher-archs", "wrn_10_1,wrn_16_1", "--fusion", "weighted",
                             "--fusion-weights", "0.5,0.3,0.2", *out], "3 fusion weights for 2 teachers")
    _one_line_error(capsys, ["build", "--teacher-archs", "wrn_10_1,wrn_16_1", "--fusion", "weighted",
                             "--fusion-weights", "0.5,x", *out], "--fusion-weights takes float values")
    _one_line_error(capsys, ["build", "--fusion", "vote", *out], "--fusion needs teachers")
    _one_line_error(capsys, ["build", "--oracle-arch", "wrn_16_2", "--teacher-archs", "wrn_10_1,wrn_16_1", *out],
                    "not both")
    _one_line_error(capsys, ["build", "--teacher-archs", "wrn_10_1,vgg", *out], "unknown architecture 'vgg'")
    _one_line_error(capsys, ["build", "--teachers", str(tmp_path / "a.pt"), "--teacher-archs", "wrn_10_1",
                             "--teacher-seeds", "1", *out], "teacher seeds apply to teachers the builder trains")


def test_cli_teacher_file_with_wrong_class_count(capsys, tmp_path):
    path = tmp_path / "seven.ts"
    torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))).save(str(path))
    _one_line_error(capsys, ["build", "--teachers", f"{path},{path}", "--out", str(tmp_path / "p"),
                             "--data-dir", str(FMNIST_DIR), "--train-limit", "100", "--no-progress"],
                    "outputs (2, 7) for 2 images, but the data set has 10 classes")


# --------------------------------------------------------------------------- a tiny real ensemble build

@pytest.fixture(scope="module")
def ensemble_pool(tiny_pool_dir, tmp_path_factory):
    """Two teachers: the tiny pool's trained oracle given as a file, and a second one the builder trains."""
    from pool_builder.build import build_pool, config_for

    out = tmp_path_factory.mktemp("ensemble") / "mean_probs"
    teachers = (TeacherSpec(file=str(tiny_pool_dir / "oracle.pt"), arch="wrn_10_1"),
                TeacherSpec(arch="wrn_10_1", seed=1))
    settings = {**TINY_BUILD, "oracle_arch": None, "oracle_epochs": 2, "library_epochs": 1, "expert_epochs": 1}
    cfg = config_for("quick", out=str(out), data_dir=str(FMNIST_DIR),
                     ensemble=EnsembleConfig(teachers, FusionConfig("mean_probs")), **settings)
    logs = []
    meta = build_pool(cfg, log=logs.append, show_progress=False)
    return out, cfg, meta, logs


def test_ensemble_pool_records_teachers_and_fusion(ensemble_pool):
    from pool_builder.pool.loader import Pool

    out, _cfg, meta, _logs = ensemble_pool
    raw = json.loads((out / "pool.json").read_text())
    assert raw["oracle"]["file"] == "ensemble.json" and raw["oracle"]["architecture"]["fusion"] == "mean_probs"
    assert list(raw["teachers"]) == ["t0:oracle.pt(wrn_10_1)", "t1:wrn_10_1@seed1"]
    assert raw["teachers"]["t0:oracle.pt(wrn_10_1)"]["metrics"]["source"] == "user"
    assert raw["teachers"]["t1:wrn_10_1@seed1"]["metrics"]["train_images"] == 540  # 60 held out for validation
    assert raw["build"]["settings"]["ensemble"]["fusion"]["name"] == "mean_probs"
    described = json.loads((out / "ensemble.json").read_text())
    assert [t["sha256"] for t in described["teachers"]] == [t["sha256"] for t in raw["teachers"].values()]
    Pool.open(out).verify()


def test_teachers_run_once_and_fused_cache_is_their_fusion(ensemble_pool, fmnist_small):
    from pool_builder.pool.loader import Pool

    out, _cfg, _meta, logs = ensemble_pool
    assert sum("computing" in line and "teacher-" in line for line in logs) == 2
    # the single-oracle code path finds the fused logits where it looks for an oracle's
    assert logs.index("cache oracle_logits.npy: computing (600, 10) float32") < logs.index(
        "cache oracle_logits.npy: reusing (600, 10) float32")
    member = np.stack([np.load(out / "cache" / f"teacher-{i}_logits.npy") for i in range(2)])
    fused = np.load(out / "cache" / "oracle_logits.npy")
    np.testing.assert_allclose(fused, np.log(torch.softmax(torch.from_numpy(member), -1).mean(0).numpy()),
                               rtol=1e-5, atol=1e-6)
    # --online fuses per batch through the same module: identical teacher logits
    ensemble = Pool.open(out).oracle()
    with torch.no_grad():
        online = ensemble(Pool.open(out).normalizer(fmnist_small.train.images[:64])).numpy()
    np.testing.assert_allclose(online, fused[:64], rtol=1e-4, atol=1e-4)


def test_query_reports_each_teacher_the_ensemble_and_the_pool(ensemble_pool, fmnist_small, capsys):
    from pool_builder.pool.evaluate import Evaluator, predict_logits, restricted_accuracy
    from pool_builder.pool.loader import Pool

    out, _cfg, meta, _logs = ensemble_pool
    pool = Pool.open(out)
    report = Evaluator(pool, fmnist_small.test).query("footwear,tops")
    assert list(report.teacher_accuracies) == list(meta.teachers)
    teacher0 = pool.oracle().teachers[0]
    union = [0, 2, 4, 5, 6, 7, 9]
    mask = np.isin(fmnist_small.test.labels, union)
    direct = restricted_accuracy(predict_logits(teacher0, fmnist_small.test.images[mask], pool.normalizer),
                                 fmnist_small.test.labels[mask], union)
    assert report.teacher_accuracies["t0:oracle.pt(wrn_10_1)"] == pytest.approx(direct)
    assert "teacher_accuracies" in report.to_json()
    assert main(["query", "--pool", str(out), "--tasks", "footwear,tops", "--data-dir", str(FMNIST_DIR)]) == 0
    printed = capsys.readouterr().out
    assert "t1:wrn_10_1@seed1" in printed and "PoE (from ensemble)" in printed


def test_changed_fusion_reuses_teachers_but_not_the_fused_cache(ensemble_pool, tmp_path):
    from dataclasses import replace

    from pool_builder.build import build_pool

    src, cfg, meta, _logs = ensemble_pool
    out = tmp_path / "weighted"
    shutil.copytree(src, out)
    logs = []
    weighted = build_pool(replace(cfg, out=str(out), ensemble=replace(cfg.ensemble, fusion=FusionConfig("weighted"))),
                          log=logs.append, show_progress=False)
    assert "[teacher-0] done earlier, reusing teachers/t0.pt" in logs
    assert "[teacher-1] done earlier, reusing teachers/t1.pt" in logs
    assert any(line.startswith("cache teacher-1_logits.npy: reusing") for line in logs)
    assert "cache oracle_logits.npy: computing (600, 10) float32" in logs
    assert "[library] running" in logs and weighted.pool_id != meta.pool_id
    recorded = json.loads((out / "ensemble.json").read_text())["fusion"]
    assert recorded["weights_source"] == "fitted on the validation split"
    assert sum(recorded["weights"]) == pytest.approx(1.0, abs=1e-5)


def test_cli_flags_become_the_ensemble_config(tmp_path):
    from pool_builder.cli import _ensemble, parser

    args = parser().parse_args(["build", "--teacher-archs", "wrn_10_1,wrn_16_1", "--teacher-seeds", "3,4",
                                "--fusion", "weighted", "--fusion-weights", "1,3", "--val-fraction", "0.2"])
    assert _ensemble(args) == EnsembleConfig((TeacherSpec(arch="wrn_10_1", seed=3), TeacherSpec(arch="wrn_16_1", seed=4)),
                                             FusionConfig("weighted", (1.0, 3.0)), 0.2)
    args = parser().parse_args(["build", "--teachers", "a.ts,b.pt", "--teacher-archs", "torchscript,wrn_16_2",
                                "--seed", "5"])
    assert _ensemble(args).teachers == (TeacherSpec(file="a.ts"), TeacherSpec(file="b.pt", arch="wrn_16_2"))
    assert _ensemble(parser().parse_args(["build", "--teacher-archs", "wrn_10_1,wrn_10_1", "--seed", "5"])).teachers \
        == (TeacherSpec(arch="wrn_10_1", seed=5), TeacherSpec(arch="wrn_10_1", seed=6))
    assert _ensemble(parser().parse_args(["build"])) is None
