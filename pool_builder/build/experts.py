"""One expert as a self-contained job: the same bits whether it trains in this process or on a Ray worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from pool_builder.build.config import BuildConfig, train_config
from pool_builder.distillation.losses import ckd_loss
from pool_builder.distillation.training import EarlyStop, Source, extract_expert
from pool_builder.models.wrn import WRNConfig, build_expert_head, count_parameters, expert_architecture
from pool_builder.pool.evaluate import ExpertReport, expert_report
from pool_builder.stages.checkpoint import Checkpoint
from pool_builder.stages.engine import StageRecord, seed_stage


@dataclass(frozen=True)
class ExpertJob:
    """One expert extraction, self-contained so that any process (this one or a Ray worker) reruns it bitwise."""

    task: str
    class_ids: tuple[int, ...]
    fingerprint: str
    offset: int
    student: WRNConfig
    cfg: BuildConfig

    @property
    def stage(self) -> str:
        return f"expert-{self.task}"

    @property
    def file(self) -> str:
        return f"experts/{self.task}.pt"


@dataclass(frozen=True)
class ExpertTestSet:
    """What an expert is scored on: the library's test features and the oracle's test logits; and, for early
    stopping, the same two on the validation share held out of the training images (None: no early stopping)."""

    features: torch.Tensor
    oracle_logits: np.ndarray
    labels: np.ndarray
    val_features: torch.Tensor | None = None
    val_logits: np.ndarray | None = None


def train_expert(job: ExpertJob, n: int, features: Source, oracle_logits: Source, test: ExpertTestSet,
                 show_progress: bool = True,
                 checkpoint: Checkpoint | None = None) -> tuple[torch.nn.Module, StageRecord]:
    """Seed, build, train and score one expert; the record's sha256 is filled in by whoever writes the weights."""
    cfg = job.cfg
    seed_stage(cfg.seed, job.offset)
    head = build_expert_head(job.student, cfg.expert_width, len(job.class_ids))
    stop = None
    if test.val_features is not None and test.val_logits is not None and len(test.val_features):
        cols = torch.tensor(job.class_ids, dtype=torch.long)
        val_x, val_t = test.val_features, torch.from_numpy(test.val_logits).index_select(1, cols)
        stop = EarlyStop(lambda: float(ckd_loss(head(val_x), val_t, cfg.temperature, cfg.alpha).total), cfg.patience)
    loss = extract_expert(head, n, features, oracle_logits, job.class_ids,
                          train_config(cfg, cfg.expert_epochs, cfg.expert_lr, job.offset), cfg.temperature,
                          cfg.alpha, desc=f"expert {job.task}", show_progress=show_progress, checkpoint=checkpoint,
                          early_stop=stop)
    report: ExpertReport = expert_report(job.task, head, test.features, test.oracle_logits, test.labels,
                                         job.class_ids)
    arch = expert_architecture(job.student, cfg.expert_width, len(job.class_ids))
    metrics = {k: v for k, v in asdict(report).items() if k not in ("task", "parameters")}
    metrics["final_ckd_loss"] = round(loss, 4)
    metrics.update(stop.metrics() if stop else {})
    return head, StageRecord(job.fingerprint, job.file, "", arch, count_parameters(head), 0.0, metrics)
