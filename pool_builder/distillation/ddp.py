"""Data-parallel library distillation: torch DistributedDataParallel over gloo (``--library-workers N``).

Why: after the oracle, the library's KD over all training images is the one long
training loop of a build (experts are many small independent jobs, which the Ray
backend already spreads out), so it is the stage worth splitting across processes
or machines.  With ``N = 1`` none of this runs: the library trains in the build's
own process exactly as before.

How it stays close to one process.  Every rank draws the same seeded permutation
each epoch and cuts it into the same global batches as ``training.epoch_batches``
(same batch size, learning-rate schedule and number of steps).  Rank ``r`` trains
on rows ``batch[r::N]`` of every global batch - DistributedSampler's interleaved
split - and reads only those rows of the cached oracle logits.  It scales its loss
by its share of the batch, so the all-reduced (averaged) gradient is the gradient
of the global batch's mean loss.  Batch norm takes its statistics over the whole
global batch too (``sync_bn.py``): with per-rank statistics two ranks trained a
measurably worse student.  What still differs from one process is rounding -
sums over ranks in another order, batch-norm statistics in float64 - which a
few hundred SGD steps amplify, so the weights are close to, not bitwise equal to,
a one-process build (docs/results/library_ddp.md: measured tolerance).  A DDP build is repeatable:
the same N, seed and threads per rank give the same bits, on either launcher.

Who does what.  Rank 0 is the build's own process (the driver): it holds the pool
directory's lock, loads the per-epoch checkpoint and broadcasts it to the other
ranks on resume, saves a checkpoint after every epoch, and hands the trained
student back to the ordinary library stage, which writes weights and stage record
as it does for one process.  Ranks ``1..N-1`` are *helpers* started by a
:class:`HelperRanks` launcher - processes spawned on this machine
(:class:`LocalRanks`) or Ray actors (``ray_backend.RayRanks``) - that connect to
rank 0's TCPStore and set up the gloo process group themselves.
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pool_builder.data.datasets import Normalizer
from pool_builder.errors import PoolBuilderError
from pool_builder.distillation.losses import kd_loss
from pool_builder.models.wrn import WideResNet, WRNConfig
from pool_builder.distillation.sync_bn import synchronized_batch_norm
from pool_builder.distillation.training import (Checkpoint, Source, TrainConfig, batches_per_epoch, cached_source, epoch_batches,
                       progress, progress_state, restore_progress, sgd_cosine)

MAX_LIBRARY_WORKERS = 64  # gloo over TCP between CPU processes: beyond this, communication dominates
RANK_TIMEOUT_S = 600.0  # rendezvous and every collective; a rank silent this long fails the stage
Array = np.ndarray


def validate_library_workers(workers: int, batch_size: int) -> None:
    """Bounds of ``--library-workers`` that hold on every backend (raises PoolBuilderError)."""
    if not 1 <= workers <= MAX_LIBRARY_WORKERS:
        raise PoolBuilderError(f"--library-workers must be between 1 (one process, the default) and "
                               f"{MAX_LIBRARY_WORKERS}, got {workers}")
    if batch_size < 2 * workers:
        raise PoolBuilderError(f"--library-workers {workers} splits every batch of {batch_size} images across "
                               f"{workers} ranks, and batch norm needs at least 2 images per rank: use at most "
                               f"{max(1, batch_size // 2)} workers or --batch-size >= {2 * workers}")


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RankSpec:
    """Everything a helper rank needs besides the data; picklable for spawn and Ray."""

    world_size: int
    master_host: str
    master_port: int
    threads: int  # torch threads of every rank
    student: WRNConfig
    train: TrainConfig
    temperature: float
    timeout_s: float = RANK_TIMEOUT_S


class HelperRanks(Protocol):
    """Starts, watches and stops ranks ``1..N-1`` (rank 0 is the calling process)."""

    kind: str  # how the helpers run, for log lines: "spawned processes", "Ray actors"
    master_host: str  # where the helpers reach rank 0's TCPStore

    def start(self, spec: RankSpec, images: Array, logits: Array | str, normalizer: Normalizer) -> None: ...

    def check(self) -> None:
        """Raise PoolBuilderError naming a helper that has failed or exited; return while all run or succeeded."""

    def join(self, timeout_s: float) -> None:
        """Wait for every helper to finish; raise PoolBuilderError if one failed."""

    def stop(self) -> None:
        """Kill helpers still running (after a failure or Ctrl-C); safe to call twice."""


# --------------------------------------------------------------------------- one rank's training loop

def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_rank(student: WideResNet, rank: int, spec: RankSpec, images: Array, logits: Array,
               normalizer: Normalizer, checkpoint: Checkpoint | None = None, show_progress: bool = False) -> float:
    """KD of the student on this rank's share of every batch, gradients all-reduced; returns the last epoch's
    mean loss over all ranks.  The process group must be up; only rank 0 passes a checkpoint."""
    world, cfg, n = spec.world_size, spec.train, len(images)
    if n < 2 * world:
        raise PoolBuilderError(f"{world} library ranks need at least {2 * world} training images, got {n}")
    # channels-last parameters, as the inputs are: gradients then match DDP's bucket layout (no copies, no warning)
    student.to(memory_format=torch.channels_last)
    loop = _RankLoop(rank, spec, images, cached_source(logits), normalizer, torch.Generator().manual_seed(cfg.seed))
    opt, sched = sgd_cosine(student.parameters(), cfg, cfg.epochs * batches_per_epoch(n, cfg.batch_size, 2 * world))
    saved = _broadcast(checkpoint.load() if checkpoint is not None else None)
    start, last = (0, float("nan")) if saved is None else restore_progress(saved, student, opt, sched, loop.gens)
    with synchronized_batch_norm(student):  # batch statistics over the global batch, as in one process
        model = DistributedDataParallel(student)  # broadcasts rank 0's parameters and buffers
        model.train()
        for epoch in range(start, cfg.epochs):
            last = loop.epoch(model, opt, sched, epoch, show_progress)
            if checkpoint is not None and epoch + 1 < cfg.epochs:
                checkpoint.save(progress_state(epoch + 1, last, student, opt, sched, loop.gens))
    student.eval()
    return last


@dataclass
class _RankLoop:
    """One rank's view of the data: its rows of every global batch, and the teacher's logits for them."""

    rank: int
    spec: RankSpec
    images: Array
    teacher: Source
    normalizer: Normalizer
    shuffle: torch.Generator  # seeded alike on every rank, so all ranks cut the same global batches

    @property
    def gens(self) -> dict[str, torch.Generator]:
        return {"shuffle": self.shuffle}

    def epoch(self, model: DistributedDataParallel, opt: torch.optim.Optimizer, sched: Any, epoch: int,
              show_progress: bool) -> float:
        """One epoch; returns its mean loss over every rank's images."""
        world, cfg = self.spec.world_size, self.spec.train
        totals = torch.zeros(2, dtype=torch.float64)
        batches = epoch_batches(len(self.images), cfg.batch_size, self.shuffle, 2 * world)
        for batch in progress(batches, f"library {epoch + 1}/{cfg.epochs}", len(batches), show_progress):
            rows = batch[self.rank::world]
            x = self.normalizer(self.images[rows])
            loss = kd_loss(model(x), self.teacher(rows, x), self.spec.temperature)
            seen = torch.stack([loss.detach().double() * len(rows), torch.tensor(len(rows), dtype=torch.float64)])
            dist.all_reduce(seen)  # every rank sees the same batch loss, so all of them stop together on a NaN
            if not math.isfinite(float(seen[0])):
                raise PoolBuilderError(f"library: loss became {float(seen[0] / seen[1])} in epoch {epoch + 1}; "
                                       "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            (loss * (world * len(rows) / len(batch))).backward()  # DDP averages over ranks: weight by share
            opt.step()
            sched.step()
            totals += seen
        return float(totals[0] / totals[1])


# --------------------------------------------------------------------------- helpers (ranks 1..N-1)

def _open(logits: Array | str) -> Array:
    """A cache given by path is memory-mapped, so each rank reads only its rows of it."""
    return np.load(logits, mmap_mode="r") if isinstance(logits, str) else logits


def helper_rank(rank: int, spec: RankSpec, images: Array, logits: Array | str, normalizer: Normalizer) -> str:
    """Run rank ``rank`` (>= 1) to the end of training; returns where it ran."""
    torch.set_num_threads(spec.threads)
    store = dist.TCPStore(spec.master_host, spec.master_port, spec.world_size, False,
                          timeout=timedelta(seconds=spec.timeout_s))
    where = f"{socket.gethostname()} pid {os.getpid()}"
    store.set(f"ready/{rank}", where)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.world_size,
                            timeout=timedelta(seconds=spec.timeout_s))
    try:
        train_rank(WideResNet(spec.student), rank, spec, images, _open(logits), normalizer)
    finally:
        dist.destroy_process_group()
    return where


