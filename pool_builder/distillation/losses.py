"""The distillation losses of Pool of Experts (Kim & Choi, SIGMOD 2021, Eq. 2-4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, averaged over the batch (Hinton et al.)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


@dataclass
class CKDLoss:
    """Conditional KD loss and its two parts, kept separate for logging."""

    total: torch.Tensor
    soft: torch.Tensor
    scale: torch.Tensor


def ckd_loss(expert_logits: torch.Tensor, oracle_task_logits: torch.Tensor, temperature: float,
             alpha: float) -> CKDLoss:
    """L_soft + alpha * L_scale on the oracle's logits restricted to the task's classes.

    L_scale is the mean absolute difference between expert and oracle logits; it
    keeps every expert on the oracle's logit scale so that concatenating
    independently trained experts gives a meaningful argmax.
    """
    target = oracle_task_logits.float()
    soft = kd_loss(expert_logits, target, temperature)
    scale = F.l1_loss(expert_logits, target)
    return CKDLoss(soft + alpha * scale, soft, scale)
