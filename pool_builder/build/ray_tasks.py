"""What runs on Ray workers: cache shards and experts, with the bytes and checks that travel with them.

Workers only compute; the driver (``ray_backend.py``) checks every result and
writes every file.  Each task pins torch's thread count to the driver's and
seeds as the local build does, so a retried task recomputes the same bits.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import sha256_bytes

from pool_builder.build.experts import ExpertJob, ExpertTestSet, train_expert
from pool_builder.build.local import stage_module
from pool_builder.build.ray_cluster import EVAL_BATCH, Log, RayOptions, ray_get, drain, import_ray
from pool_builder.data.datasets import Normalizer
from pool_builder.distillation.training import cached_source, run_batched
from pool_builder.errors import PoolBuilderError
from pool_builder.models.weights import state_dict_bytes
from pool_builder.stages.cache import open_cache, read_record, write_cache
from pool_builder.stages.checkpoint import Checkpoint
from pool_builder.stages.engine import StageRecord, fingerprint_of


# --------------------------------------------------------------------------- what travels to workers

@dataclass(frozen=True)
class ModelBlob:
    """A stage's weights file as bytes + how to rebuild it, so a worker needs no access to the pool directory."""

    architecture: dict[str, Any]
    data: bytes
    sha256: str
    what: str

    @classmethod
    def from_record(cls, out: Path, record: StageRecord, what: str) -> ModelBlob:
        return cls(record.architecture, (out / record.file).read_bytes(), record.sha256, what)

    def load(self) -> torch.nn.Module:
        if sha256_bytes(self.data) != self.sha256:
            raise PoolBuilderError(f"{self.what} weights arrived corrupted on {socket.gethostname()} (sha256 differs)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.pt"
            path.write_bytes(self.data)
            return stage_module(self.architecture, path, self.what)


@dataclass(frozen=True)
class SharedCache:
    """A cache file that every worker reads at the same path (``cache_via=shared_path``)."""

    path: str
    fingerprint: str

    def open(self) -> np.ndarray:
        array = open_cache(self.path, self.fingerprint)
        if array is None:
            raise PoolBuilderError(f"cache {self.path} is missing or does not match its record on "
                                   f"{socket.gethostname()}; with --ray-cache-via shared_path the pool directory "
                                   "must be on a file system every node mounts at the same path")
        return array


@dataclass(frozen=True)
class ShardResult:
    rows: np.ndarray
    sha256: str
    host: str
    pid: int


@dataclass
class ExpertResult:
    record: StageRecord
    weights: bytes
    host: str
    pid: int
    resumed_epoch: int = 0  # > 0: this attempt continued from an earlier attempt's checkpoint


def _resolve(array: np.ndarray | SharedCache) -> np.ndarray:
    return array.open() if isinstance(array, SharedCache) else array


def shard_task(model: ModelBlob, images: np.ndarray, start: int, stop: int, normalizer: Normalizer, dtype: str,
               threads: int) -> ShardResult:
    """Ray task: ``model`` over training rows ``[start, stop)``, batched as the local build batches them."""
    torch.set_num_threads(threads)
    module = model.load()
    part = np.array(images[start:stop])  # a writable copy: object-store arrays are read-only, torch warns on them
    parts = [out for _rows, out in run_batched(module, part, normalizer, EVAL_BATCH, dtype, show_progress=False)]
    rows = np.ascontiguousarray(np.concatenate(parts))
    return ShardResult(rows, sha256_bytes(rows.tobytes()), socket.gethostname(), os.getpid())


def worker_checkpoint(path: str | None, fingerprint: str) -> Checkpoint | None:
    """The stage's per-epoch checkpoint where this worker can keep one: the pool's ``stages/`` directory exists
    here (same machine as the driver, or a file system every node mounts).  A worker never creates it: on a
    node without the pool directory the task simply runs without checkpoints."""
    return Checkpoint(Path(path), fingerprint) if path and Path(path).parent.is_dir() else None


def expert_task(job: ExpertJob, threads: int, n: int, features: np.ndarray | SharedCache,
                oracle_logits: np.ndarray | SharedCache, test_features: np.ndarray, test_logits: np.ndarray,
                test_labels: np.ndarray, checkpoint_path: str | None = None, val_features: np.ndarray | None = None,
                val_logits: np.ndarray | None = None) -> ExpertResult:
    """Ray task: one expert, trained exactly as the local build trains it; returns its weights as bytes.

    With a visible ``checkpoint_path`` it saves progress after every epoch, and a retry of the task (after
    its worker died) continues from there: the checkpoint holds model, optimiser, schedule and generator
    state, so the weights equal those of an uninterrupted run."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    checkpoint = worker_checkpoint(checkpoint_path, job.fingerprint)
    saved = checkpoint.load() if checkpoint is not None else None
    test = ExpertTestSet(torch.from_numpy(np.array(test_features)), test_logits, test_labels,
                         None if val_features is None else torch.from_numpy(np.array(val_features)), val_logits)
    head, record = train_expert(job, n, cached_source(_resolve(features)), cached_source(_resolve(oracle_logits)),
                                test, show_progress=False, checkpoint=checkpoint)
    weights = state_dict_bytes(head)
    record.sha256 = sha256_bytes(weights)
    record.seconds = round(time.perf_counter() - start, 2)
    return ExpertResult(record, weights, socket.gethostname(), os.getpid(), int(saved["epoch"]) if saved else 0)


# --------------------------------------------------------------------------- sharded caches

@dataclass(frozen=True)
class Shard:
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.start:09d}-{self.stop:09d}.npy"


class ShardedCache:
    """A cache computed as row shards by Ray tasks, each shard a cache file of its own, then assembled.

    Shards finished by an interrupted build are reused; a missing, stale or
    corrupt one (its sha256 no longer matches its record) is recomputed.  The
    assembled cache is an ordinary cache (``cache.py``), equal bit for bit to
    the one a local build writes, and the shards are removed once it exists.
    """

    def __init__(self, path: Path, fingerprint: str, shape: tuple[int, ...], dtype: str, model: ModelBlob,
                 images: np.ndarray, normalizer: Normalizer, opts: RayOptions, threads: int, log: Log) -> None:
        self.path, self.fingerprint, self.shape, self.dtype = path, fingerprint, tuple(shape), dtype
        self.model, self.images, self.normalizer = model, images, normalizer
        self.opts, self.threads, self.log = opts, threads, log
        self.shard_dir = path.parent / "shards" / path.stem
        n, step = self.shape[0], opts.shard_rows
        self.shards = [Shard(i, min(n, i + step)) for i in range(0, n, step)]

    def shard_path(self, shard: Shard) -> Path:
        return self.shard_dir / shard.name

    def shardfingerprint_of(self, shard: Shard) -> str:
        return fingerprint_of(self.fingerprint, shard.start, shard.stop, self.dtype)

    def shard_state(self, shard: Shard) -> str:
        """``ok``, ``missing`` or ``corrupt`` (present but stale, truncated or not matching its sha256)."""
        path = self.shard_path(shard)
        if not path.is_file() and read_record(path) is None:
            return "missing"
        return "ok" if open_cache(path, self.shardfingerprint_of(shard)) is not None else "corrupt"

    def compute(self, shards: Sequence[Shard]) -> None:
        """Run ``shards`` as Ray tasks; write each as soon as it arrives and checks out."""
        if not shards:
            return
        ray = import_ray()
        model_ref, images_ref = ray.put(self.model), ray.put(self.images)
        remote = ray.remote(shard_task)
        pending = {remote.options(name=f"shard-{self.path.stem}", num_cpus=self.opts.task_cpus,
                                  max_retries=self.opts.max_retries, retry_exceptions=False).remote(
            model_ref, images_ref, s.start, s.stop, self.normalizer, self.dtype, self.threads): s for s in shards}
        drain(ray, pending, self._write_shard)

    def _write_shard(self, ref: Any, shard: Shard) -> None:
        """Check a shard that came back from a worker and publish it as a cache file of its own."""
        result: ShardResult = ray_get(import_ray(), ref, f"cache shard {self.path.stem}/{shard.name}")
        expected = (shard.stop - shard.start, *self.shape[1:])
        if (result.rows.shape != expected or str(result.rows.dtype) != self.dtype
                or sha256_bytes(result.rows.tobytes()) != result.sha256):
            raise PoolBuilderError(f"cache shard {self.path.stem}/{shard.name} from {result.host} pid {result.pid} "
                                   f"arrived corrupted ({result.rows.shape} {result.rows.dtype}, expected "
                                   f"{expected} {self.dtype}, or sha256 differs); run the build again")
        write_cache(self.shard_path(shard), self.shardfingerprint_of(shard), expected, self.dtype,
                    [(slice(0, expected[0]), result.rows)])
        self.log(f"cache {self.path.stem}: shard {shard.name} written ({result.host} pid {result.pid})")

    def _chunks(self) -> Iterator[tuple[slice, np.ndarray]]:
        for shard in self.shards:
            rows = open_cache(self.shard_path(shard), self.shardfingerprint_of(shard))
            if rows is None:
                raise PoolBuilderError(f"cache shard {self.shard_path(shard)} went missing or corrupt while "
                                       f"{self.path.name} was assembled; run the build again to recompute it")
            yield slice(shard.start, shard.stop), rows

    def ensure(self) -> np.ndarray:
        """The assembled cache: reused when valid, else from reused and recomputed shards."""
        existing = open_cache(self.path, self.fingerprint)
        if existing is not None:
            self.log(f"cache {self.path.name}: reusing {existing.shape} {existing.dtype}")
            return existing
        states = {shard: self.shard_state(shard) for shard in self.shards}
        todo = [s for s, state in states.items() if state != "ok"]
        for shard in todo:
            if states[shard] == "corrupt":
                self.log(f"cache {self.path.stem}: shard {shard.name} is stale or corrupt, recomputing it")
        self.log(f"cache {self.path.name}: computing {self.shape} {self.dtype} as {len(self.shards)} shard(s) on Ray"
                 f" ({len(self.shards) - len(todo)} reused)")
        self.compute(todo)
        array = write_cache(self.path, self.fingerprint, self.shape, self.dtype, self._chunks())
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        if self.shard_dir.parent.is_dir() and not any(self.shard_dir.parent.iterdir()):
            self.shard_dir.parent.rmdir()
        return array
