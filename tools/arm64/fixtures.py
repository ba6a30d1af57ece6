"""What the emulated runs are checked on: a tiny pool and its fragments, built in the same run.

The pool is the test suite's tiny build (tests/conftest.py ``TINY_BUILD``: 600
real Fashion-MNIST training images) with its epochs halved: the check is about
the device side computing the same numbers on aarch64, not about accuracy.
The images are the pool's 300 held-out test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tests.conftest import FMNIST_DIR, TINY_BUILD, TINY_GATE

from .sysroot import SetupError

FORMATS = ("tflite", "onnx")
PRECISIONS = ("fp32", "int8")
HALVED = {key: max(1, TINY_BUILD[key] // 2) for key in ("oracle_epochs", "library_epochs", "expert_epochs")}


@dataclass(frozen=True)
class Fixtures:
    fragments: Path
    images: Path  # (N, 28, 28, 1) uint8 .npy
    tasks: tuple[str, ...]


def build_fixtures(work: Path, log: Callable[[str], None]) -> Fixtures:
    """Train the tiny pool, export tflite and onnx fragments at fp32 and int8, save the test images."""
    from converters.export import ExportConfig, export_fragments
    from edge_runtime.manifest import read_manifest
    from pool_builder.build import build_pool, config_for
    from pool_builder.data.datasets import load_dataset

    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        raise SetupError(f"Fashion-MNIST missing in {FMNIST_DIR}: `make dataset` installs dataset-fashion-mnist")
    pool, fragments = work / "pool", work / "fragments"
    settings = {**TINY_BUILD, **HALVED}
    build_pool(config_for("quick", out=str(pool), data_dir=str(FMNIST_DIR), **settings), log=log,
               show_progress=False)
    export_fragments(ExportConfig(pool=str(pool), out=str(fragments), formats=FORMATS, precisions=PRECISIONS,
                                  max_accuracy_drop=TINY_GATE), log=log)
    data = load_dataset("fashion_mnist", FMNIST_DIR).limited(settings["train_limit"], settings["test_limit"], seed=0)
    images = work / "images.npy"
    np.save(images, data.test.images)
    return Fixtures(fragments, images, tuple(sorted(read_manifest(fragments).tasks)))
