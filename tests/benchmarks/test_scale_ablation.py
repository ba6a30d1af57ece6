"""The ablation's report and headlines from a measured result (the re-extraction itself is pool_builder's)."""

import json

from benchmarks.scale_ablation import AblationConfig, render


def _row(alpha, tasks, acc, errors, cross):
    return {"alpha": alpha, "tasks": tasks, "poe_accuracy": acc, "oracle_accuracy": 0.9, "gap_points": 100 * (acc - 0.9),
            "errors": errors, "cross_expert_errors": cross, "cross_expert_error_share": cross / errors}


def test_ablation_report_and_headlines(tmp_path):
    machine = {"cpu": "X", "cores": 2, "python": "3.11", "torch": "2", "platform": "L", "load_average": [1, 1, 1]}
    result = {
        "config": {**AblationConfig().__dict__, "alphas": [0.0, 0.3]}, "pool_id": "abc", "pool_alpha": 0.3,
        "machine": machine, "seconds": 9.0, "one_class_tasks": ["bags"],
        "experts": {"0": {"seconds": 8.0, "reused": False, "mean_abs_logit_gap": {"tops": 3.1, "bags": 4.4}},
                    "0.3": {"seconds": 0.0, "reused": True, "mean_abs_logit_gap": {"tops": 0.4, "bags": 0.5}}},
        "results": [_row(0.0, ["bottoms", "bags"], 0.70, 90, 89), _row(0.3, ["bottoms", "bags"], 0.99, 2, 1),
                    _row(0.0, ["tops", "footwear", "bags"], 0.80, 100, 70),
                    _row(0.3, ["tops", "footwear", "bags"], 0.90, 50, 10),
                    _row(0.0, ["footwear", "tops"], 0.85, 60, 30), _row(0.3, ["footwear", "tops"], 0.88, 48, 12)]}
    out = render(result, tmp_path)
    saved = json.loads((out / "result.json").read_text())
    first = saved["headline"][0]
    # the headline is the two-task query without the one-class expert "bags", not the widest query
    assert first["claim"] == "cross-expert share of errors, footwear,tops: L_soft only vs alpha = 0.3"
    assert first["measured"] == "50.0 % -> 25.0 %" and first["met"] is True
    assert saved["headline"][2]["measured"] == "3 of 3"
    report = (out / "report.md").read_text()
    assert ("| bottoms,bags (one-class: bags) | 0 (L_soft only) | 70.00 % | 90.00 % | -20.00 | 90 | 89 | 98.9 % |"
            in report)
    assert "| footwear,tops | 0 (L_soft only) |" in report and "two-task query `footwear,tops`" in report
    assert "| 0 | 8 s | 3.10 | 4.40 |" in report and "| 0.3 | reused (the pool's) | 0.40 | 0.50 |" in report
