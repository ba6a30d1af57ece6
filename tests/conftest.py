"""Shared fixtures: a few hundred real Fashion-MNIST images and a tiny pool built from them once."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))

# Tiny but real: every stage of the method on 600 training images.
TINY_BUILD = dict(train_limit=600, test_limit=300, oracle_arch="wrn_10_1", oracle_epochs=6, student_arch="wrn_16_1",
                  library_epochs=8, expert_epochs=20, batch_size=32, threads=2, val_share=0.0)


def tiny_cli_args(skip: tuple[str, ...] = ()) -> list[str]:
    """The same tiny build as CLI flags (for subprocess tests), less the settings in ``skip``."""
    args = []
    for key, value in TINY_BUILD.items():
        if key not in skip:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args + ["--data-dir", str(FMNIST_DIR), "--no-progress"]


def run_cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where onnxruntime has the CUDAExecutionProvider (docs/devices.md#jetson)."""
    try:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="no CUDAExecutionProvider in this onnxruntime "
                                   "(GPU tests: pytest -m gpu on a Jetson)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _pin_threads():
    try:
        import torch
    except ImportError:  # a device running only the edge tests (a Jetson: pytest -m gpu) need not have torch
        yield
        return
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def fmnist_small():
    from pool_builder.data.datasets import load_dataset

    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST missing in {FMNIST_DIR}: `make test` installs dataset-fashion-mnist")
    return load_dataset("fashion_mnist", FMNIST_DIR).limited(600, 300, seed=0)


@pytest.fixture(scope="session")
def tiny_pool_dir(tmp_path_factory) -> Path:
    from pool_builder.build import build_pool, config_for

    out = tmp_path_factory.mktemp("pool") / "tiny"
    build_pool(config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), **TINY_BUILD),
               log=lambda m: print(m, file=sys.stderr), show_progress=False)
    return out


TRAINED_ORACLE = ("oracle.pt", "stages/oracle.json")


def with_stages_of(source: Path, out: Path, names: tuple[str, ...] = TRAINED_ORACLE) -> Path:
    """A new pool directory holding some finished files of another (e.g. its trained oracle), so that a test
    build computes only the stages it is about."""
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="session")
def ddp_pool_dir(tiny_pool_dir, tmp_path_factory) -> Path:
    """The tiny build again with its library distilled by 2 DDP ranks (spawned processes, 1 thread each);
    oracle and oracle-logit cache are the tiny pool's."""
    from pool_builder.build import build_pool, config_for

    out = with_stages_of(tiny_pool_dir, tmp_path_factory.mktemp("ddp") / "pool",
                         TRAINED_ORACLE + ("cache/oracle_logits.npy", "cache/oracle_logits.json"))
    build_pool(config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), library_workers=2, **TINY_BUILD),
               log=lambda m: print(m, file=sys.stderr), show_progress=False)
    return out


@pytest.fixture
def pool_copy(tiny_pool_dir, tmp_path) -> Path:
    """A private copy of the tiny pool that a test may damage."""
    dest = tmp_path / "pool"
    shutil.copytree(tiny_pool_dir, dest, ignore=shutil.ignore_patterns("cache"))
    return dest


# 300 held-out images: one image in the smallest pair query is ~1.1 points, so the tiny
# pool is gated more loosely than the demo pool (1 point on 5,000 images).
TINY_GATE = 5.0


@pytest.fixture(scope="session")
def tiny_fragments(tiny_pool_dir, tmp_path_factory):
    """The tiny pool exported to every format and precision: (fragment dir, Export result, JSON summary)."""
    import json

    from converters.export import ExportConfig, export_fragments

    out = tmp_path_factory.mktemp("frag") / "fragments"
    summary = out.parent / "summary.json"
    result = export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(out), max_accuracy_drop=TINY_GATE),
                              log=lambda m: print(m, file=sys.stderr), summary_path=str(summary))
    return out, result, json.loads(summary.read_text())


@contextmanager
def serving_in_thread(server):
    """Run a stdlib ``socketserver`` server (a fault-injecting HTTP server or proxy) in a thread for a test."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# Progressive experts (issue 9): the tiny pool's oracle, caches and library, experts as 2 stages each
# (each stage is one more onnx2tf conversion per expert in the export fixture: 2 keeps it short).
PROGRESSIVE_BUILD = dict(TINY_BUILD, expert_stages=2, stage_width=0.125)
TINY_LIBRARY = TRAINED_ORACLE + ("cache/oracle_logits.npy", "cache/oracle_logits.json", "library.pt",
                                 "stages/library.json", "cache/library_features.npy", "cache/library_features.json")


@pytest.fixture(scope="session")
def progressive_pool_dir(tiny_pool_dir, tmp_path_factory) -> Path:
    """The tiny pool with progressive experts (2 stages of width 0.125); only the experts are trained."""
    from pool_builder.build import build_pool, config_for

    out = with_stages_of(tiny_pool_dir, tmp_path_factory.mktemp("progressive") / "pool", TINY_LIBRARY)
    build_pool(config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), **PROGRESSIVE_BUILD),
               log=lambda m: print(m, file=sys.stderr), show_progress=False)
    return out


@pytest.fixture(scope="session")
def progressive_fragments(progressive_pool_dir, tmp_path_factory):
    """The progressive pool exported to TFLite and ONNX, fp32 and int8 (stage fragments, latencies measured)."""
    from converters.export import ExportConfig, export_fragments

    out = tmp_path_factory.mktemp("progressive_frag") / "fragments"
    result = export_fragments(ExportConfig(pool=str(progressive_pool_dir), out=str(out), precisions=("fp32", "int8"),
                                           max_accuracy_drop=TINY_GATE, check_tflite_runtime=False),
                              log=lambda m: print(m, file=sys.stderr))
    return out, result
