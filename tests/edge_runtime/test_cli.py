"""`edge-runtime run | info | bench` as a user calls them, in subprocesses."""

import json
import os
import shutil
import subprocess
import sys
import venv

import numpy as np
import pytest

from edge_runtime.manifest import MANIFEST_NAME

from ..conftest import ROOT, run_cli_env

HEAVY = ("torch", "tensorflow", "pool_builder", "converters", "onnx2tf")


def _cli(*args, python=sys.executable, env=None):
    return subprocess.run([python, "-m", "edge_runtime", *map(str, args)], capture_output=True, text=True,
                          env=env or run_cli_env(), cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def images_npy(tiny_pool_dir, tmp_path_factory):
    from pool_builder.pool.evaluate import held_out_split
    from pool_builder.pool.loader import Pool

    split = held_out_split(Pool.open(tiny_pool_dir))
    path = tmp_path_factory.mktemp("inputs") / "images.npy"
    np.save(path, split.images[:6])
    return path, split.labels[:6]


def test_run_prints_labels_and_json(tiny_fragments, images_npy):
    bundle, (npy, labels) = tiny_fragments[0], images_npy
    text = _cli("run", "--bundle", bundle, "--tasks", "tops,footwear,bottoms,bags", npy)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith(f"{npy}[0]: ")
    out = _cli("run", "--bundle", bundle, "--tasks", "tops,footwear,bottoms,bags", "--json", "--precision", "fp32",
               "--backend", "onnxruntime", npy)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["loaded"]["backend"] == "onnxruntime" and result["loaded"]["classes"] == list(range(10))
    rows = result["predictions"]
    assert [r["input"] for r in rows] == [f"{npy}[{i}]" for i in range(6)]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    assert np.mean([r["class_id"] for r in rows] == labels) >= 0.5  # a trained model, not noise


def test_info_reports_each_fragment_and_interpreter(tiny_fragments, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_fragments[0], bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    damaged = next(f for f in manifest["fragments"] if f["id"] == "expert.bags.onnx.int8")
    (bundle / damaged["file"]).write_bytes(b"x")
    out = _cli("info", "--bundle", bundle, "--json")
    assert out.returncode == 2, out.stderr  # still reported in full, but a damaged bundle never passes (issue 19)
    info = json.loads(out.stdout)
    assert info["ok"] is False and "expert.bags.onnx.int8 checksum mismatch" in info["error"]
    statuses = {f["id"]: f["status"] for v in info["variants"] for f in v["fragments"]}
    assert statuses.pop("expert.bags.onnx.int8") == "checksum mismatch"
    assert set(statuses.values()) == {"ok"} and len(statuses) == 29  # 6 variants x 5 fragments, less the damaged one
    assert info["interpreters"] == {"ai_edge_litert": "usable", "tflite_runtime": "usable", "onnxruntime": "usable"}
    text = _cli("info", "--bundle", bundle)
    assert "expert.bags.onnx.int8 checksum mismatch" in text.stdout and "task footwear: Sandal, Sneaker" in text.stdout
    assert text.returncode == 2 and text.stderr.count("\n") == 1 and "1 fragment(s) fail their checks" in text.stderr


def test_bench_writes_a_record_other_boards_can_be_gathered_with(tiny_fragments, tmp_path):
    record_path = tmp_path / "bench.json"
    out = _cli("bench", "--bundle", tiny_fragments[0], "--tasks", "footwear,tops", "--threads", "1,2",
               "--iterations", "30", "--warmup", "3", "--out", record_path)
    assert out.returncode == 0, out.stderr
    record = json.loads(record_path.read_text())
    assert record["schema"] == "edge-runtime-bench/1" and record["machine"]["backend"] == "ai_edge_litert"
    assert [r["threads"] for r in record["results"]] == [1, 2]
    for result in record["results"]:
        assert set(result["fragments_ms"]) == {"library.tflite.int8", "expert.footwear.tflite.int8",
                                               "expert.tops.tflite.int8"}
        assert 0 < result["fragments_ms"]["library.tflite.int8"]["p50"] <= result["total_ms"]["p50"]
        assert result["total_ms"]["p50"] <= result["total_ms"]["p90"] <= result["total_ms"]["p99"]
    assert record["peak_rss_bytes"] > 10 * 2**20 and record["loaded"]["bytes"] > 0
    assert "p50 ms" in out.stdout and "peak RSS" in out.stdout
    # Records from several boards gather into one table; anything else is refused in one line.
    (tmp_path / "other.json").write_text(json.dumps({"results": []}))
    boards = [sys.executable, str(ROOT / "benchmarks" / "edge_boards.py")]
    table = subprocess.run(boards + [str(record_path), str(record_path)], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    body = [line for line in table.stdout.splitlines() if line.startswith("| ") and "board" not in line]
    assert len(body) == 4 and all("tflite int8" in line for line in body)
    bad = subprocess.run(boards + [str(tmp_path / "other.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not an edge-runtime bench record" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "--tasks", "tops,hats", "{npy}"], "unknown task 'hats'; valid: bags, bottoms, footwear, tops"),
    (["run", "--tasks", "tops", "{bundle}/manifest.json"], "unknown file type .json"),
    (["run", "--tasks", "tops", "--layout", "NCHW", "{npy}"], "read as NCHW"),
    (["bench", "--tasks", "tops", "--threads", "0"], "threads must be positive"),
    (["run", "--tasks", "tops", "--backend", "onnxruntime", "--provider", "cuda", "{npy}"],
     "onnxruntime provider CUDAExecutionProvider is not available here; available:"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_fragments, images_npy, args, message):
    bundle = tiny_fragments[0]
    filled = [a.format(npy=images_npy[0], bundle=bundle) for a in args]
    out = _cli(filled[0], "--bundle", bundle, *filled[1:])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("edge-runtime: error: ") and message in out.stderr


def test_missing_bundle_is_one_line(tmp_path):
    out = _cli("info", "--bundle", tmp_path)
    assert out.returncode == 2 and "not a fragment directory" in out.stderr and "Traceback" not in out.stderr
    debug = _cli("--debug", "info", "--bundle", tmp_path)
    assert "Traceback" in debug.stderr


def test_a_whole_prediction_imports_nothing_heavy(tiny_fragments, images_npy):
    code = (f"import sys; from edge_runtime import Runtime; import edge_runtime.cli, edge_runtime.bench\n"
            f"for b, p in [('ai_edge_litert', 'int8'), ('tflite_runtime', 'int8'), ('onnxruntime', 'fp32')]:\n"
            f"    Runtime.open({str(tiny_fragments[0])!r}, 'tops,bags', backend=b, precision=p)"
            f".predict([{str(images_npy[0])!r}])\n"
            f"print(','.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_cli_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    heavy = {m for m in out.stdout.strip().split(",") if m.split(".")[0] in HEAVY}
    assert not heavy


def test_edge_extra_alone_runs_the_bundle(tiny_fragments, images_npy, tmp_path):
    """A fresh venv with only `pip install .[edge]`: no torch, no tensorflow, and `run` / `bench` work."""
    env_dir = tmp_path / "edge-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # pip builds in the source tree: give it a copy, not the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "edge_runtime", "pool_builder", "converters"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (ROOT / name).is_dir() else {}))
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{source}[edge]"], capture_output=True,
                             text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env)
    packages = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not packages & {"torch", "tensorflow", "tf-keras", "onnx", "onnxruntime", "tflite-runtime"}
    assert {"numpy", "ai-edge-litert", "cryptography"} <= packages  # cryptography: signed manifests (fetch)
    bundle, (npy, _) = tiny_fragments[0], images_npy
    cli = env_dir / "bin" / "edge-runtime"
    run = subprocess.run([cli, "run", "--bundle", bundle, "--tasks", "footwear,tops", "--json", npy],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["predictions"]) == 6
    bench = subprocess.run([cli, "bench", "--bundle", bundle, "--tasks", "footwear,tops", "--threads", "1",
                            "--iterations", "20", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    record = json.loads(bench.stdout)
    assert record["peak_rss_bytes"] < 200 * 2**20  # numpy + one interpreter, nothing heavier
    size = sum(f.stat().st_size for f in env_dir.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"edge-only venv: {size / 2**20:.0f} MiB on disk; bench peak RSS "
          f"{record['peak_rss_bytes'] / 2**20:.1f} MiB; numpy {record['machine']['numpy']}; "
          f"{record['machine']['backend']} {record['machine']['backend_version']}")
    onnx_run = subprocess.run([cli, "run", "--bundle", bundle, "--tasks", "tops", "--backend", "onnxruntime", npy],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
    assert onnx_run.returncode == 2 and "onnxruntime is not installed (pip install onnxruntime)" in onnx_run.stderr
