"""Per-epoch progress of a stage that is still running, so that an interrupted stage resumes where it stopped."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_runtime.atomic_io import atomic_write_bytes


@dataclass(frozen=True)
class Checkpoint:
    """Where a stage saves its progress after every epoch, and the fingerprint it must match to be resumed."""

    path: Path
    fingerprint: str

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a checkpoint that cannot be read is simply not used
            return None
        return state if isinstance(state, dict) and state.get("fingerprint") == self.fingerprint else None

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
