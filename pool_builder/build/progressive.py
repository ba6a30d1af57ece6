"""Progressive experts (B-DISTIL): an expert as S small stages whose logits add up.

Stage ``s`` is a small expert head on the frozen library's features.  Stages
are distilled one after another: while stage ``s`` trains, stages ``1..s-1``
are frozen and the CKD loss (L_soft + alpha * L_scale) is taken on the running
sum of logits, so L_scale keeps every *partial* sum on the oracle's logit
scale and the first ``k`` stages of any expert compose with the first ``k'``
of another.  Each stage is a build stage of its own (weights + record written
atomically), so an interrupted build resumes at the stage it was in.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pool_builder.build.config import train_config
from pool_builder.build.experts import ExpertJob, ExpertTestSet
from pool_builder.distillation.training import Source, extract_expert
from pool_builder.models.weights import load_module, save_state_dict
from pool_builder.models.wrn import (Head, ProgressiveExpert, build_expert_head, count_parameters, expert_architecture,
                                     progressive_expert_architecture)
from pool_builder.pool.evaluate import expert_report
from pool_builder.stages.checkpoint import Checkpoint
from pool_builder.stages.engine import StageEngine, StageRecord, fingerprint_of, seed_stage

STAGE_OFFSET = 1000  # seed offset between stages of one expert


class ResidualStage(nn.Module):
    """Frozen earlier stages plus the stage being trained: its output is the running sum of logits."""

    def __init__(self, frozen: ProgressiveExpert | None, head: Head) -> None:
        super().__init__()
        self.frozen = frozen
        self.head = head
        if frozen is not None:
            frozen.requires_grad_(False)  # SGD skips parameters without gradients

    def train(self, mode: bool = True) -> "ResidualStage":
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()  # earlier stages keep their batch-norm statistics
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.frozen is None:
            return self.head(features)
        with torch.no_grad():
            earlier = self.frozen(features)
        return earlier + self.head(features)


def progressive_architecture(job: ExpertJob) -> dict[str, Any]:
    return progressive_expert_architecture(job.student, job.cfg.stage_width, job.cfg.expert_stages,
                                           len(job.class_ids))


def stage_file(task: str, stage: int) -> str:
    return f"experts/{task}.stage{stage}.pt"


def train_stage(job: ExpertJob, stage: int, earlier: list[Head], n: int, features: Source, oracle_logits: Source,
                show_progress: bool, checkpoint: Checkpoint | None) -> tuple[Head, float]:
    """Distil stage ``stage`` (1-based) against the CKD target on the running sum, earlier stages frozen."""
    cfg = job.cfg
    offset = job.offset + STAGE_OFFSET * stage
    seed_stage(cfg.seed, offset)
    head = build_expert_head(job.student, cfg.stage_width, len(job.class_ids))
    model = ResidualStage(ProgressiveExpert(earlier).eval() if earlier else None, head)
    loss = extract_expert(model, n, features, oracle_logits, job.class_ids,
                          train_config(cfg, cfg.expert_epochs, cfg.expert_lr, offset), cfg.temperature, cfg.alpha,
                          desc=f"expert {job.task} stage {stage}/{cfg.expert_stages}", show_progress=show_progress,
                          checkpoint=checkpoint)
    head.requires_grad_(True)
    return head.eval(), loss


def stage_reports(job: ExpertJob, expert: ProgressiveExpert, test: ExpertTestSet) -> list[dict[str, Any]]:
    """Accuracy and logit gap of the partial sums after 1..S stages, on the task's test images."""
    rows = []
    for k in range(1, expert.num_stages + 1):
        report = expert_report(job.task, expert.partial(k), test.features, test.oracle_logits, test.labels,
                               job.class_ids)
        rows.append({"stages": k, "accuracy": report.accuracy, "mean_abs_logit_gap": report.mean_abs_logit_gap,
                     "parameters": count_parameters(nn.ModuleList(list(expert.stages)[:k]))})
    return rows


def build_progressive_expert_stages(stages: StageEngine, job: ExpertJob, n: int, features: Source,
                                    oracle_logits: Source, test: ExpertTestSet,
                                    show_progress: bool = True) -> StageRecord:
    """Every stage of one expert as its own resumable build stage, then the assembled expert file."""
    out: Path = stages.out
    heads: list[Head] = []
    shas: list[str] = []
    losses: list[float] = []
    for stage in range(1, job.cfg.expert_stages + 1):
        name = f"{job.stage}.stage{stage}"
        fingerprint = fingerprint_of(job.fingerprint, "stage", stage, job.cfg.expert_stages, job.cfg.stage_width,
                                     shas)
        arch = expert_architecture(job.student, job.cfg.stage_width, len(job.class_ids))

        def run(stage: int = stage, fingerprint: str = fingerprint, arch: dict = arch,
                name: str = name) -> StageRecord:
            head, loss = train_stage(job, stage, heads, n, features, oracle_logits, show_progress,
                                     stages.checkpoint(name, fingerprint))
            sha = save_state_dict(head, out / stage_file(job.task, stage))
            return StageRecord(fingerprint, stage_file(job.task, stage), sha, arch, count_parameters(head), 0.0,
                               {"final_ckd_loss": round(loss, 4)})

        record = stages.run(name, fingerprint, run)
        heads.append(load_module(record.architecture, out / record.file, f"expert {job.task} stage {stage}"))
        shas.append(record.sha256)
        losses.append(record.metrics.get("final_ckd_loss"))

    assembled_fp = fingerprint_of(job.fingerprint, "assembled", shas)

    def assemble() -> StageRecord:
        expert = ProgressiveExpert(heads).eval()
        per_stage = stage_reports(job, expert, test)
        report = expert_report(job.task, expert, test.features, test.oracle_logits, test.labels, job.class_ids)
        metrics = {k: v for k, v in asdict(report).items() if k not in ("task", "parameters")}
        metrics.update(final_ckd_loss=losses[-1], stage_ckd_losses=losses, stages=per_stage)
        sha = save_state_dict(expert, out / job.file)
        return StageRecord(assembled_fp, job.file, sha, progressive_architecture(job), count_parameters(expert),
                           0.0, metrics)

    return stages.run(job.stage, assembled_fp, assemble)


def with_stages(job: ExpertJob) -> ExpertJob:
    """The job of a progressive expert: its fingerprint also covers stage count and width."""
    return replace(job, fingerprint=fingerprint_of(job.fingerprint, "progressive", job.cfg.expert_stages,
                                                   job.cfg.stage_width))
