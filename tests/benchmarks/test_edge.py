"""The edge section end to end on the tiny pool's fragments: every variant timed, headlines against targets."""

import json
import subprocess
import sys

from tests.conftest import ROOT, run_cli_env


def test_edge_section_measures_the_tiny_bundle(tiny_pool_dir, tiny_fragments, tmp_path):
    fragments, _, _ = tiny_fragments
    done = subprocess.run([sys.executable, "benchmarks/edge.py", "--pool", str(tiny_pool_dir), "--fragments",
                           str(fragments), "--out", str(tmp_path), "--quick", "--threads", "1", "--rounds", "10",
                           "--warmup", "2"], cwd=ROOT, env=run_cli_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "edge" / "result.json").read_text())
    variants = {(r["format"], r["precision"]) for r in result["latency"]}
    assert variants == {("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8"), ("onnx", "fp32"),
                        ("onnx", "int8")}
    for row in result["latency"]:
        assert all(row["latency_ms"][kind]["p50"] > 0 for kind in ("composed", "fused", "oracle"))
        # The tiny oracle (wrn_10_1) is smaller than library + experts (wrn_16_1), so only sizes are checked here.
        assert all(row["bytes"][kind] > 0 for kind in ("composed", "fused", "oracle"))
    fp32 = [a for a in result["accuracy"] if a["precision"] == "fp32"]
    assert max(a["composed_max_abs_logit_error"] for a in fp32) < 1e-3  # the runtime reproduces torch
    claims = [h["claim"] for h in result["headline"]]
    assert claims[0] == "TFLite composed vs oracle at the same precision, 1 thread (worst query): int8 vs int8"
    assert len(claims) == 8 and "LiteRT/XNNPACK FullyConnected int8" in claims[6]
    assert all(isinstance(result["headline"][i]["met"], bool) for i in (0, 3, 4, 5))
    for row in result["latency"]:  # each backend and precision against its own probe, oracle at the same precision
        assert row["gemm_probe"]["gops"] > 0 and row["fraction_of_peak"] > 0
        assert row["gemm_probe"]["name"].startswith("LiteRT" if row["format"] == "tflite" else "ONNX Runtime")
        assert row["speedup_vs_oracle_same_precision"] == row["latency_ms"]["oracle"]["p50"] / \
            row["latency_ms"]["composed"]["p50"]
    report = (tmp_path / "edge" / "report.md").read_text()
    assert report.startswith("# Edge: composed fragments vs fused graph vs oracle")
    assert "| footwear,tops | tflite | int8 | 1 |" in report


def test_edge_section_without_fragments_says_how_to_get_them(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/edge.py", "--pool", str(tmp_path), "--fragments",
                           str(tmp_path), "--out", str(tmp_path)], cwd=ROOT, env=run_cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"edge.py: error: {tmp_path}/pool.json not found; run `make demo` "
                                                "first (it builds the pool and its fragments)"]
