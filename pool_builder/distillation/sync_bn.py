"""Batch norm whose training statistics span every DDP rank, on CPU over gloo.

Why: with ``--library-workers N`` each rank sees 1/N of every batch.  Plain
batch norm would normalise over that share only, which changes what is trained
(measured on the tiny test build: 2 ranks with per-rank statistics lost up to 5
points of student accuracy against one process).  torch's ``nn.SyncBatchNorm``
refuses CPU tensors, so this is the same algorithm for CPU: per-channel sums
and sums of squares (float64) are all-reduced in the forward pass, the two
per-channel gradient sums in the backward pass.  Each rank then normalises with
the statistics of the whole global batch, and the all-reduced gradients equal a
single process's up to rounding.

The layers are switched in place (same parameters, buffers and state-dict
keys) for the duration of data-parallel training, and switched back after it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

_DIMS = (0, 2, 3)  # every axis of an NCHW batch but the channel


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


class _SyncBatchNormFn(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with mean and variance over the batch on all ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        channels = x.shape[1]
        x64 = x.double()
        stats = torch.cat([x64.sum(_DIMS), (x64 * x64).sum(_DIMS),
                           torch.tensor([x.numel() // channels], dtype=torch.float64)])
        dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean * mean).clamp_(min=0.0)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = (x - _per_channel(mean.to(x.dtype))) * _per_channel(invstd)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = float(count)
        y = xhat * _per_channel(weight) + _per_channel(bias)
        stats_out = (mean.to(x.dtype), var.to(x.dtype), count.to(x.dtype))
        ctx.mark_non_differentiable(*stats_out)
        return (y, *stats_out)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
        xhat, weight, invstd = ctx.saved_tensors
        channels = xhat.shape[1]
        local = torch.cat([grad_y.sum(_DIMS), (grad_y * xhat).sum(_DIMS)])
        grad_bias, grad_weight = local[:channels].clone(), local[channels:].clone()  # this rank's share
        dist.all_reduce(local)  # the whole batch's sums: every rank's inputs moved the statistics
        sum_dy, sum_dy_xhat = local[:channels], local[channels:]
        grad_x = _per_channel(weight * invstd) * (
            grad_y - _per_channel(sum_dy / ctx.count) - xhat * _per_channel(sum_dy_xhat / ctx.count))
        return grad_x, grad_weight, grad_bias, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with cross-rank statistics while training inside a process group (else plain)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y, mean, var, count = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1)) if count > 1 else var
                self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return y


@contextmanager
def synchronized_batch_norm(model: nn.Module) -> Iterator[nn.Module]:
    """Every ``nn.BatchNorm2d`` of ``model`` computes cross-rank statistics inside the block."""
    switched = [m for m in model.modules() if type(m) is nn.BatchNorm2d and m.affine]
    for module in switched:
        module.__class__ = SyncBatchNorm2d
    try:
        yield model
    finally:
        for module in switched:
            module.__class__ = nn.BatchNorm2d