def _spawned_helper(index: int, spec: RankSpec, images: Array, logits: Array | str, normalizer: Normalizer) -> None:
    helper_rank(index + 1, spec, images, logits, normalizer)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class LocalRanks:
    """Ranks 1..N-1 as processes spawned on this machine (``torch.multiprocessing``, start method spawn)."""

    kind = "spawned processes"
    master_host = "127.0.0.1"

    def __init__(self) -> None:
        self.context: Any = None

    def start(self, spec: RankSpec, images: Array, logits: Array | str, normalizer: Normalizer) -> None:
        # a memory-mapped cache travels as its path: every rank maps the same file instead of a pickled copy
        shared = str(logits.filename) if isinstance(logits, np.memmap) and logits.filename else logits
        self.context = mp.start_processes(_spawned_helper, args=(spec, images, shared, normalizer),
                                          nprocs=spec.world_size - 1, join=False, start_method="spawn")

    def _join(self, timeout_s: float) -> bool:
        try:
            return self.context.join(timeout=timeout_s)
        except mp.ProcessRaisedException as exc:
            raise PoolBuilderError(f"library rank {exc.error_index + 1} (pid {exc.error_pid}) failed: "
                                   f"{_last_line(str(exc))}") from None
        except mp.ProcessExitedException as exc:
            how = exc.signal_name or f"exit code {exc.exit_code}"
            raise PoolBuilderError(f"library rank {exc.error_index + 1} (pid {exc.error_pid}) died ({how}); "
                                   "its last epoch checkpoint is kept: run the build again to resume") from None

    def check(self) -> None:
        if self.context is not None:
            self._join(0)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._join(1.0):
            if time.monotonic() > deadline:
                raise PoolBuilderError(f"library ranks did not finish within {timeout_s:g}s after rank 0")

    def stop(self) -> None:
        for proc in self.context.processes if self.context is not None else []:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)


