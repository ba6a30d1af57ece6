"""Bad arguments: one line naming the valid choices, exit 2, before any work."""

import subprocess
import sys

import pytest

from ..conftest import ROOT, run_cli_env

CASES = [
    (["benchmarks/query_vs_training.py", "--baselines", "scratch,finetune"], "valid baselines: scratch, kd, ckd, transfer"),
    (["benchmarks/run_all.py", "--sections", "edge,latency"],
     "valid sections: query_vs_training, build_throughput, scale_ablation, edge, progressive"),
    (["benchmarks/scale_ablation.py", "--alphas", "0,x"], "--alphas must be comma-separated numbers"),
    (["benchmarks/build_throughput.py", "--pool", "/nonexistent/pool"], "no pool at /nonexistent/pool"),
    (["benchmarks/progressive.py", "--stages", "1"], "a progressive expert needs at least 2 stages"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[c[0][0].split("/")[1] for c in CASES])
def test_bad_argument_is_one_line_and_exit_2(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, *argv, "--out", str(tmp_path)], cwd=ROOT, env=run_cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
