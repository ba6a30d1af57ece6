"""A build killed with SIGKILL and restarted finishes without redoing finished stages."""

import os
import signal
import subprocess
import sys
import time

from pool_builder.pool.loader import Pool

from ..conftest import ROOT, run_cli_env, tiny_cli_args


def _build(out, log):
    return subprocess.Popen([sys.executable, "-m", "pool_builder", "build", "--out", str(out), *tiny_cli_args()],
                            stdout=subprocess.DEVNULL, stderr=log, env=run_cli_env(), cwd=ROOT)


def _kill_when(out, marker, log_path):
    """Start a build and SIGKILL it as soon as ``out/marker`` exists."""
    with open(log_path, "w") as log:
        proc = _build(out, log)
        deadline = time.monotonic() + 300
        while not (out / marker).exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"build never wrote {marker}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return log_path.read_text()


def test_sigkill_mid_build_then_resume(tmp_path):
    out = tmp_path / "pool"
    # 1. killed inside the oracle's training, after its first epoch checkpoint
    _kill_when(out, "stages/oracle.epoch.pt", tmp_path / "first.log")
    # 2. resumes the oracle from that epoch, killed once the library is finished
    second = _kill_when(out, "stages/library.json", tmp_path / "second.log")
    assert "[oracle] running (resuming after epoch" in second
    assert not (out / "pool.json").exists()
    # 3. finishes without redoing oracle or library
    third_log = tmp_path / "third.log"
    with open(third_log, "w") as log:
        assert _build(out, log).wait(timeout=300) == 0, third_log.read_text()
    text = third_log.read_text()
    assert "[oracle] done earlier" in text and "[library] done earlier" in text
    assert "[oracle] running" not in text and "[library] running" not in text
    assert "cache oracle_logits.npy: reusing" in text
    Pool.open(out).verify()
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".epoch.pt")] == []


def test_killed_while_writing_leaves_no_finished_looking_file(tmp_path):
    """Kill at many random points of a build; every record present always names a file with its sha256."""
    import json

    from edge_runtime.atomic_io import sha256_file

    out = tmp_path / "pool"
    for delay in (1.5, 3.0, 4.5):
        with open(tmp_path / "log", "w") as log:
            proc = _build(out, log)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for record in (out / "stages").glob("*.json") if (out / "stages").exists() else []:
            rec = json.loads(record.read_text())
            assert sha256_file(out / rec["file"]) == rec["sha256"]
