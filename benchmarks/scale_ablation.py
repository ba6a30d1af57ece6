"""Cross-expert error share with L_soft only vs L_soft + alpha * L_scale (paper, Table 6), alpha sweep.

Re-extracts every expert of an existing pool for each alpha from the *same*
oracle, library and cached teacher outputs (hard links, no retraining of
either), then scores composite queries.  Writes JSON and Markdown.

    python benchmarks/scale_ablation.py --pool runs/full/pool --alphas 0,0.3 --out runs/full/ablation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool_builder.build import BuildConfig, build_pool  # noqa: E402
from pool_builder.evaluate import Evaluator, held_out_split  # noqa: E402
from pool_builder.pool import Pool  # noqa: E402
from pool_builder.report import format_table, pct  # noqa: E402

SHARED = ("oracle.pt", "oracle.torchscript.pt", "library.pt", "stages/oracle.json", "stages/library.json",
          "cache/oracle_logits.npy", "cache/oracle_logits.json", "cache/library_features.npy",
          "cache/library_features.json")


def derive(src: Path, dst: Path) -> None:
    """A pool directory sharing ``src``'s oracle, library and caches (hard links when possible)."""
    for name in SHARED:
        if (src / name).exists() and not (dst / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src / name, dst / name)
            except OSError:
                shutil.copy2(src / name, dst / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--alphas", default="0,0.3")
    ap.add_argument("--queries", default="footwear,tops;bottoms,bags;tops,bottoms,footwear;tops,footwear,bottoms,bags")
    args = ap.parse_args()
    src, out = Path(args.pool), Path(args.out)
    base = Pool.open(src)
    settings = dict(base.meta.build["settings"])
    queries = [q for q in args.queries.split(";") if q]
    results = []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        if alpha == settings["alpha"]:
            pool_dir = src
        else:
            pool_dir = out / f"alpha_{alpha:g}"
            derive(src, pool_dir)
            build_pool(replace(BuildConfig(**{**settings, "out": str(pool_dir)}), alpha=alpha), show_progress=False)
        pool = Pool.open(pool_dir)
        evaluator = Evaluator(pool, held_out_split(pool))
        for query in queries:
            results.append({"alpha": alpha, **evaluator.query(query).to_json()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_ablation.json").write_text(json.dumps(results, indent=2))
    rows = [[",".join(r["tasks"]), f"{r['alpha']:g}", pct(r["poe_accuracy"]), pct(r["oracle_accuracy"]),
             f"{r['gap_points']:+.2f}", r["errors"], r["cross_expert_errors"], pct(r["cross_expert_error_share"])]
            for r in results]
    table = format_table(["query", "alpha", "PoE acc", "oracle (restricted)", "gap (pts)", "errors",
                          "cross-expert", "cross-expert share"], rows)
    (out / "scale_ablation.md").write_text("# L_scale ablation\n\n```\n" + table + "\n```\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
