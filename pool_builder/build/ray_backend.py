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

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import atomic_write_bytes, sha256_bytes, sha256_file

from pool_builder.build.config import BuildConfig
from pool_builder.build.experts import ExpertJob, ExpertTestSet
from pool_builder.build.local import PoolBuild, log_to_stderr
from pool_builder.build.ray_cluster import (Log, RayOptions, ray_get, connect, drain, import_ray,  # noqa: F401
                                           parse_address, probe, ray_options)
from pool_builder.build.ray_tasks import ExpertResult, ModelBlob, SharedCache, ShardedCache, expert_task
from pool_builder.data.datasets import Dataset, Normalizer
from pool_builder.distillation.ddp import HelperRanks, RankSpec, helper_rank
from pool_builder.errors import PoolBuilderError
from pool_builder.models.weights import load_module
from pool_builder.models.wrn import Library
from pool_builder.pool.format import PoolMetadata
from pool_builder.stages.cache import read_record
from pool_builder.stages.engine import StageRecord


# --------------------------------------------------------------------------- the build

class RayPoolBuild(PoolBuild):
    """The local build with its caches sharded over Ray and its experts run as Ray tasks."""

    def __init__(self, cfg: BuildConfig, opts: RayOptions, log: Log = log_to_stderr, show_progress: bool = True) -> None:
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
            record = self.stages.reuse(job.stage, job.fingerprint)
            if record is not None:
                records[job.task] = record
            else:
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
        val = {"val_features": None if test.val_features is None else ray.put(test.val_features.numpy()),
               "val_logits": None if test.val_logits is None else ray.put(test.val_logits)}
        remote = ray.remote(expert_task)
        # absolute, so a worker with another working directory finds the same stages/ (or none at all)
        checkpoints = {job.task: str(self.stages.checkpoint(job.stage, job.fingerprint).path.resolve()) for job in todo}
        pending = {remote.options(name=job.stage, num_cpus=self.opts.task_cpus, max_retries=self.opts.max_retries,
                                  retry_exceptions=False).remote(job, self.threads, n, feats, logits, *shared,
                                                                 checkpoints[job.task], **val): job
                   for job in todo}
        self.log(f"[experts] {len(todo)} task(s) on Ray: {', '.join(j.task for j in todo)} "
                 f"({self.threads} torch thread(s) each, up to {self.opts.max_retries} retries)")
        errors: list[str] = []

        def admit(ref: Any, job: ExpertJob) -> None:
            try:
                records[job.task] = self._commit_expert(job, ray_get(ray, ref, f"expert {job.task}"))
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
        self.stages.checkpoint(job.stage, job.fingerprint).remove()  # progress of an interrupted local build of it
        resumed = f" (resumed after epoch {result.resumed_epoch})" if result.resumed_epoch else ""
        return self.stages.commit(job.stage, record, where=f" on {origin}{resumed}")


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
            ray_get(ray, ref, f"library rank {self.pending.pop(ref)}")

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


def build_pool_on_ray(cfg: BuildConfig, opts: RayOptions, log: Log = log_to_stderr,
                      show_progress: bool = True) -> PoolMetadata:
    """Build (or resume building) the pool described by ``cfg`` with Ray doing caches and experts."""
    return RayPoolBuild(cfg, opts, log, show_progress).run()
