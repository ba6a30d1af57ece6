"""The stage engine: every build step is a *stage* that is run once and reused after a restart.

A stage ends by writing its output atomically and then a small record in
``<pool>/stages/<stage>.json``: the fingerprint of its inputs and settings,
the output file's sha256, and metrics.  A restarted build - after Ctrl-C or
SIGKILL - reuses each stage whose record, fingerprint and checksum match, so
finished work is never redone and a half-written file is never mistaken for a
finished one.  A stage that is still running saves per-epoch progress in a
:class:`Checkpoint` beside its record.

The local build, progressive expert stages, multi-teacher stages and the Ray
backend all go through :class:`StageEngine`; seeds of every stage derive from
the build seed with :func:`stage_seed`, so a stage gets the same bits wherever
it runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edge_runtime.atomic_io import atomic_write_json, sha256_file

from pool_builder.stages.checkpoint import Checkpoint

Log = Callable[[str], None]
SEED_STRIDE = 7919  # a prime: stage seeds of neighbouring build seeds never collide for offsets below it


def fingerprint_of(*parts: Any) -> str:
    """A short, stable digest of a stage's inputs and settings (JSON of ``parts``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def stage_seed(seed: int, offset: int) -> int:
    """The random seed of the stage at ``offset`` in a build seeded with ``seed``."""
    return seed * SEED_STRIDE + offset


def seed_stage(seed: int, offset: int) -> None:
    """Seed torch's global generator for one stage (model initialisation)."""
    torch.manual_seed(stage_seed(seed, offset))


@dataclass
class StageRecord:
    """What a finished stage left behind; the file's checksum is re-checked on reuse."""

    fingerprint: str
    file: str
    sha256: str
    architecture: dict[str, Any]
    parameters: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


class StageEngine:
    """Runs, reuses and commits the stages of one pool directory ``out`` (records in ``out/stages``)."""

    def __init__(self, out: Path, log: Log) -> None:
        self.out = Path(out)
        self.dir = self.out / "stages"
        self.log = log
        self.ran: list[str] = []
        self.reused: list[str] = []

    def record_path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def checkpoint(self, stage: str, stage_fingerprint: str) -> Checkpoint:
        """Per-epoch progress of a stage that is still running (removed when it finishes)."""
        return Checkpoint(self.dir / f"{stage}.epoch.pt", stage_fingerprint)

    def finished(self, stage: str, stage_fingerprint: str) -> StageRecord | None:
        """The stage's record when it finished with these inputs and its file is intact, else None."""
        try:
            record = StageRecord(**json.loads(self.record_path(stage).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        path = self.out / record.file
        if record.fingerprint != stage_fingerprint or not path.is_file() or sha256_file(path) != record.sha256:
            return None
        return record

    def reuse(self, stage: str, stage_fingerprint: str) -> StageRecord | None:
        """A finished stage's record (logged and counted as reused), or None after forgetting a stale record."""
        record = self.finished(stage, stage_fingerprint)
        if record is not None:
            self.log(f"[{stage}] done earlier, reusing {record.file}")
            self.reused.append(stage)
            return record
        self.record_path(stage).unlink(missing_ok=True)
        return None

    def commit(self, stage: str, record: StageRecord, where: str = "") -> StageRecord:
        """Write the record after the stage's file: from now on the stage counts as done."""
        self.ran.append(stage)
        self.log(f"[{stage}] finished in {record.seconds:.1f}s{where} {json.dumps(record.metrics, sort_keys=True)}")
        atomic_write_json(self.record_path(stage), asdict(record))
        return record

    def run(self, stage: str, stage_fingerprint: str, produce: Callable[[], StageRecord]) -> StageRecord:
        """Reuse the stage if it is done; otherwise run ``produce`` (resuming from its checkpoint) and commit."""
        record = self.reuse(stage, stage_fingerprint)
        if record is not None:
            return record
        checkpoint = self.checkpoint(stage, stage_fingerprint)
        partial = checkpoint.load()
        self.log(f"[{stage}] running" + (f" (resuming after epoch {partial['epoch']})" if partial else ""))
        start = time.perf_counter()
        record = produce()
        record.seconds = round(time.perf_counter() - start, 2)
        checkpoint.remove()
        return self.commit(stage, record)
