"""Long-running use: `edge-runtime stream`, warm-up, one Runtime shared by threads; and bad inputs of every kind
(generated here) giving one line and exit 2."""

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.images import InputError, load_inputs

from ..conftest import ROOT, run_cli_env

QUERY = "footwear,tops"


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "edge_runtime", *map(str, args)], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT, timeout=300, input=stdin)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Real-looking inputs: .npy files of 1 and 2 images, a PNG, a 0-byte .npy."""
    from PIL import Image

    out = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 28, 28, 1), dtype=np.uint8)
    np.save(out / "one.npy", images[0])
    np.save(out / "two.npy", images[1:3])
    Image.fromarray(images[3][:, :, 0]).save(out / "three.png")
    (out / "empty.npy").write_bytes(b"")
    return out, images


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_bombs_and_odd_paths_are_refused_before_decoding(tiny_fragments, frames, tmp_path):
    from edge_runtime.manifest import read_manifest

    pre = read_manifest(tiny_fragments[0]).preprocessing
    huge, large = _png_claiming(tmp_path / "huge.png", 20000, 10000), _png_claiming(tmp_path / "large.png", 12000,
                                                                                    8000)
    with pytest.raises(InputError, match="decompression bomb"):
        load_inputs([huge], pre, resize=True)
    with pytest.raises(InputError, match="12000x8000 pixels \\(96 megapixels\\), more than the 40"):
        load_inputs([large], pre, resize=True)  # the header says so: no pixel is decoded (the file has none)
    with pytest.raises(InputError, match="12000x8000 pixels, the model takes 28x28"):
        load_inputs([large], pre)
    with pytest.raises(InputError, match="empty.npy is not a plain numpy array file \\(EOFError"):
        load_inputs([frames[0] / "empty.npy"], pre)
    with pytest.raises(InputError, match="is a directory"):
        load_inputs([frames[0]], pre)
    with pytest.raises(InputError, match="standard input is not read by `run`"):
        load_inputs(["-"], pre)


@pytest.mark.parametrize("args,message", [
    (["--top", "0"], "--top must be at least 1"),
    (["--top", "-3"], "--top must be at least 1"),
    (["--stages", "2"], "--stages 2: the experts of this query have at most 1 stage(s) in this bundle"),
    (["{frames}/empty.npy"], "not a plain numpy array file"),
    (["{frames}"], "is a directory"),
    (["-"], "standard input is not read by `run`"),
])
def test_bad_run_arguments_are_one_line_and_json_under_json(tiny_fragments, frames, args, message):
    filled = [a.format(frames=frames[0]) for a in args]
    inputs = [] if any(a.startswith(str(frames[0])) or a == "-" for a in filled) else [frames[0] / "one.npy"]
    out = _cli("run", "--bundle", tiny_fragments[0], "--tasks", QUERY, "--json", *filled, *inputs)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert message in json.loads(out.stdout)["error"]


def test_closed_pipe_ends_quietly(tiny_fragments, tmp_path):
    many = tmp_path / "many.npy"
    np.save(many, np.random.default_rng(1).integers(0, 255, (3000, 28, 28, 1), dtype=np.uint8))
    script = (f"{sys.executable} -m edge_runtime run --bundle {tiny_fragments[0]} --tasks {QUERY} {many} "
              f"2>{tmp_path / 'err'} | head -1; echo \"${{PIPESTATUS[0]}}\"")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=run_cli_env(), cwd=ROOT)
    first, status = out.stdout.splitlines()
    assert first.startswith(f"{many}[0]: ") and status == "141"
    assert (tmp_path / "err").read_text() == ""  # no traceback, no "Broken pipe"


def test_stream_answers_paths_from_stdin_one_json_line_per_image(tiny_fragments, frames):
    folder, images = frames
    paths = [folder / "one.npy", folder / "two.npy", folder / "three.png", folder / "empty.npy", folder / "nope.npy"]
    out = _cli("stream", "--bundle", tiny_fragments[0], "--tasks", QUERY, "-",
               stdin="\n".join(map(str, paths)) + "\n\n")
    assert out.returncode == 2  # some images failed: reported inline, the stream went on
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["input"] for r in rows] == [str(paths[0]), f"{paths[1]}[0]", f"{paths[1]}[1]", str(paths[2]),
                                          str(paths[3]), str(paths[4])]
    expected = Runtime.open(tiny_fragments[0], QUERY).predict(images)
    assert [r["label"] for r in rows[:4]] == list(expected.labels)
    assert all(r["ms"] > 0 for r in rows[:4]) and "EOFError" in rows[4]["error"] and "not found" in rows[5]["error"]
    assert "stream: 6 image(s), 2 failed" in out.stderr


def test_stream_takes_a_directory_or_a_glob(tiny_fragments, frames):
    folder = frames[0]
    for source in (folder, f"{folder}/*.png"):
        out = _cli("stream", "--bundle", tiny_fragments[0], "--tasks", QUERY, "--once", "--top", "2", source)
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        inputs = {r["input"] for r in rows}
        assert str(folder / "three.png") in inputs and all(len(r.get("probabilities", {})) == 2 for r in rows
                                                           if "error" not in r)
        assert (len(rows) == 1) == (source != folder)
    bad = _cli("stream", "--bundle", tiny_fragments[0], "--tasks", QUERY, folder / "nope")
    assert bad.returncode == 2 and "neither '-' (paths on stdin), a directory nor a glob" in bad.stderr
    assert "error" in json.loads(bad.stdout)


def test_stream_watches_a_directory_as_files_arrive_and_stops_on_sigterm(tiny_fragments, frames, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "stream", "--bundle", str(tiny_fragments[0]),
                             "--tasks", QUERY, "--poll", "0.05", str(inbox)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=run_cli_env(), cwd=ROOT)
    try:
        for k in range(2):
            partial = inbox / f".frame{k}.npy.tmp"  # written under a hidden name, then renamed: never half-read
            with open(partial, "wb") as handle:
                np.save(handle, frames[1][k])
            os.replace(partial, inbox / f"frame{k}.npy")
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no answer within 120 s"
            row = json.loads(proc.stdout.readline())
            assert row["input"] == str(inbox / f"frame{k}.npy") and "label" in row
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stream: 2 image(s), 0 failed" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_one_runtime_shared_by_threads_and_per_thread_clones_agree(tiny_fragments):
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 255, (n, 28, 28, 1), dtype=np.uint8) for n in (1, 3, 5, 2) * 3]
    rt = Runtime.open(tiny_fragments[0], QUERY, warmup=True)  # TFLite: invoking from 2 threads at once breaks
    expected = [rt.predict(b).logits for b in batches]
    for make in (lambda: rt, rt.clone):
        errors, results = [], {}

        def work(worker):
            mine = make()
            try:
                for _ in range(5):
                    for i, b in enumerate(batches):
                        results[(worker, i)] = mine.predict(b).logits
            except Exception as exc:  # noqa: BLE001 - any failure in a thread must fail the test
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(np.array_equal(results[(w, i)], expected[i]) for w in range(4) for i in range(len(batches)))
