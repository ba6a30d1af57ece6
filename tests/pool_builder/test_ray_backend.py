"""The Ray backend on a private 2-CPU Ray: a worker SIGKILLed mid-expert, a driver that dies and restarts,
damaged cache shards, tampered results, an unreachable cluster.  Every finished build must equal a clean
local build of the same settings bit for bit.

Builds here use one torch thread (two 1-thread experts share the 2 CPUs); the oracle and library are the
session's tiny pool's, copied in, so only the stages that run on Ray are computed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; `make test` installs it)")

from pool_builder.build import build_pool, config_for  # noqa: E402
from pool_builder.build.experts import ExpertJob  # noqa: E402
from pool_builder.stages.engine import StageRecord  # noqa: E402
from pool_builder.errors import PoolBuilderError  # noqa: E402
from pool_builder.models.wrn import WRNConfig  # noqa: E402
from pool_builder.pool.loader import Pool  # noqa: E402
from pool_builder.build.ray_backend import (ExpertResult, RayOptions, RayPoolBuild, build_pool_on_ray,  # noqa: E402
                                      parse_address, probe)

from ..conftest import FMNIST_DIR, ROOT, TINY_BUILD, run_cli_env, tiny_cli_args, with_stages_of  # noqa: E402

OPTS = RayOptions(shard_rows=512)  # 600 training images -> two shards per cache
TINY_1_THREAD = {**TINY_BUILD, "threads": 1}


@pytest.fixture(autouse=True)
def _restore_threads():
    """A build pins the process's torch threads to its --threads; the rest of the suite expects its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, object_store_memory=160 << 20, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def _with_trained_stages(local: Path, out: Path) -> Path:
    """A pool directory holding the local build's oracle and library (+ records): only Ray's stages run."""
    return with_stages_of(local, out, ("oracle.pt", "library.pt", "stages/oracle.json", "stages/library.json"))


def _cfg(out: Path, **overrides):
    return config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), **{**TINY_1_THREAD, **overrides})


@pytest.fixture(scope="module")
def local_pool(tiny_pool_dir, tmp_path_factory) -> Path:
    """The reference: caches and experts of the same build computed locally, in this process."""
    out = _with_trained_stages(tiny_pool_dir, tmp_path_factory.mktemp("local") / "pool")
    threads = torch.get_num_threads()
    try:
        build_pool(_cfg(out), log=lambda _m: None, show_progress=False)
    finally:
        torch.set_num_threads(threads)  # the build pins the process's threads; other tests expect theirs
    return out


def _assert_equals_local(out: Path, local: Path) -> None:
    ours, theirs = json.loads((out / "pool.json").read_text()), json.loads((local / "pool.json").read_text())
    assert ours["pool_id"] == theirs["pool_id"]
    for task, entry in theirs["experts"].items():
        assert (out / entry["file"]).read_bytes() == (local / entry["file"]).read_bytes(), task
        assert ours["experts"][task]["metrics"]["accuracy"] == entry["metrics"]["accuracy"]
    for cache in ("oracle_logits.npy", "library_features.npy"):
        assert np.array_equal(np.load(out / "cache" / cache), np.load(local / "cache" / cache)), cache
    Pool.open(out).verify()
    assert not (out / "cache" / "shards").exists()
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


