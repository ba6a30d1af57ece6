"""REPORT.md assembly: sections embedded with working links, headlines summarised, missing sections said so."""

import json

from benchmarks.common import Headline, write_section
from benchmarks.report import assemble, embed, rebase_links


def _section(root, name, markdown, headlines=()):
    write_section(root / name, {"seconds": 1.0}, markdown, headlines)


def test_report_embeds_sections_and_says_edge_not_run(tmp_path):
    _section(tmp_path, "query_vs_training", "# Query vs training\n\nintro\n\n## Detail\n\n```\n# not a heading\n```\n"
             "![curves](accuracy_vs_time.png)\n[paper](https://arxiv.org/abs/2107.01354)\n",
             [Headline("PoE query time vs fastest baseline", "58,000x", ">= 10,000x", True, 58000.0)])
    _section(tmp_path, "build_throughput", "# Build throughput\n\nbody\n",
             [Headline("cached vs online", "4.00x", ">= 10x", False, 4.0)])
    (tmp_path / "run.json").write_text(json.dumps({"quick": True, "seconds": 12.0, "pool": {"note": "`p`"},
        "machine": {"cpu": "X", "cores": 2, "python": "3.11", "torch": "2", "platform": "L",
                    "load_average": [0.5, 0, 0]},
        "sections": {"query_vs_training": {"status": "ok", "seconds": 5}, "build_throughput": {"status": "ok"},
                     "scale_ablation": {"status": "failed", "rc": 1, "seconds": 3},
                     "edge": {"status": "skipped", "reason": "`benchmarks/edge.py` is not in this checkout"}}}))
    text = assemble(tmp_path).read_text()
    assert "## 1. Query vs training" in text and "### Detail" in text
    assert "\n# not a heading\n" in text  # code blocks are left alone
    assert "![curves](query_vs_training/accuracy_vs_time.png)" in text
    assert "(https://arxiv.org/abs/2107.01354)" in text
    assert "| 1. Query vs training | PoE query time vs fastest baseline | 58,000x | >= 10,000x | yes |" in text
    assert "| 2. Build throughput: cached vs online | cached vs online | 4.00x | >= 10x | **no** |" in text
    assert "## 3. Ablation: L_scale and alpha\n\nNot run: `benchmarks/scale_ablation.py` exited with 1" in text
    assert "## 4. Edge latency\n\nNot run: `benchmarks/edge.py` is not in this checkout." in text
    assert text.index("## Summary") < text.index("## 1.") < text.index("## 2.") < text.index("## 4.")


def test_edge_report_is_embedded_when_present(tmp_path):
    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "report.md").write_text("# Edge\n\n<img src=\"latency.png\" width=400>\n![x](/abs.png)\n")
    text = assemble(tmp_path).read_text()
    assert "## 4. Edge\n" in text and '<img src="edge/latency.png"' in text and "![x](/abs.png)" in text
    assert "## 1. Query vs training\n\nNot run" in text


def test_embed_and_rebase_units():
    title, body = embed("# T\n## A\n[a](b.md#x) [c](#anchor) [d](http://e)", "sec")
    assert title == "T"
    assert body == "### A\n[a](sec/b.md#x) [c](#anchor) [d](http://e)"
    assert rebase_links("![p](dir/p.png)", "s") == "![p](s/dir/p.png)"


def test_publish_copies_report_and_plots_with_the_same_layout(tmp_path):
    from benchmarks.report import publish

    _section(tmp_path / "run", "scale_ablation", "# Ablation\n\n![a](scale_ablation.png)\n")
    (tmp_path / "run" / "scale_ablation" / "scale_ablation.png").write_bytes(b"\x89PNG fake")
    assemble(tmp_path / "run")
    copied = publish(tmp_path / "run", tmp_path / "docs")
    assert sorted(p.relative_to(tmp_path / "docs").as_posix() for p in copied) == [
        "REPORT.md", "scale_ablation/scale_ablation.png"]
    assert "](scale_ablation/scale_ablation.png)" in (tmp_path / "docs" / "REPORT.md").read_text()


def test_each_section_shows_its_own_stamp_not_the_latest_runs(tmp_path):
    from benchmarks.common import describe_stamp

    old = {"commit": "aaaa", "cpu": "Old CPU", "cpu_flags": ["avx2"], "cores": 2, "load_before": 3.5,
           "load_after": 3.9, "date": "2026-12-01T10:00:00+00:00"}
    (tmp_path / "scale_ablation").mkdir()
    (tmp_path / "scale_ablation" / "result.json").write_text(json.dumps({"stamp": old, "headline": []}))
    (tmp_path / "scale_ablation" / "report.md").write_text("# Ablation\n\n" + describe_stamp(old) + "\n")
    _section(tmp_path, "build_throughput", "# Build throughput\n\nbody\n")  # stamped now, on this machine
    new = json.loads((tmp_path / "build_throughput" / "result.json").read_text())["stamp"]
    assert new["commit"] and new["date"] > old["date"] and isinstance(new["cpu_flags"], list)
    (tmp_path / "run.json").write_text(json.dumps({"quick": True, "pool": {"note": "`p`"},
        "machine": {"cpu": "New CPU", "cores": 16, "python": "3.11", "torch": "2", "platform": "L",
                    "load_average": [0.1, 0, 0]}, "sections": {"build_throughput": {"status": "ok", "seconds": 1}}}))
    text = assemble(tmp_path).read_text()
    assert "| 3. Ablation: L_scale and alpha | 2026-12-01T10:00:00+00:00 | `aaaa` | Old CPU | avx2 | 2 | 3.50 -> 3.90 |" \
        in text
    assert f"| 2. Build throughput: cached vs online | {new['date']} | `{new['commit']}` |" in text
    assert "Stamp: commit `aaaa`; Old CPU (avx2); 2 cores; load average 3.50 before, 3.90 after" in text
    assert text.count("Stamp: commit") == 2
