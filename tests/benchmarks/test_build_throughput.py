"""Cached vs online extraction on the tiny pool: both builds reuse oracle and library and agree."""

import json

from benchmarks.build_throughput import ThroughputConfig, render, run
from benchmarks.common import NO_PLOTS, pyplot


def test_tiny_cached_vs_online(tiny_pool_dir, tmp_path):
    cfg = ThroughputConfig(pool=str(tiny_pool_dir), out=str(tmp_path), tasks=("footwear",), epochs=3)
    result = run(cfg)
    cached, online = result["runs"]["cached"], result["runs"]["online"]
    assert (tmp_path / "build_throughput" / "work" / "cached" / "cache" / "library_features.npy").is_file()
    assert not (tmp_path / "build_throughput" / "work" / "online" / "cache").exists()
    assert list(cached["experts"]) == list(online["experts"]) == ["footwear"]
    c = result["comparison"]
    assert c["images_per_mode"] == 600 * 3
    # online re-runs oracle and library on every batch: strictly more work for the same expert
    assert c["cpu_ratio"] > 1.0
    assert c["max_abs_diff_points"] < 5.0  # same batches and seeds; only float16 rounding of the cache differs
    out = render(result, tmp_path)
    saved = json.loads((out / "result.json").read_text())
    assert [h["claim"] for h in saved["headline"]][0].startswith("cached vs online")
    report = (out / "report.md").read_text()
    if pyplot() is None:
        assert NO_PLOTS in report
    else:
        assert (out / "throughput.png").stat().st_size > 1000 and "](throughput.png)" in report