class WorkerKiller(threading.Thread):
    """SIGKILLs the first Ray worker seen running an expert task (its process title is ``ray::expert-<task>``)."""

    def __init__(self, after_s: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.after_s = after_s
        self.killed: tuple[int, str] | None = None
        self.done = threading.Event()

    @staticmethod
    def _running_experts() -> dict[int, str]:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::expert-"):
                found[int(pid)] = title
        return found

    def run(self) -> None:
        while not self.done.is_set() and self.killed is None:
            seen = self._running_experts()
            if seen:
                time.sleep(self.after_s)  # well inside training, not while the task unpacks its arguments
                still = self._running_experts()
                for pid, title in seen.items():
                    if still.get(pid) == title:
                        os.kill(pid, signal.SIGKILL)
                        self.killed = (pid, title)
                        break
            time.sleep(0.02)


def _build_while(killer: WorkerKiller, out: Path) -> tuple[list[str], Any, str]:
    """Build on Ray while ``killer`` watches; the log, the pool's metadata and the killed expert's last line."""
    logs: list[str] = []
    killer.start()
    try:
        meta = build_pool_on_ray(_cfg(out), OPTS, log=logs.append, show_progress=False)
    finally:
        killer.done.set()
        killer.join()
    assert killer.killed is not None, f"{type(killer).__name__}: no expert task was caught"
    pid, title = killer.killed
    finished = [line for line in logs if line.startswith(f"[{title.removeprefix('ray::')}] finished")]
    assert len(finished) == 1 and f"pid {pid} " not in finished[0], finished  # Ray re-ran it in another worker
    return logs, meta, finished[0]


def test_worker_killed_mid_expert_still_builds_the_local_pool(tiny_pool_dir, local_pool, tmp_path, ray_cluster):
    out = _with_trained_stages(tiny_pool_dir, tmp_path / "pool")
    logs, meta, _line = _build_while(WorkerKiller(), out)
    assert sorted(meta.experts) == sorted(json.loads((local_pool / "pool.json").read_text())["experts"])
    assert any("2 shard(s) on Ray" in line for line in logs)
    _assert_equals_local(out, local_pool)


class CheckpointedWorkerKiller(WorkerKiller):
    """SIGKILLs the worker of the first expert whose per-epoch checkpoint has appeared in the pool directory."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def run(self) -> None:
        while not self.done.is_set() and self.killed is None:
            stages = {p.name.removesuffix(".epoch.pt") for p in (self.out / "stages").glob("expert-*.epoch.pt")}
            for pid, title in self._running_experts().items():
                if title.removeprefix("ray::") in stages:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (pid, title)
                    break
            time.sleep(0.01)


def test_retried_expert_resumes_from_its_checkpoint(tiny_pool_dir, local_pool, tmp_path, ray_cluster):
    out = _with_trained_stages(tiny_pool_dir, tmp_path / "pool")
    _logs, _meta, line = _build_while(CheckpointedWorkerKiller(out), out)
    assert "(resumed after epoch " in line, line  # not from epoch 0 again
    _assert_equals_local(out, local_pool)  # and still bit for bit the clean local build
    assert list((out / "stages").glob("*.epoch.pt")) == []


def test_library_ranks_as_ray_actors_equal_spawned_ranks(tiny_pool_dir, ddp_pool_dir, tmp_path, ray_cluster):
    """2 library ranks as Ray actors (1 thread each) train the same bits as 2 spawned ranks (2 threads shared)."""
    out = with_stages_of(tiny_pool_dir, tmp_path / "pool")
    logs: list[str] = []
    build_pool_on_ray(_cfg(out, library_workers=2), OPTS, log=logs.append, show_progress=False)
    assert any("rank 1 as Ray actors" in line for line in logs), logs
    assert (out / "library.pt").read_bytes() == (ddp_pool_dir / "library.pt").read_bytes()
    Pool.open(out).verify()


def test_more_library_ranks_than_the_cluster_has_cpus(tmp_path, ray_cluster):
    build = RayPoolBuild(_cfg(tmp_path / "pool", library_workers=4), OPTS)
    with pytest.raises(PoolBuilderError, match=r"ranks 1-3 as Ray actors of 1 CPU\(s\) each .* the cluster has 2"):
        build._check_library_workers()


class DriverDied(BaseException):
    """Stands in for a SIGKILL of the driver at a chosen line of its log."""


def _die_at(marker: str, nth: int, logs: list[str]):
    def log(line: str) -> None:
        logs.append(line)
        if marker in line and sum(marker in entry for entry in logs) == nth:
            raise DriverDied(line)
    return log


def test_restarted_driver_reuses_finished_work_and_recomputes_damaged_shards(tiny_pool_dir, local_pool, tmp_path,
                                                                              ray_cluster):
    out = _with_trained_stages(tiny_pool_dir, tmp_path / "pool")
    first: list[str] = []
    # 1. dies once the first library-feature shard is on disk (oracle logits are assembled by then)
    with pytest.raises(DriverDied):
        build_pool_on_ray(_cfg(out), OPTS, log=_die_at("library_features: shard", 1, first), show_progress=False)
    shards = sorted((out / "cache" / "shards" / "library_features").glob("*.npy"))
    assert len(shards) == 1 and not (out / "cache" / "library_features.npy").exists()
    with open(shards[0], "r+b") as handle:  # flip one byte in the middle: the record's sha256 no longer holds
        handle.seek(shards[0].stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    # 2. recomputes that shard; dies after the second expert is written but before its record
    second: list[str] = []
    with pytest.raises(DriverDied):
        build_pool_on_ray(_cfg(out), OPTS, log=_die_at("] finished in", 2, second), show_progress=False)
    assert "cache oracle_logits.npy: reusing (600, 10) float32" in second
    assert any(f"shard {shards[0].name} is stale or corrupt, recomputing" in line for line in second)
    assert any("(0 reused)" in line for line in second)
    assert len(list((out / "stages").glob("expert-*.json"))) == 1
    # 3. finishes: the committed expert is reused, the uncommitted one rebuilt, the result equals local
    third: list[str] = []
    build_pool_on_ray(_cfg(out), OPTS, log=third.append, show_progress=False)
    assert sum("done earlier" in line and "[expert-" in line for line in third) == 1
    assert any("[experts] 3 task(s) on Ray" in line for line in third)
    _assert_equals_local(out, local_pool)


def _job(task: str = "bags") -> ExpertJob:
    return ExpertJob(task, (8,), "f" * 32, 1, WRNConfig(depth=16, widen_factor=1, num_classes=10, in_channels=1),
                     _cfg(Path("unused")))


def test_tampered_or_misaddressed_expert_never_enters_the_pool(tmp_path, pool_copy):
    build = RayPoolBuild(_cfg(tmp_path / "fresh"), OPTS, log=lambda _m: None)
    real = json.loads((pool_copy / "stages" / "expert-bags.json").read_text())
    weights = (pool_copy / "experts" / "bags.pt").read_bytes()
    job = _job()
    record = StageRecord(**{**real, "fingerprint": job.fingerprint})
    tampered = weights[:-1] + bytes([weights[-1] ^ 1])
    with pytest.raises(PoolBuilderError, match="do not match their sha256"):
        build._commit_expert(job, ExpertResult(record, tampered, "node", 7))
    with pytest.raises(PoolBuilderError, match="another job"):
        build._commit_expert(_job("tops"), ExpertResult(record, weights, "node", 7))
    assert not (tmp_path / "fresh" / "experts" / "bags.pt").exists()
    assert not (tmp_path / "fresh" / "stages" / "expert-bags.json").exists()
    build._commit_expert(job, ExpertResult(record, weights, "node", 7))  # the genuine result is admitted
    assert (tmp_path / "fresh" / "experts" / "bags.pt").read_bytes() == weights
    assert build.stages.finished("expert-bags", job.fingerprint) is not None


def test_unreachable_cluster_fails_fast_with_one_line(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pool_builder", "build", "--backend", "ray", "--address",
                           "127.0.0.1:9", "--ray-connect-timeout", "2", "--out", str(tmp_path / "pool"),
                           *tiny_cli_args()], capture_output=True, text=True, env=run_cli_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pool-builder: error: Ray cluster at 127.0.0.1:9 does not answer") and "ray start" in last
    assert time.monotonic() - start < 30
    assert not (tmp_path / "pool").exists()  # nothing was trained before the cluster answered
    start = time.monotonic()
    with pytest.raises(PoolBuilderError, match="does not answer"):
        probe("192.0.2.1:6379", 1.0)  # TEST-NET-1: never routed, so either unreachable or a timeout
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("address, expected", [("10.0.0.5:6379", ("10.0.0.5", 6379)), ("ray://head:10001",
                         ("head", 10001)), ("head", ("head", 6379)), ("auto", None), ("[::1]:6380", ("::1", 6380))])
def test_cluster_addresses(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("options, message", [
    (dict(shard_rows=1000), "multiple of 512"), (dict(cache_via="nfs"), "object_store, shared_path"),
    (dict(max_retries=-1), "max retries"), (dict(object_store_mb=10), "object store"), (dict(task_cpus=0), "CPUs")])
def test_bad_ray_options_list_what_is_valid(options, message):
    with pytest.raises(PoolBuilderError, match=message):
        RayOptions(**options)
    with pytest.raises(PoolBuilderError, match="not HOST:PORT"):
        parse_address("head:port")


def test_online_mode_is_local_only(tmp_path):
    cfg = config_for("quick", out=str(tmp_path), online=True)
    with pytest.raises(PoolBuilderError, match="--backend local"):
        RayPoolBuild(cfg, OPTS)


def test_multi_teacher_oracle_is_local_only(tmp_path):
    from pool_builder.models.ensemble import EnsembleConfig, TeacherSpec

    teachers = (TeacherSpec(arch="wrn_10_1", seed=0), TeacherSpec(arch="wrn_10_1", seed=1))
    cfg = config_for("quick", out=str(tmp_path), oracle_arch=None, ensemble=EnsembleConfig(teachers))
    with pytest.raises(PoolBuilderError, match="multi-teacher oracle .* needs --backend local"):
        RayPoolBuild(cfg, OPTS)
