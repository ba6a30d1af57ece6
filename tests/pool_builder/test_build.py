"""Every stage on a tiny real pool: contents of pool.json, consolidation, evaluation, resume."""

import json
import shutil

import numpy as np
import pytest
import torch

from pool_builder.build import build_pool, config_for
from pool_builder.pool.consolidate import consolidate, save_composed
from pool_builder.errors import PoolFormatError
from pool_builder.pool.evaluate import Evaluator
from pool_builder.pool.loader import Pool
from pool_builder.pool.format import POOL_SCHEMA_VERSION

from ..conftest import FMNIST_DIR, TINY_BUILD


def test_pool_json_describes_every_file(tiny_pool_dir):
    meta = json.loads((tiny_pool_dir / "pool.json").read_text())
    assert meta["schema_version"] == POOL_SCHEMA_VERSION
    assert meta["dataset"]["class_names"][7] == "Sneaker" and meta["dataset"]["input_shape"] == [1, 28, 28]
    assert meta["tasks"]["footwear"] == [5, 7, 9]
    assert set(meta["experts"]) == {"tops", "footwear", "bottoms", "bags"}
    assert meta["library"]["architecture"]["kind"] == "wrn_library"
    for entry in [meta["oracle"], meta["library"], *meta["experts"].values()]:
        assert (tiny_pool_dir / entry["file"]).is_file() and len(entry["sha256"]) == 64
    assert all(e["library_sha256"] == meta["library"]["sha256"] for e in meta["experts"].values())
    assert meta["build"]["settings"]["alpha"] == 0.3 and meta["build"]["settings"]["temperature"] == 4.0
    assert 0.0 < meta["oracle"]["metrics"]["test_accuracy"] <= 1.0
    Pool.open(tiny_pool_dir).verify()


def test_weights_load_with_weights_only(tiny_pool_dir):
    state = torch.load(tiny_pool_dir / "experts" / "footwear.pt", weights_only=True)
    assert state["fc.weight"].shape == (3, 16)


def test_consolidation_places_expert_logits_at_global_ids(tiny_pool_dir, fmnist_small):
    pool = Pool.open(tiny_pool_dir)
    result = consolidate(pool, "footwear,bottoms")
    assert result.class_ids == [1, 3, 5, 7, 9]
    x = pool.normalizer(fmnist_small.test.images[:8])
    with torch.no_grad():
        composed = result.model(x)
        feats = pool.library()(x)
        foot, bottoms = pool.expert("footwear")(feats), pool.expert("bottoms")(feats)
    # columns: Trouser(1)=bottoms[0], Dress(3)=bottoms[1], Sandal(5), Sneaker(7), Ankle boot(9)=footwear
    expected = torch.stack([bottoms[:, 0], bottoms[:, 1], foot[:, 0], foot[:, 1], foot[:, 2]], dim=1)
    torch.testing.assert_close(composed, expected)
    assert result.consolidation_ms >= 0.0


def test_query_evaluation_against_restricted_oracle(tiny_pool_dir, fmnist_small):
    pool = Pool.open(tiny_pool_dir)
    report = Evaluator(pool, fmnist_small.test).query(["footwear", "tops"])
    assert report.test_images == 210  # 7 classes x 30 test images
    assert report.classes == ["T-shirt/top", "Pullover", "Coat", "Sandal", "Shirt", "Sneaker", "Ankle boot"]
    assert report.gap_points == pytest.approx((report.poe_accuracy - report.oracle_accuracy) * 100)
    assert report.poe_parameters < report.oracle_parameters * 2
    assert 0 <= report.cross_expert_errors <= report.errors
    assert report.poe_accuracy > 0.3  # far above chance (1/7) even for this tiny build


def test_saved_composed_model_is_torchscript(tiny_pool_dir, fmnist_small, tmp_path):
    pool = Pool.open(tiny_pool_dir)
    result = consolidate(pool, ["bags", "footwear"])
    path = save_composed(result, pool, tmp_path / "composed.pt")
    loaded = torch.jit.load(str(path))
    x = pool.normalizer(fmnist_small.test.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))
    sidecar = json.loads((tmp_path / "composed.pt.json").read_text())
    assert sidecar["class_names"] == ["Sandal", "Sneaker", "Bag", "Ankle boot"]


def test_rebuild_reuses_every_finished_stage(tiny_pool_dir):
    logs = []
    meta = build_pool(config_for("quick", out=str(tiny_pool_dir), data_dir=str(FMNIST_DIR), **TINY_BUILD),
                      log=logs.append, show_progress=False)
    assert not any(line.endswith("running") for line in logs), logs
    assert sum("done earlier" in line for line in logs) == 6
    assert meta.pool_id == Pool.open(tiny_pool_dir).meta.pool_id


