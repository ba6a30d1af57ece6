"""Data-parallel library distillation (``--library-workers N``): two DDP ranks against one process, a rank
killed mid-stage and the driver killed mid-stage (both resumed to the uninterrupted bits), bad input.

DDP is not bitwise equal to one process (batch norm sees half a batch per rank; gradients are summed in
another order), so the comparison with N = 1 uses a stated tolerance; DDP against DDP is bitwise."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pool_builder.cli import main
from pool_builder.ddp import MAX_LIBRARY_WORKERS, local_cpus
from pool_builder.evaluate import Evaluator
from pool_builder.pool import Pool

from ..conftest import ROOT, TRAINED_ORACLE, run_cli_env, tiny_cli_args, with_stages_of
from .test_cli import _one_line_error

# Tolerance of 2 ranks vs 1 process on the tiny build (300 test images, so one image is 0.33 points).
# Measured (seed 0): student 69.33 % vs 70.33 %, final KD loss 0.346 vs 0.317, all four tasks composed 71.67 % vs
# 71.33 %; over library seeds 2-5 the student was 0.3-2.0 points from one process (both ways), with per-rank batch
# statistics instead of synchronized ones up to 4.7 points below.
ACCURACY_POINTS = 3.0
KD_LOSS_RELATIVE = 0.2

pytestmark = pytest.mark.skipif(local_cpus() < 2, reason="two library ranks need two CPUs")


def _meta(pool: Path) -> dict:
    return json.loads((pool / "pool.json").read_text())


def test_two_ranks_train_a_library_close_to_one_process(tiny_pool_dir, ddp_pool_dir, fmnist_small):
    one, two = _meta(tiny_pool_dir), _meta(ddp_pool_dir)
    assert two["oracle"]["sha256"] == one["oracle"]["sha256"]
    assert two["build"]["settings"]["library_workers"] == 2 and "library_workers" not in one["build"]["settings"]
    lib1, lib2 = one["library"]["metrics"], two["library"]["metrics"]
    assert abs(lib2["student_test_accuracy"] - lib1["student_test_accuracy"]) * 100 <= ACCURACY_POINTS, (lib1, lib2)
    assert abs(lib2["final_kd_loss"] - lib1["final_kd_loss"]) <= KD_LOSS_RELATIVE * lib1["final_kd_loss"]
    assert two["library"]["sha256"] != one["library"]["sha256"]  # close, not bitwise: see the module docstring
    # the pool builds end to end on the DDP library, and composes as well as the one-process pool
    Pool.open(ddp_pool_dir).verify()
    tasks = ["tops", "footwear", "bottoms", "bags"]
    acc1 = Evaluator(Pool.open(tiny_pool_dir), fmnist_small.test).query(tasks).poe_accuracy
    acc2 = Evaluator(Pool.open(ddp_pool_dir), fmnist_small.test).query(tasks).poe_accuracy
    assert abs(acc2 - acc1) * 100 <= ACCURACY_POINTS, (acc1, acc2)
    assert list((ddp_pool_dir / "stages").glob("*.epoch.pt")) == []


def _build(out: Path, log) -> subprocess.Popen:
    """The tiny 2-rank build with 1-epoch experts (only its library is compared; expert settings do not enter
    the library's fingerprint or checkpoint)."""
    return subprocess.Popen([sys.executable, "-m", "pool_builder", "build", "--out", str(out), "--library-workers",
                             "2", *tiny_cli_args(), "--expert-epochs", "1"], stdout=subprocess.DEVNULL, stderr=log,
                            env=run_cli_env(), cwd=ROOT)


def _epochs_done(out: Path) -> int:
    """Epochs recorded by the library's checkpoint (0 when there is none yet)."""
    import torch

    try:
        return int(torch.load(out / "stages" / "library.epoch.pt", weights_only=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return 0


def _run_until(out: Path, log_path: Path, epochs: int, victim: str) -> tuple[int, str]:
    """Start a build and SIGKILL ``victim`` (``driver`` or ``helper``) once ``epochs`` epochs are checkpointed."""
    with open(log_path, "w") as log:
        proc = _build(out, log)
        deadline = time.monotonic() + 300
        while _epochs_done(out) < epochs:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        helper = int(re.search(r"as spawned processes \(\S+ pid (\d+)\)", log_path.read_text()).group(1))
        os.kill(proc.pid if victim == "driver" else helper, signal.SIGKILL)
        code = proc.wait(timeout=120)
    return helper, f"exit {code}\n" + log_path.read_text()


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` exits (or is only a zombie left for its new parent to reap) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_killed_rank_or_driver_resumes_to_the_uninterrupted_library(tiny_pool_dir, ddp_pool_dir, tmp_path):
    out = with_stages_of(tiny_pool_dir, tmp_path / "pool",
                         TRAINED_ORACLE + ("cache/oracle_logits.npy", "cache/oracle_logits.json"))
    # 1. helper rank killed after epoch 2: the driver stops with one line naming it; the checkpoint stays
    _, first = _run_until(out, tmp_path / "first.log", 2, "helper")
    assert first.startswith("exit 2"), first
    last = first.strip().splitlines()[-1]
    died = r"pool-builder: error: library rank 1 \(pid \d+\) died \(SIGKILL\); .* run the build again to resume"
    assert re.match(died, last), last
    assert _epochs_done(out) >= 2 and not (out / "library.pt").exists()
    # 2. resumed, then the driver (rank 0) is killed: its helper notices and exits on its own
    helper, second = _run_until(out, tmp_path / "second.log", 4, "driver")
    assert re.search(r"\[library\] running \(resuming after epoch [23]\)", second), second
    assert _gone(helper, 60), f"library rank 1 (pid {helper}) outlived its driver"
    # 3. finishes: the library equals the uninterrupted 2-rank build bit for bit
    with open(tmp_path / "third.log", "w") as log:
        assert _build(out, log).wait(timeout=300) == 0, (tmp_path / "third.log").read_text()
    assert "resuming after epoch" in (tmp_path / "third.log").read_text()
    assert (out / "library.pt").read_bytes() == (ddp_pool_dir / "library.pt").read_bytes()
    Pool.open(out).verify()
    assert [p for p in out.rglob("*") if p.name.endswith((".tmp", ".epoch.pt"))] == []


def test_rebuild_with_the_same_workers_reuses_the_library(ddp_pool_dir):
    from pool_builder.build import build_pool, config_for

    from ..conftest import FMNIST_DIR, TINY_BUILD

    logs: list[str] = []
    build_pool(config_for("quick", out=str(ddp_pool_dir), data_dir=str(FMNIST_DIR), library_workers=2,
                          **TINY_BUILD), log=logs.append, show_progress=False)
    assert "[library] done earlier, reusing library.pt" in logs and not any(l.endswith("running") for l in logs)


def test_bad_library_workers_is_one_line(capsys, tmp_path):
    base = ["build", "--out", str(tmp_path / "pool"), *tiny_cli_args()]
    _one_line_error(capsys, [*base, "--library-workers", "0"], "--library-workers must be between 1")
    _one_line_error(capsys, [*base, "--library-workers", str(MAX_LIBRARY_WORKERS + 1)],
                    f"and {MAX_LIBRARY_WORKERS}, got {MAX_LIBRARY_WORKERS + 1}")
    _one_line_error(capsys, [*base, "--library-workers", "17"], "batch norm needs at least 2 images per rank")
    _one_line_error(capsys, [*base, "--library-workers", "2", "--online"], "drop --online")
    too_many = local_cpus() + 1
    if too_many <= MAX_LIBRARY_WORKERS:
        _one_line_error(capsys, [*base, "--library-workers", str(too_many), "--batch-size", str(2 * too_many)],
                        f"which has {local_cpus()} CPU(s)")
    assert not (tmp_path / "pool" / "oracle.pt").exists()  # refused before anything trained
