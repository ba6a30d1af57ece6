"""A built pool opened for use: verified weights loaded once and kept in memory."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from torch import nn

from pool_builder.data.datasets import Normalizer
from pool_builder.data.hierarchy import TaskHierarchy
from pool_builder.pool.format import PoolMetadata, read_pool_json, verify_file
from pool_builder.models.weights import load_module


class Pool:
    """Library, experts and oracle of one pool directory, each checked by sha256 before loading."""

    def __init__(self, pool_dir: str | Path, meta: PoolMetadata) -> None:
        self.dir = Path(pool_dir)
        self.meta = meta
        self._modules: dict[str, nn.Module] = {}

    @classmethod
    def open(cls, pool_dir: str | Path) -> "Pool":
        return cls(pool_dir, read_pool_json(pool_dir))

    @cached_property
    def hierarchy(self) -> TaskHierarchy:
        names = self.meta.dataset.class_names
        return TaskHierarchy.from_mapping({t: [names[i] for i in ids] for t, ids in self.meta.tasks.items()}, names)

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer(tuple(self.meta.dataset.mean), tuple(self.meta.dataset.std))

    def _load(self, key: str, entry, what: str) -> nn.Module:
        if key not in self._modules:
            path = verify_file(self.dir, entry, what)
            self._modules[key] = load_module(entry.architecture, path, what)
        return self._modules[key]

    def oracle(self) -> nn.Module:
        return self._load("oracle", self.meta.oracle, "oracle")

    def library(self) -> nn.Module:
        return self._load("library", self.meta.library, "library")

    def expert(self, task: str) -> nn.Module:
        entry = self.meta.expert(task)
        return self._load(f"expert:{task}", entry, f"expert {task!r}")

    def verify(self) -> None:
        """Check every file's checksum without loading it."""
        verify_file(self.dir, self.meta.oracle, "oracle")
        verify_file(self.dir, self.meta.library, "library")
        for name, entry in self.meta.teachers.items():
            verify_file(self.dir, entry, f"teacher {name!r}")
        for task, entry in self.meta.experts.items():
            verify_file(self.dir, entry, f"expert {task!r}")