# --------------------------------------------------------------------------- rank 0 (this process)

@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Pin torch's intra-op threads for a block and restore them after (rank 0 is the build's own process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _wait_for_helpers(store: dist.TCPStore, helpers: HelperRanks, world: int, timeout_s: float) -> list[str]:
    """Block until every helper has reached rank 0's store, failing fast if one dies on the way."""
    keys = [f"ready/{rank}" for rank in range(1, world)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):  # polled: a blocking wait would not notice a helper that died on the way
        helpers.check()
        if time.monotonic() > deadline:
            raise PoolBuilderError(f"library ranks 1-{world - 1} did not all start within {timeout_s:g}s "
                                   f"({helpers.kind}); is the cluster short of CPUs?")
        time.sleep(0.1)
    return [store.get(key).decode() for key in keys]


def distill_library_parallel(student: WideResNet, images: Array, normalizer: Normalizer, logits: Array,
                             cfg: TrainConfig, temperature: float, workers: int, threads: int, helpers: HelperRanks,
                             checkpoint: Checkpoint | None = None, show_progress: bool = True,
                             log: Callable[[str], None] = lambda _m: None) -> float:
    """KD of ``student`` (in place, as ``training.distill_student``) as rank 0 of ``workers`` DDP ranks."""
    if dist.is_initialized():
        raise PoolBuilderError("a torch.distributed process group is already up in this process; "
                               "--library-workers starts its own")
    # port 0: the OS picks a free one.  TCPStore listens on every interface whatever host it is given (no
    # authentication, as in any torch.distributed job): run multi-node builds on a trusted network.
    store = dist.TCPStore(helpers.master_host, 0, workers, True, wait_for_workers=False,
                          timeout=timedelta(seconds=RANK_TIMEOUT_S))
    spec = RankSpec(workers, helpers.master_host, store.port, threads, student.cfg, cfg, temperature)
    started = time.perf_counter()
    helpers.start(spec, images, logits, normalizer)
    try:
        where = _wait_for_helpers(store, helpers, workers, spec.timeout_s)
        others = "rank 1" if workers == 2 else f"ranks 1-{workers - 1}"
        log(f"[library] data-parallel over {workers} ranks (gloo, {threads} torch thread(s) each): rank 0 here "
            f"(pid {os.getpid()}), {others} as {helpers.kind} ({'; '.join(where)}), "
            f"up in {time.perf_counter() - started:.1f}s")
        dist.init_process_group("gloo", store=store, rank=0, world_size=workers,
                                timeout=timedelta(seconds=spec.timeout_s))
        try:
            with torch_threads(threads):
                loss = train_rank(student, 0, spec, images, logits, normalizer, checkpoint, show_progress)
        except RuntimeError as exc:  # gloo reports a vanished peer as a RuntimeError; name the peer if one died
            time.sleep(1.0)  # let the dead helper's exit be noticed
            helpers.check()
            raise PoolBuilderError(f"library rank 0: {_last_line(str(exc))}") from exc
        finally:
            dist.destroy_process_group()
        helpers.join(spec.timeout_s)
        return loss
    finally:
        helpers.stop()

