"""Pool building on a Ray cluster: sharded teacher caches and one retried Ray task per expert.

For oracles, data sets or task counts that outgrow one machine (EDL-Dist's
elastic, fault-tolerant distillation).  The driver - the process that runs
``pool-builder build --backend ray`` - keeps every duty of the local build: it
trains oracle and library (or reuses them), owns the pool directory and its
lock, and writes every file.  Workers only compute: a cache shard, or one
expert's weights.  A result enters the pool only after the driver has checked
the sha256 the worker reported, written the file atomically and re-read it, and
(for an expert) loaded it into its architecture; then the stage record is
committed, exactly as in the local build.  So:

- a worker killed mid-task is retried by Ray (``max_retries``) and recomputes
  the same bits, because every task pins torch's thread count to the driver's
  and seeds exactly as the local build does;
- a killed driver, run again, reuses finished shards and experts from their
  records and recomputes the rest;
- tasks are scheduled over whatever CPUs the cluster has when they are ready
  to run, so a node that joins mid-build takes waiting experts;
- an expert task whose worker can see the pool directory (this machine, or a
  shared file system) saves the usual per-epoch checkpoint there, so a retry
  continues after the last finished epoch - to the same bits - instead of from
  epoch 0;
- with ``--library-workers N`` the library trains data-parallel (``ddp.py``):
  the driver is rank 0 and ranks 1..N-1 are Ray actors (:class:`RayRanks`).

Ray is imported only here, and only for ``--backend ray``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import atomic_write_bytes, sha256_bytes, sha256_file

from .build import (BuildConfig, ExpertJob, ExpertTestSet, Log, PoolBuild, StageRecord, _fingerprint, _stderr,
                    stage_module, train_expert)
from .cache import open_cache, read_record, write_cache
from .data import Dataset, Normalizer
from .ddp import HelperRanks, RankSpec, helper_rank
from .errors import PoolBuilderError, unknown_name
from .models import Library
from .pool_format import PoolMetadata
from .training import Checkpoint, cached_source, run_batched
from .weights import load_module, state_dict_bytes

CACHE_TRANSPORTS = ("object_store", "shared_path")
EVAL_BATCH = 512  # run_batched's batch: shard borders on its multiples give the local build's exact batches
DEFAULT_RAY_PORT = 6379


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray and how to cut the work; none of it changes what the build produces."""

    address: str | None = None  # None: start a private Ray on this machine; else host:port, ray://..., or auto
    num_cpus: int | None = None  # CPUs of a private Ray (default: all of this machine's)
    object_store_mb: int = 512  # object store of a private Ray
    connect_timeout_s: float = 10.0
    max_retries: int = 3  # per task, after its worker process dies
    task_cpus: float | None = None  # CPUs Ray reserves per task (default: the build's torch threads)
    shard_rows: int = 4096
    cache_via: str = "object_store"  # how workers get the caches: object_store, or shared_path (same pool dir)

    def __post_init__(self) -> None:
        if self.cache_via not in CACHE_TRANSPORTS:
            raise unknown_name("cache transport", self.cache_via, list(CACHE_TRANSPORTS))
        if self.shard_rows < EVAL_BATCH or self.shard_rows % EVAL_BATCH:
            raise PoolBuilderError(f"shard rows must be a positive multiple of {EVAL_BATCH} (so that shards "
                                   f"batch like the local build), got {self.shard_rows}")
        if self.max_retries < 0:
            raise PoolBuilderError(f"max retries must be >= 0, got {self.max_retries}")
        if self.task_cpus is not None and self.task_cpus <= 0:
            raise PoolBuilderError(f"CPUs per task must be positive, got {self.task_cpus}")
        if self.connect_timeout_s <= 0:
            raise PoolBuilderError(f"connect timeout must be positive, got {self.connect_timeout_s}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise PoolBuilderError(f"Ray CPUs must be >= 1, got {self.num_cpus}")
        if self.object_store_mb < 80:
            raise PoolBuilderError(f"object store must be >= 80 MB (Ray's minimum), got {self.object_store_mb}")


def ray_options(args: Any) -> RayOptions:
    """RayOptions from the CLI's ``--address`` / ``--ray-*`` flags (unset flags keep the defaults)."""
    given = {"address": args.address, "num_cpus": args.ray_cpus, "object_store_mb": args.ray_object_store_mb,
             "max_retries": args.ray_max_retries, "task_cpus": args.ray_task_cpus, "shard_rows": args.ray_shard_rows,
             "cache_via": args.ray_cache_via, "connect_timeout_s": args.ray_connect_timeout}
    return RayOptions(**{k: v for k, v in given.items() if v is not None})


def import_ray() -> Any:
    """The ``ray`` module, or a PoolBuilderError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise PoolBuilderError("--backend ray needs Ray: pip install 'pool-of-experts-edge[ray]' "
                               f"(or pip install 'ray>=2.9'); import failed: {exc}") from None
    return ray


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` to probe for an address, or None for ``auto`` (Ray finds a cluster on this machine)."""
    if address == "auto":
        return None
    bare = address.split("://", 1)[1] if "://" in address else address
    host, _, port = bare.rpartition(":") if ":" in bare else (bare, "", str(DEFAULT_RAY_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PoolBuilderError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto "
                               f"(e.g. 10.0.0.5:{DEFAULT_RAY_PORT})")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing listens at ``address`` (ray.init itself may retry for minutes)."""
    target = parse_address(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise PoolBuilderError(f"Ray cluster at {address} does not answer ({reason} after at most {timeout_s:g}s); "
                               "start one with `ray start --head` or check --address") from None


def connect(opts: RayOptions, log: Log) -> bool:
    """Attach to (or start) Ray; True when this call did, so the caller shuts it down again."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, configure_logging=True)
    if opts.address is None:
        ray.init(num_cpus=opts.num_cpus, object_store_memory=opts.object_store_mb << 20, include_dashboard=False,
                 **quiet)
    else:
        probe(opts.address, opts.connect_timeout_s)
        try:
            ray.init(address=opts.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PoolBuilderError(f"could not join the Ray cluster at {opts.address}: {first}") from None
    log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs in the cluster "
        f"({'private, this machine' if opts.address is None else opts.address})")
    return True


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
                test_labels: np.ndarray, checkpoint_path: str | None = None) -> ExpertResult:
    """Ray task: one expert, trained exactly as the local build trains it; returns its weights as bytes.

    With a visible ``checkpoint_path`` it saves progress after every epoch, and a retry of the task (after
    its worker died) continues from there: the checkpoint holds model, optimiser, schedule and generator
    state, so the weights equal those of an uninterrupted run."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    checkpoint = worker_checkpoint(checkpoint_path, job.fingerprint)
    saved = checkpoint.load() if checkpoint is not None else None
    test = ExpertTestSet(torch.from_numpy(np.array(test_features)), test_logits, test_labels)
    head, record = train_expert(job, n, cached_source(_resolve(features)), cached_source(_resolve(oracle_logits)),
                                test, show_progress=False, checkpoint=checkpoint)
    weights = state_dict_bytes(head)
    record.sha256 = sha256_bytes(weights)
    record.seconds = round(time.perf_counter() - start, 2)
    return ExpertResult(record, weights, socket.gethostname(), os.getpid(), int(saved["epoch"]) if saved else 0)


def _ray_get(ray: Any, ref: Any, what: str) -> Any:
    """``ray.get`` with Ray's failures turned into one-line PoolBuilderErrors."""
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        raise PoolBuilderError(f"{what} failed on a Ray worker: {type(cause).__name__}: "
                               f"{str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''}") from None
    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.TaskCancelledError, rex.ObjectLostError,
            rex.RaySystemError, rex.RayActorError) as exc:
        raise PoolBuilderError(f"{what}: its Ray worker kept dying ({type(exc).__name__}) after the allowed retries; "
                               "finished work is kept, run the build again to resume") from None


