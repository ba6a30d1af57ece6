"""run_all: a rerun of some sections keeps the record of the others; the report is assembled either way."""

import json

from benchmarks.run_all import RunConfig, run


def test_rerun_keeps_other_sections_and_assembles(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "pool.json").write_text("{}")  # the runner only checks that a pool is there
    out = tmp_path / "bench"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"quick": True, "sections": {
        "scale_ablation": {"status": "failed", "rc": 1, "seconds": 3.0}}}))
    assert run(RunConfig(out, True, pool, sections=())) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["sections"] == {"scale_ablation": {"status": "failed", "rc": 1, "seconds": 3.0}}
    assert record["pool"]["note"].endswith("(given)") and record["machine"]["cores"] >= 1
    report = (out / "REPORT.md").read_text()
    assert "sections scale_ablation 3 s" in report
    assert "## 3. Ablation: L_scale and alpha\n\nNot run: `benchmarks/scale_ablation.py` exited with 1" in report
    assert "## 1. Query vs training\n\nNot run (`python benchmarks/query_vs_training.py --out OUT` writes it)." in report
