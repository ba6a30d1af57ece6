"""A user's own ~1.5k-image folder: composite gaps and build time, old epoch rule vs step budgets.

Writes ``--images`` Fashion-MNIST training images (the same number from every class) as PNG files into
``ROOT/<class>/`` (the folder layout a user has; the builder splits it 80/20 by file name), a 3-task
hierarchy over all 10 classes, then builds two pools from it with the quick profile:

  - ``epochs``: the former rule, fixed 3 / 6 / 15 epochs and no validation share (what the report hit);
  - ``steps``:  the defaults now, step budgets -> epochs for this folder's size, early stopping.

Each pool's build-time composite check (all tasks and every pair vs the restricted oracle) is recorded.

    python benchmarks/own_data.py --out runs/bench/own_data --json docs/results/own_data.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.atomic_io import atomic_write_json  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402
from pool_builder.build import build_pool, config_for  # noqa: E402
from pool_builder.data.datasets import FASHION_MNIST_DIR, load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"tops": ["T-shirt-top", "Pullover", "Coat", "Shirt"], "footwear": ["Sandal", "Sneaker", "Ankle boot"],
         "other": ["Trouser", "Dress", "Bag"]}
RULES: dict[str, dict[str, Any]] = {
    "epochs": dict(oracle_epochs=3, library_epochs=6, expert_epochs=15, val_share=0.0),
    "steps": {},
}


def write_folder(root: Path, images: int, seed: int) -> Path:
    """``images`` stratified Fashion-MNIST training images as ROOT/<class>/<n>.png (grey)."""
    from PIL import Image

    data = load_dataset("fashion_mnist", FASHION_MNIST_DIR).limited(images, 10, seed=seed)
    for i, (image, label) in enumerate(zip(data.train.images, data.train.labels)):
        folder = root / data.class_names[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0], "L").save(folder / f"{i:05d}.png")
    return root


def stamp() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"commit": commit.stdout.strip() or "unknown", "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/own_data")
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rules", default="epochs,steps")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    out = Path(args.out)
    folder = out / "images"
    if not folder.is_dir():
        write_folder(folder, args.images, seed=5)
    (out / "tasks.json").write_text(json.dumps(TASKS))
    result: dict[str, Any] = {"machine": stamp(), "images": args.images, "tasks": TASKS, "runs": {}}
    for rule in args.rules.split(","):
        start = time.perf_counter()
        meta = build_pool(config_for("quick", out=str(out / rule), dataset="image_folder", data_dir=str(folder),
                                     hierarchy=str(out / "tasks.json"), threads=args.threads, **RULES[rule]),
                          show_progress=False)
        settings = meta.build["settings"]
        result["runs"][rule] = {
            "build_seconds": round(time.perf_counter() - start, 1),
            "epochs": [settings["oracle_epochs"], settings["library_epochs"], settings["expert_epochs"]],
            "train_images": meta.build["train_images"], "validation_images": meta.build["validation_images"],
            "test_images": meta.build["test_images"],
            "oracle_test_accuracy": meta.oracle.metrics["test_accuracy"],
            "expert_gaps_points": {t: round(100 * (e.metrics["accuracy"] - e.metrics["oracle_accuracy"]), 2)
                                   for t, e in meta.experts.items()},
            "stages": {"oracle": {k: meta.oracle.metrics.get(k) for k in ("epochs_run", "best_epoch")},
                       "library": {k: meta.library.metrics.get(k) for k in ("epochs_run", "best_epoch")},
                       **{t: {k: e.metrics.get(k) for k in ("epochs_run", "best_epoch")}
                          for t, e in meta.experts.items()}},
            "checks": meta.checks}
        result["machine"]["load_after_" + rule] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps({rule: {k: v for k, v in result["runs"][rule].items() if k != "checks"}}), flush=True)
        for path in [out / "own_data.json"] + ([Path(args.json)] if args.json else []):
            atomic_write_json(path, result)  # after every rule, so a stopped run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