def drain(ray: Any, pending: dict[Any, Any], handle: Callable[[Any, Any], None]) -> None:
    """Hand each task to ``handle`` as it finishes; on any exception (Ctrl-C included) cancel the rest."""
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            handle(ready[0], pending.pop(ready[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


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

    def shard_fingerprint(self, shard: Shard) -> str:
        return _fingerprint(self.fingerprint, shard.start, shard.stop, self.dtype)

    def shard_state(self, shard: Shard) -> str:
        """``ok``, ``missing`` or ``corrupt`` (present but stale, truncated or not matching its sha256)."""
        path = self.shard_path(shard)
        if not path.is_file() and read_record(path) is None:
            return "missing"
        return "ok" if open_cache(path, self.shard_fingerprint(shard)) is not None else "corrupt"

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
        result: ShardResult = _ray_get(import_ray(), ref, f"cache shard {self.path.stem}/{shard.name}")
        expected = (shard.stop - shard.start, *self.shape[1:])
        if (result.rows.shape != expected or str(result.rows.dtype) != self.dtype
                or sha256_bytes(result.rows.tobytes()) != result.sha256):
            raise PoolBuilderError(f"cache shard {self.path.stem}/{shard.name} from {result.host} pid {result.pid} "
                                   f"arrived corrupted ({result.rows.shape} {result.rows.dtype}, expected "
                                   f"{expected} {self.dtype}, or sha256 differs); run the build again")
        write_cache(self.shard_path(shard), self.shard_fingerprint(shard), expected, self.dtype,
                    [(slice(0, expected[0]), result.rows)])
        self.log(f"cache {self.path.stem}: shard {shard.name} written ({result.host} pid {result.pid})")

    def _chunks(self) -> Iterator[tuple[slice, np.ndarray]]:
        for shard in self.shards:
            rows = open_cache(self.shard_path(shard), self.shard_fingerprint(shard))
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


# --------------------------------------------------------------------------- the build

class RayPoolBuild(PoolBuild):
    """The local build with its caches sharded over Ray and its experts run as Ray tasks."""

    def __init__(self, cfg: BuildConfig, opts: RayOptions, log: Log = _stderr, show_progress: bool = True) -> None:
        if cfg.online:
            raise PoolBuilderError("--online recomputes teachers inside one training loop; --backend ray trains "
                                   "from the cached teacher outputs (drop --online, or use --backend local)")
        if cfg.ensemble is not None:
            raise PoolBuilderError("--backend ray builds single-oracle pools only; a multi-teacher oracle "
                                   "(--teachers / --teacher-archs) needs --backend local")
        super().__init__(cfg, log, show_progress)
        # every task pins torch's threads to the build's (self.threads), as the thread count changes the bits;
        # Ray reserves as many CPUs per task, as more threads than cores slow training down several-fold.
        self.opts = replace(opts, task_cpus=opts.task_cpus or float(self.threads))

    def run(self) -> PoolMetadata:
        started = connect(self.opts, self.log)
        try:
            return super().run()
        finally:
            if started:
                import_ray().shutdown()

    def _check_library_workers(self) -> None:
        """Refuse, before anything trains, more library ranks than the cluster has CPUs for."""
        workers, per_rank = self.cfg.library_workers, self.opts.task_cpus
        have = import_ray().cluster_resources().get("CPU", 0.0)
        if (workers - 1) * per_rank > have:
            raise PoolBuilderError(
                f"--library-workers {workers} runs ranks 1-{workers - 1} as Ray actors of {per_rank:g} CPU(s) each "
                f"({(workers - 1) * per_rank:g} CPUs) beside this process (rank 0), but the cluster has {have:g}: "
                f"use at most {1 + int(have // per_rank)} workers, or a smaller --ray-task-cpus")

    def _library_helpers(self) -> HelperRanks:
        return RayRanks(self.opts)

    def _rank_threads(self) -> int:
        """Each rank is sized like a Ray task: the build's torch threads (Ray reserves as many CPUs per actor)."""
        return self.threads

    def _cached_outputs(self, name: str, fingerprint: str, shape: tuple[int, ...], dtype: str,
                        producer: StageRecord, module: torch.nn.Module, images: np.ndarray,
                        normalizer: Normalizer, desc: str) -> np.ndarray:
        blob = ModelBlob.from_record(self.out, producer, desc)
        return ShardedCache(self.cache_dir / f"{name}.npy", fingerprint, shape, dtype, blob, images, normalizer,
                            self.opts, self.threads, self.log).ensure()

    def _experts(self, jobs: Sequence[ExpertJob], data: Dataset, normalizer: Normalizer, oracle: torch.nn.Module,
                 library: Library, train_logits: np.ndarray | None, features: np.ndarray | None,
                 test: ExpertTestSet) -> dict[str, StageRecord]:
        if self.cfg.expert_stages > 1:  # stages of one expert depend on each other: they train here, in order
            self.log("[experts] progressive experts train in the driver process, stage after stage")
            return super()._experts(jobs, data, normalizer, oracle, library, train_logits, features, test)
        records: dict[str, StageRecord] = {}
        todo = []
        for job in jobs:
            record = self._finished(job.stage, job.fingerprint)
            if record is not None:
                self.log(f"[{job.stage}] done earlier, reusing {record.file}")
                self.reused.append(job.stage)
                records[job.task] = record
            else:
                self._record_path(job.stage).unlink(missing_ok=True)
                todo.append(job)
        if todo:
            self._run_expert_tasks(todo, len(data.train), train_logits, features, test, records)
        return {job.task: records[job.task] for job in jobs}

    def _run_expert_tasks(self, todo: Sequence[ExpertJob], n: int, train_logits: np.ndarray,
                          features: np.ndarray, test: ExpertTestSet, records: dict[str, StageRecord]) -> None:
        """Submit every missing expert at once; commit each as it finishes; report failures after the rest."""
        ray = import_ray()
        if self.opts.cache_via == "shared_path":
            feats: Any = SharedCache(str(self.cache_dir / "library_features.npy"), read_record(
                self.cache_dir / "library_features.npy").fingerprint)
            logits: Any = SharedCache(str(self.cache_dir / "oracle_logits.npy"), read_record(
                self.cache_dir / "oracle_logits.npy").fingerprint)
        else:
            feats, logits = ray.put(np.asarray(features)), ray.put(np.asarray(train_logits))
        shared = [ray.put(test.features.numpy()), ray.put(test.oracle_logits), ray.put(test.labels)]
        remote = ray.remote(expert_task)
        # absolute, so a worker with another working directory finds the same stages/ (or none at all)
        checkpoints = {job.task: str(self._checkpoint(job.stage, job.fingerprint).path.resolve()) for job in todo}
        pending = {remote.options(name=job.stage, num_cpus=self.opts.task_cpus, max_retries=self.opts.max_retries,
                                  retry_exceptions=False).remote(job, self.threads, n, feats, logits, *shared,
                                                                 checkpoints[job.task]): job
                   for job in todo}
        self.log(f"[experts] {len(todo)} task(s) on Ray: {', '.join(j.task for j in todo)} "
                 f"({self.threads} torch thread(s) each, up to {self.opts.max_retries} retries)")
        errors: list[str] = []

        def admit(ref: Any, job: ExpertJob) -> None:
            try:
                records[job.task] = self._commit_expert(job, _ray_get(ray, ref, f"expert {job.task}"))
            except PoolBuilderError as exc:  # the other experts still finish and are kept
                self.log(f"[{job.stage}] failed: {exc}")
                errors.append(str(exc))

        drain(ray, pending, admit)
        if errors:
            raise PoolBuilderError(f"{len(errors)} expert(s) failed ({'; '.join(errors)}); "
                                   f"{len(records)} finished expert(s) are kept, run the build again to resume")

    def _commit_expert(self, job: ExpertJob, result: ExpertResult) -> StageRecord:
        """Admit a worker's expert: checksum, atomic write, re-read, strict load; then the stage record."""
        record, origin = result.record, f"{result.host} pid {result.pid}"
        if record.fingerprint != job.fingerprint or record.file != job.file:
            raise PoolBuilderError(f"expert {job.task}: the worker on {origin} answered for another job")
        if sha256_bytes(result.weights) != record.sha256:
            raise PoolBuilderError(f"expert {job.task}: weights from {origin} do not match their sha256; not admitted")
        path = self.out / record.file
        atomic_write_bytes(path, result.weights)
        if sha256_file(path) != record.sha256:
            path.unlink(missing_ok=True)
            raise PoolBuilderError(f"expert {job.task}: {path} reads back different from what was written")
        load_module(record.architecture, path, f"expert {job.task}")  # raises if the weights do not fit
        self._checkpoint(job.stage, job.fingerprint).remove()  # progress of an interrupted local build of it
        self.ran.append(job.stage)
        resumed = f" (resumed after epoch {result.resumed_epoch})" if result.resumed_epoch else ""
        self.log(f"[{job.stage}] finished in {record.seconds:.1f}s on {origin}{resumed} "
                 f"{json.dumps(record.metrics, sort_keys=True)}")
        return self._commit(job.stage, record)


# --------------------------------------------------------------------------- data-parallel library ranks

class LibraryRankActor:
    """A Ray actor hosting one helper rank of the data-parallel library; it joins rank 0's gloo group itself."""

    def run(self, rank: int, spec: RankSpec, images: np.ndarray, logits: np.ndarray, normalizer: Normalizer) -> str:
        return helper_rank(rank, spec, images, logits, normalizer)


class RayRanks:
    """Library ranks 1..N-1 as Ray actors, one per rank, each reserving ``task_cpus`` CPUs.

    Ray Train's TorchTrainer is not used: it needs the ``ray[train]`` extra (pandas, pyarrow; not importable
    with plain ``ray``), runs *every* rank in its own workers and moves results through its own checkpoint
    storage, whereas here the driver must stay rank 0 - the one process that owns the pool directory, its lock,
    checkpoints and stage records.  Plain actors that set up the gloo group themselves need nothing but Ray.
    Helpers reach rank 0 at this node's IP address, so the driver must be reachable from the workers on a
    TCP port (gloo picks the interface from the host name; set GLOO_SOCKET_IFNAME where that is wrong).
    """

    kind = "Ray actors"

    def __init__(self, opts: RayOptions) -> None:
        ray = import_ray()
        self.opts = opts
        self.master_host = ray.util.get_node_ip_address()
        self.actors: list[Any] = []
        self.pending: dict[Any, int] = {}

    def start(self, spec: RankSpec, images: np.ndarray, logits: np.ndarray | str, normalizer: Normalizer) -> None:
        ray = import_ray()
        actor = ray.remote(LibraryRankActor)
        images_ref, logits_ref = ray.put(np.asarray(images)), ray.put(np.asarray(logits))
        for rank in range(1, spec.world_size):
            handle = actor.options(num_cpus=self.opts.task_cpus, max_restarts=0).remote()
            self.actors.append(handle)
            self.pending[handle.run.remote(rank, spec, images_ref, logits_ref, normalizer)] = rank

    def _collect(self, timeout_s: float) -> None:
        if not self.pending:
            return
        ray = import_ray()
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout_s)
        for ref in done:
            _ray_get(ray, ref, f"library rank {self.pending.pop(ref)}")

    def check(self) -> None:
        self._collect(0)

    def join(self, timeout_s: float) -> None:
        self._collect(timeout_s)
        if self.pending:
            raise PoolBuilderError(f"library ranks {sorted(self.pending.values())} did not finish within "
                                   f"{timeout_s:g}s after rank 0")

    def stop(self) -> None:
        ray = import_ray()
        for handle in self.actors:
            ray.kill(handle)
        self.actors, self.pending = [], {}


def build_pool_on_ray(cfg: BuildConfig, opts: RayOptions, log: Log = _stderr,
                      show_progress: bool = True) -> PoolMetadata:
    """Build (or resume building) the pool described by ``cfg`` with Ray doing caches and experts."""
    return RayPoolBuild(cfg, opts, log, show_progress).run()
