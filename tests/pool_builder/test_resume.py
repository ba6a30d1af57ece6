"""A build killed with SIGKILL and restarted finishes without redoing finished stages."""

import os
import signal
import subprocess
import sys
import time

from pool_builder.pool import Pool

from ..conftest import ROOT, run_cli_env, tiny_cli_args


def _build(out, log):
    return subprocess.Popen([sys.executable, "-m", "pool_builder", "build", "--out", str(out), *tiny_cli_args()],
                            stdout=subprocess.DEVNULL, stderr=log, env=run_cli_env(), cwd=ROOT)


def test_sigkill_mid_build_then_resume(tmp_path):
    out = tmp_path / "pool"
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        proc = _build(out, log)
        deadline = time.monotonic() + 300
        # kill while the experts are being extracted: after the library's record appears
        while not (out / "stages" / "library.json").exists():
            assert proc.poll() is None, first_log.read_text()
            assert time.monotonic() < deadline, "build did not reach the library stage"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "pool.json").exists()

    second_log = tmp_path / "second.log"
    with open(second_log, "w") as log:
        assert _build(out, log).wait(timeout=300) == 0, second_log.read_text()
    text = second_log.read_text()
    assert "[oracle] done earlier" in text and "[library] done earlier" in text
    assert "[oracle] running" not in text and "[library] running" not in text
    assert "cache oracle_logits.npy: reusing" in text
    Pool.open(out).verify()
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


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
