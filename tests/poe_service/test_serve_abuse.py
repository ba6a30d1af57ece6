"""The tester's attacks on `poe-service serve` (a real process, real sockets): head size and header count
(431), half-sent requests (408), concurrency (503), hostile fragment directories and keys; fused models from
the verified copy, signed; expired manifests refused by `edge-runtime fetch`, never by `run`/`verify`."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.manifest import read_manifest
from edge_runtime.signing import load_public_key

from .serving import QUERY, _run, fetch_cli, fetch_json, make_keys, proxy_to, running


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    """Two key pairs made by `poe-service keygen`: the server's and a stranger's."""
    return make_keys(tmp_path_factory.mktemp("keys"))


STRICT = ("--request-timeout", "1", "--max-concurrency", "3", "--max-header-bytes", "4096", "--max-headers", "20",
          "--manifest-ttl", "3")


@pytest.fixture(scope="module")
def strict(tiny_fragments, keys, tmp_path_factory):
    """A server with tight limits on its own copy of the fragments (a test flips a file in it)."""
    work = tmp_path_factory.mktemp("strict")
    fragments = shutil.copytree(tiny_fragments[0], work / "fragments")
    with running(fragments, work, keys[0], extra=STRICT) as srv:
        srv.fragments = fragments
        yield srv


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes (as much as the server takes before it closes) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything: the point of the limit
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def test_a_huge_header_is_refused_with_431_without_growing_the_server(strict):
    before = _rss_kib(strict.proc.pid)
    answer = _raw(strict.port, b"GET /v1/pool HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"exceed 4096 bytes" in answer and answer.split(b"\r\n\r\n", 1)[1].startswith(b'{"error"')
    assert _rss_kib(strict.proc.pid) - before < 8 * 1024  # nothing near 16 MB was buffered
    many = b"".join(b"X-%d: v\r\n" % i for i in range(30))
    answer = _raw(strict.port, b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"more than 20 header fields" in answer
    assert strict.request("GET", "/v1/pool")[0] == 200  # and it still serves everyone else


def test_a_half_sent_request_is_timed_out_with_408(strict):
    start = time.monotonic()
    for partial in (b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n",  # head never finished
                    b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ta"):  # body never finished
        with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
            sock.sendall(partial)
            answer = sock.recv(65536)
            assert sock.recv(65536) == b""  # and the connection is closed
        if partial.startswith(b"GET"):
            assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 1 s" in answer, answer
    assert time.monotonic() - start < 8


def test_connections_beyond_the_concurrency_limit_get_503(strict):
    idle = [socket.create_connection(("127.0.0.1", strict.port), timeout=10) for _ in range(3)]
    try:
        status, _, _ = strict.request("GET", "/v1/pool")
        assert status == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert strict.request("GET", "/v1/pool")[0] == 200


# --------------------------------------------------------------------------- what is served, and signed

def test_fused_model_comes_from_the_verified_copy_and_is_signed(strict, keys):
    from edge_runtime.signing import verify_signed_bytes

    frag = read_manifest(strict.fragments).fragment("expert", "onnx", "fp32", "bags")
    path = strict.fragments / frag.file
    path.write_bytes(bytes([path.read_bytes()[0] ^ 1]) + path.read_bytes()[1:])  # flipped on disk after start
    status, headers, model = strict.request("POST", "/v1/fused", json.dumps({"tasks": ["bags", "tops"]}).encode())
    assert status == 200, model
    payload = verify_signed_bytes(model, headers, load_public_key(f"{keys[0]}.pub"))
    assert payload["tasks"] == ["bags", "tops"] and payload["class_ids"] == [0, 2, 4, 6, 8]
    with pytest.raises(Exception, match="do not match the sha256"):
        verify_signed_bytes(model[:-1] + bytes([model[-1] ^ 1]), headers, load_public_key(f"{keys[0]}.pub"))


def test_symlinked_fragments_and_the_key_are_never_served(tiny_fragments, keys, tmp_path):
    bad = shutil.copytree(tiny_fragments[0], tmp_path / "frag")
    target = bad / read_manifest(bad).fragment("expert", "onnx", "int8", "bags").file
    target.unlink()
    target.symlink_to(keys[0])  # a fragment that is the private key
    done = _run("poe_service", "serve", "--fragments", bad, "--port", "0", "--key", keys[0],
                "--version-file", tmp_path / "v.json")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "outside the fragment directory" in done.stderr and "expert.bags.onnx.int8" in done.stderr


def test_a_private_key_others_can_read_is_refused(tiny_fragments, keys, tmp_path):
    loose = tmp_path / "loose"
    shutil.copy(keys[0], loose)
    loose.chmod(0o644)
    done = _run("poe_service", "serve", "--fragments", tiny_fragments[0], "--port", "0", "--key", loose)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{loose} is readable by others (mode 0644)" in done.stderr and f"chmod 600 {loose}" in done.stderr


# --------------------------------------------------------------------------- expiry, trust, bundles grown over time


def test_expired_manifests_are_refused_by_fetch_but_a_bundle_keeps_running(strict, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"
    captured = json.loads(strict.request("POST", "/v1/query", json.dumps({**QUERY, "tasks": ["tops"]}).encode())[2])
    assert captured["payload"]["expires"].endswith("Z")
    report = fetch_json(strict.url, bundle, "tops", pub)
    assert report["expires"] >= captured["payload"]["expires"]  # ISO-8601 UTC strings sort by time
    assert stat.S_IMODE((bundle / "trusted_key.pub").stat().st_mode) == 0o644
    time.sleep(4.2)  # --manifest-ttl 3, rounded up to the second: the captured answer and the bundle's have expired
    with proxy_to(strict) as replay:
        replay.edit_answer = lambda _: captured
        done = fetch_cli(replay.url, tmp_path / "fresh", "tops", "--public-key", pub)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "expired at" in done.stderr and "--allow-expired" in done.stderr
        assert fetch_cli(replay.url, tmp_path / "fresh", "tops", "--public-key", pub,
                         "--allow-expired").returncode == 0
    ok = _run("edge_runtime", "verify", bundle)  # the pinned key: no --public-key needed; expiry is not checked
    assert ok.returncode == 0 and "signature verified" in ok.stdout, ok.stderr
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((1, 28, 28, 1), np.uint8))
    assert _run("edge_runtime", "run", "--bundle", bundle, "--tasks", "tops", images).returncode == 0
