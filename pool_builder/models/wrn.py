"""The wide residual networks of a pool and their library/expert split (registered as ``wrn_<depth>_<k>``).

The seam between library and expert follows timm's ``forward_features`` /
``forward_head``: the library is the stem plus the first two groups of a
WRN-16-k student, an expert is the last group at reduced width plus pooling
and a task-sized linear head (Kim & Choi, SIGMOD 2021, Section 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pool_builder.errors import PoolBuilderError
from pool_builder.models.registry import (KIND_EXPERT, KIND_LIBRARY, KIND_PROGRESSIVE_EXPERT, register_kind,
                                          register_model)


class PreActBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice) as in WRN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


def _group(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [PreActBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(blocks)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class WRNConfig:
    """Shape of a WRN-depth-k network; travels with the weights in pool.json."""

    depth: int = 16
    widen_factor: float = 1.0
    in_channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise PoolBuilderError(f"WRN depth must be 6n+4 and >= 10 (10, 16, 22, 28...), got {self.depth}")
        if self.widen_factor <= 0:
            raise PoolBuilderError(f"WRN widen_factor must be positive, got {self.widen_factor}")
        if self.in_channels not in (1, 3):
            raise PoolBuilderError(f"in_channels must be 1 (grey) or 3 (RGB), got {self.in_channels}")
        if self.num_classes < 1:
            raise PoolBuilderError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // 6

    @property
    def widths(self) -> tuple[int, int, int]:
        return tuple(max(1, round(w * self.widen_factor)) for w in (16, 32, 64))  # type: ignore[return-value]


class Library(nn.Module):
    """Stem and the first two WRN groups: the part shared by every expert."""

    def __init__(self, cfg: WRNConfig) -> None:
        super().__init__()
        w1, w2, _ = cfg.widths
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.in_channels, 16, 3, 1, 1, bias=False)
        self.group1 = _group(16, w1, cfg.blocks_per_group, 1)
        self.group2 = _group(w1, w2, cfg.blocks_per_group, 2)

    @property
    def out_channels(self) -> int:
        return self.cfg.widths[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group2(self.group1(self.stem(x)))


class Head(nn.Module):
    """Last WRN group, final BN-ReLU, global average pooling and a linear classifier."""

    def __init__(self, in_ch: int, width: int, blocks: int, num_outputs: int) -> None:
        super().__init__()
        self.group3 = _group(in_ch, width, blocks, 2)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.group3(features)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(nn.Module):
    """WRN-depth-k classifier with the library/head seam exposed as named methods."""

    def __init__(self, cfg: WRNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.library = Library(cfg)
        self.head = Head(cfg.widths[1], cfg.widths[2], cfg.blocks_per_group, cfg.num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.library(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_expert_head(student: WRNConfig, width_factor: float, num_outputs: int) -> Head:
    """An expert: the student's last group at ``width_factor`` of its width, |task| outputs."""
    if not 0 < width_factor <= 1:
        raise PoolBuilderError(f"expert width factor must be in (0, 1], got {width_factor}")
    if num_outputs < 1:
        raise PoolBuilderError("an expert needs at least one class")
    width = expert_stage_width(student, width_factor)
    head = Head(student.widths[1], width, student.blocks_per_group, num_outputs)
    init_weights(head)
    return head


class ProgressiveExpert(nn.Module):
    """An expert as S small heads on the library's features whose logits add up (B-DISTIL, residual fitting).

    Stage ``s`` was distilled with stages ``1..s-1`` frozen, against the CKD target
    on the running sum, so the first ``k`` stages alone are a usable expert: a
    device trades accuracy for latency by running fewer of them.
    """

    def __init__(self, stages: list[Head]) -> None:
        super().__init__()
        if not stages:
            raise PoolBuilderError("a progressive expert needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.active = len(stages)  # how many stages forward() sums; see partial()

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def partial_sums(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Logits after 1, 2, ..., S stages."""
        out, total = [], None
        for stage in self.stages:
            logits = stage(features)
            total = logits if total is None else total + logits
            out.append(total)
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        total = self.stages[0](features)
        for stage in list(self.stages)[1:self.active]:
            total = total + stage(features)
        return total

    def partial(self, k: int) -> "ProgressiveExpert":
        """The same weights summing only the first ``k`` stages (a shallow copy; the weights are shared)."""
        if not 1 <= k <= self.num_stages:
            raise PoolBuilderError(f"stage count must be in 1..{self.num_stages}, got {k}")
        view = ProgressiveExpert(list(self.stages))
        view.active = k
        return view.train(self.training)


def expert_stage_width(student: WRNConfig, width_factor: float) -> int:
    """Channels of an expert (or of one stage of a progressive expert) at ``width_factor``."""
    return max(1, round(student.widths[2] * width_factor))


def build_progressive_expert(student: WRNConfig, stage_width: float, stages: int, num_outputs: int) -> ProgressiveExpert:
    """``stages`` expert heads of ``stage_width`` each (same shape as :func:`build_expert_head`)."""
    if stages < 1:
        raise PoolBuilderError(f"expert stages must be >= 1, got {stages}")
    return ProgressiveExpert([build_expert_head(student, stage_width, num_outputs) for _ in range(stages)])


def init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, unit BN, zero biases (WRN reference init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- pool.json records

def library_architecture(student: WRNConfig, student_arch: str) -> dict[str, Any]:
    """The record of a library cut from ``student`` (registered architecture ``student_arch``)."""
    return {"kind": KIND_LIBRARY, "student": asdict(student), "student_arch": student_arch}


def expert_architecture(student: WRNConfig, width_factor: float, num_outputs: int) -> dict[str, Any]:
    return {"kind": KIND_EXPERT, "student": asdict(student), "width_factor": width_factor, "num_outputs": num_outputs}


def progressive_expert_architecture(student: WRNConfig, stage_width: float, stages: int,
                                    num_outputs: int) -> dict[str, Any]:
    return {"kind": KIND_PROGRESSIVE_EXPERT, "student": asdict(student), "stage_width": stage_width,
            "stages": stages, "num_outputs": num_outputs}


register_kind(KIND_LIBRARY, build=lambda a: Library(WRNConfig(**a["student"])))
register_kind(KIND_EXPERT, build=lambda a: build_expert_head(WRNConfig(**a["student"]), a["width_factor"],
                                                             a["num_outputs"]))
register_kind(KIND_PROGRESSIVE_EXPERT, build=lambda a: build_progressive_expert(
    WRNConfig(**a["student"]), a["stage_width"], a["stages"], a["num_outputs"]))


def _wrn(*, depth: int, widen_factor: float, in_channels: int, num_classes: int) -> WideResNet:
    return WideResNet(WRNConfig(depth, widen_factor, in_channels, num_classes))


for _depth in (10, 16, 22, 28):
    for _k in (1, 2, 4, 8):
        register_model(f"wrn_{_depth}_{_k}", _wrn, depth=_depth, widen_factor=float(_k))
