"""Golden values for the distillation losses (hand-checkable on two-class logits)."""

import math

import pytest
import torch

from pool_builder.distillation.losses import ckd_loss, kd_loss


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computed_kl_times_t_squared():
    s, t = [1.0, -1.0], [3.0, 0.0]
    expected = _kl(_softmax(t, 4.0), _softmax(s, 4.0)) * 16.0
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), 4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_identical_and_shift_invariant():
    z = torch.tensor([[0.5, 2.0, -1.0]])
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(z + 10.0, z, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_ckd_scale_term_sees_what_soft_term_cannot():
    oracle = torch.tensor([[2.0, -1.0, 0.5]])
    shifted = oracle + 3.0  # same softmax, different scale
    loss = ckd_loss(shifted, oracle, 4.0, 0.3)
    assert loss.soft.item() == pytest.approx(0.0, abs=1e-5)
    assert loss.scale.item() == pytest.approx(3.0)
    assert loss.total.item() == pytest.approx(0.9, rel=1e-4)


def test_ckd_alpha_zero_is_soft_only():
    e, o = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    loss = ckd_loss(e, o, 4.0, 0.0)
    assert loss.total.item() == pytest.approx(loss.soft.item())
    assert loss.soft.item() == pytest.approx(_kl(_softmax([0, 2], 4), _softmax([1, 0], 4)) * 16, rel=1e-5)
