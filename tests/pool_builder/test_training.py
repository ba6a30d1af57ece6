"""Training loops: an interrupted stage resumes from its epoch checkpoint to the same weights."""

import numpy as np
import pytest
import torch

from pool_builder.models.wrn import WRNConfig, build_expert_head
from pool_builder.distillation.training import (Checkpoint, EarlyStop, TrainConfig, batches_per_epoch, cached_source,
                                                epoch_batches, extract_expert)


class _Interrupt(Exception):
    pass


def _arrays(n=96):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, 32, 14, 14)).astype(np.float16),
            rng.standard_normal((n, 10)).astype(np.float32) * 3)


def _extract(feats, logits, checkpoint=None, stop_after_calls=None, early=False):
    torch.manual_seed(0)
    head = build_expert_head(WRNConfig(), 0.25, 3)
    calls = {"n": 0}
    source = cached_source(feats)

    def features(idx, x):
        calls["n"] += 1
        if stop_after_calls is not None and calls["n"] > stop_after_calls:
            raise _Interrupt
        return source(idx, x)

    scores = iter([2.0, 1.0, 3.0, 1.5])  # epoch 2 is the best one
    stop = EarlyStop(lambda: next(scores), patience=0) if early else None
    extract_expert(head, len(feats), features, cached_source(logits), (1, 4, 6),
                   TrainConfig(epochs=4, batch_size=32, seed=1), 4.0, 0.3, show_progress=False, checkpoint=checkpoint,
                   early_stop=stop)
    return head.state_dict()


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    feats, logits = _arrays()
    reference = _extract(feats, logits)
    ckpt = Checkpoint(tmp_path / "expert.epoch.pt", "fp")
    with pytest.raises(_Interrupt):
        _extract(feats, logits, ckpt, stop_after_calls=7)  # 3 batches per epoch: dies in epoch 3
    assert ckpt.load()["epoch"] == 2
    resumed = _extract(feats, logits, ckpt)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_resume_keeps_the_early_stopping_state(tmp_path):
    feats, logits = _arrays()
    reference = _extract(feats, logits, early=True)
    ckpt = Checkpoint(tmp_path / "expert.epoch.pt", "fp")
    with pytest.raises(_Interrupt):
        _extract(feats, logits, ckpt, stop_after_calls=7, early=True)
    assert ckpt.load()["early_stop"]["best_epoch"] == 2
    resumed = _extract(feats, logits, ckpt, early=True)  # its score iterator restarts: epochs 3, 4 score 2.0, 1.0
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_checkpoint_of_another_stage_is_ignored(tmp_path):
    ckpt = Checkpoint(tmp_path / "c.pt", "one")
    ckpt.save({"epoch": 1})
    assert Checkpoint(tmp_path / "c.pt", "two").load() is None
    (tmp_path / "c.pt").write_bytes(b"garbage")
    assert ckpt.load() is None


def test_epoch_batches_cover_every_index_once_and_avoid_singletons():
    batches = epoch_batches(65, 32, torch.Generator().manual_seed(0))
    assert len(batches) == batches_per_epoch(65, 32) == 2
    assert [batches_per_epoch(n, 32) for n in (2, 32, 33, 64, 66)] == [1, 1, 1, 2, 3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(65))
    assert min(len(b) for b in batches) >= 2 and all((np.diff(b) > 0).all() for b in batches)