def test_changed_setting_rebuilds_only_what_depends_on_it(pool_copy, tiny_pool_dir):
    logs = []
    build_pool(config_for("quick", out=str(pool_copy), data_dir=str(FMNIST_DIR), **{**TINY_BUILD, "alpha": 0.0}),
               log=logs.append, show_progress=False)
    assert "[oracle] done earlier, reusing oracle.pt" in logs
    assert "[library] done earlier, reusing library.pt" in logs
    assert sum(line.startswith("[expert-") and line.endswith("running") for line in logs) == 4
    assert json.loads((pool_copy / "pool.json").read_text())["build"]["settings"]["alpha"] == 0.0
    # without L_scale the experts drift away from the oracle's logit values (only their softmax is fitted)
    with_scale, without = Pool.open(tiny_pool_dir).meta.experts, Pool.open(pool_copy).meta.experts
    gaps = {t: (with_scale[t].metrics["mean_abs_logit_gap"], without[t].metrics["mean_abs_logit_gap"])
            for t in with_scale}
    assert all(a < b for a, b in gaps.values()), gaps


def test_other_thread_count_recomputes_caches_and_experts(tiny_pool_dir, tmp_path):
    """--threads changes the bits of training (and may change those of inference kernels), so caches and experts
    record it: a 1-thread build over a 2-thread pool recomputes them instead of reusing 2-thread bits, and going
    back to 2 threads gives the 2-thread pool's bits again.  Oracle and library are reused whatever the threads
    (retraining them is the expensive part; what derives from them is keyed by their sha256)."""
    out = tmp_path / "pool"
    shutil.copytree(tiny_pool_dir, out)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            logs: list[str] = []
            meta = build_pool(config_for("quick", out=str(out), data_dir=str(FMNIST_DIR),
                                         **{**TINY_BUILD, "threads": count}), log=logs.append, show_progress=False)
            runs.append((logs, meta))
    finally:
        torch.set_num_threads(threads)
    for logs, _meta in runs:
        assert "[oracle] done earlier, reusing oracle.pt" in logs and "[library] done earlier, reusing library.pt" in logs
        assert "cache oracle_logits.npy: computing (600, 10) float32" in logs, logs
        assert "cache library_features.npy: computing (600, 32, 14, 14) float16" in logs, logs
        assert sum(line.startswith("[expert-") and line.endswith("running") for line in logs) == 4
    assert runs[1][1].pool_id == Pool.open(tiny_pool_dir).meta.pool_id
    for task in ("tops", "footwear", "bottoms", "bags"):
        assert (out / "experts" / f"{task}.pt").read_bytes() == (tiny_pool_dir / "experts" / f"{task}.pt").read_bytes()
    for cache in ("oracle_logits.npy", "library_features.npy"):
        assert np.array_equal(np.load(out / "cache" / cache), np.load(tiny_pool_dir / "cache" / cache))


def test_tampered_weights_are_refused(pool_copy):
    path = pool_copy / "experts" / "tops.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    pool = Pool.open(pool_copy)
    consolidate(pool, "footwear")  # other experts are unaffected
    with pytest.raises(PoolFormatError, match="expert 'tops' weights .* fail their checksum"):
        consolidate(pool, "tops")


def test_incompatible_schema_version_is_refused(pool_copy):
    meta = json.loads((pool_copy / "pool.json").read_text())
    meta["schema_version"] = 99
    (pool_copy / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolFormatError, match="schema_version 99; this pool_builder reads schema_version 1"):
        Pool.open(pool_copy)


def test_path_escape_in_pool_json_is_refused(pool_copy):
    meta = json.loads((pool_copy / "pool.json").read_text())
    meta["experts"]["bags"]["file"] = "../../etc/passwd"
    (pool_copy / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolFormatError, match="unsafe file name"):
        Pool.open(pool_copy)


def test_expert_logits_track_the_oracle_subset_logits(tiny_pool_dir):
    """L_scale at work: experts reproduce the oracle's logit values, not only their ranking."""
    meta = Pool.open(tiny_pool_dir).meta
    for task, entry in meta.experts.items():
        if len(entry.class_ids) < 2:
            continue
        gap, scale = entry.metrics["mean_abs_logit_gap"], entry.metrics["oracle_mean_abs_logit"]
        assert gap < 0.5 * scale, (task, gap, scale)


def test_cache_files_are_memory_mappable_and_match_records(tiny_pool_dir):
    feats = np.load(tiny_pool_dir / "cache" / "library_features.npy", mmap_mode="r")
    record = json.loads((tiny_pool_dir / "cache" / "library_features.json").read_text())
    assert list(feats.shape) == record["shape"] == [600, 32, 14, 14] and record["dtype"] == "float16"


def test_expert_extraction_is_reproducible_with_a_seed(tiny_pool_dir):
    from pool_builder.models.wrn import build_expert_head
    from pool_builder.distillation.training import TrainConfig, cached_source, extract_expert

    feats = np.load(tiny_pool_dir / "cache" / "library_features.npy", mmap_mode="r")
    logits = np.load(tiny_pool_dir / "cache" / "oracle_logits.npy", mmap_mode="r")
    student = Pool.open(tiny_pool_dir).library().cfg

    def extract(seed):
        torch.manual_seed(seed)
        head = build_expert_head(student, 0.25, 3)
        extract_expert(head, len(feats), cached_source(feats), cached_source(logits), (5, 7, 9),
                       TrainConfig(epochs=1, batch_size=32, seed=seed), 4.0, 0.3, show_progress=False)
        return head.state_dict()

    a, b, c = extract(3), extract(3), extract(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
