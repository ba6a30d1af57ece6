"""`poe-service serve` as a real process on an ephemeral loopback port, driven by the real `edge-runtime fetch`.

A small stdlib proxy between the two plays the hostile network: it cuts transfers
and goes away, tampers with manifests and fragments, and replays old answers.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.manifest import MANIFEST_NAME, read_manifest
from edge_runtime.signing import load_public_key, verify_document

from ..conftest import ROOT, run_cli_env, serving_in_thread

QUERY = {"tasks": ["footwear", "tops"], "format": "tflite", "precision": "int8"}


# --------------------------------------------------------------------------- processes

def _run(module: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT, timeout=timeout)


def fetch_cli(url: str, bundle: Path, tasks: str, *extra) -> subprocess.CompletedProcess:
    return _run("edge_runtime", "fetch", "--server", url, "--tasks", tasks, "--bundle", bundle, *extra)


def fetch_json(url: str, bundle: Path, tasks: str, key: Path, *extra) -> dict:
    done = fetch_cli(url, bundle, tasks, "--public-key", key, "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Server:
    """`poe-service serve --port 0 --port-file F` in a subprocess; stopped by its own pid."""

    def __init__(self, fragments: Path, work: Path, key: Path | None, version_file: Path | None = None,
                 extra: tuple = ()) -> None:
        work.mkdir(parents=True, exist_ok=True)
        port_file, self.log = work / "port", work / "server.log"
        args = ["serve", "--fragments", fragments, "--port", "0", "--port-file", port_file,
                "--cache-dir", work / "cache", *extra]
        args += ["--key", key] if key else []
        args += ["--version-file", version_file] if version_file else []
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "poe_service", *map(str, args)], stdout=log,
                                         stderr=subprocess.STDOUT, env=run_cli_env(), cwd=ROOT)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def version(self) -> int:
        return json.loads(self.request("GET", "/v1/pool")[2])["version"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def running(*args, **kwargs):
    server = Server(*args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    """Two key pairs made by `poe-service keygen`: the server's and a stranger's."""
    root = tmp_path_factory.mktemp("keys")
    for name in ("server", "other"):
        done = _run("poe_service", "keygen", "--out", root / name)
        assert done.returncode == 0, done.stderr
    return root / "server", root / "other"


@pytest.fixture(scope="module")
def server(tiny_fragments, keys, tmp_path_factory):
    with running(tiny_fragments[0], tmp_path_factory.mktemp("server"), keys[0]) as srv:
        yield srv


# --------------------------------------------------------------------------- a hostile network in between

class Proxy(ThreadingHTTPServer):
    """Forwards to ``upstream``; ``edit_answer(doc)`` rewrites /v1/query answers, ``edit_blob(bytes)`` fragments,
    ``cut_blobs`` fragment answers stop halfway (and ``then`` runs, e.g. to shut the proxy down)."""

    daemon_threads = True

    def __init__(self, upstream: Server) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.edit_answer, self.edit_blob, self.cut_blobs = upstream, None, None, 0
        self.ranges: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self, method: str) -> None:
        proxy: Proxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method == "POST" else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "range")}
        if "Range" in headers:
            proxy.ranges.append(headers["Range"])
        status, got_headers, data = proxy.upstream.request(method, self.path, body, headers)
        if self.path == "/v1/query" and proxy.edit_answer and status == 200:
            data = json.dumps(proxy.edit_answer(json.loads(data))).encode()
        blob = self.path.startswith("/v1/fragments/")
        if blob and proxy.edit_blob:
            data = proxy.edit_blob(data)
        self.send_response(status)
        for name in ("content-type", "content-range", "etag"):
            if name in got_headers:
                self.send_header(name, got_headers[name])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if blob and proxy.cut_blobs > 0:
            proxy.cut_blobs -= 1
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")


def proxy_to(upstream: Server):
    return serving_in_thread(Proxy(upstream))


def _complete_files(bundle: Path) -> list[str]:
    """What a device could mistake for finished: everything except *.partial and hidden temporaries."""
    if not bundle.exists():
        return []
    return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")
                  if p.is_file() and not p.name.endswith(".partial") and not p.name.startswith("."))


# --------------------------------------------------------------------------- tests

def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    private, _ = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in Path(f"{private}.pub").read_bytes()
    again = _run("poe_service", "keygen", "--out", private)
    assert again.returncode == 2 and "refusing to replace a signing key" in again.stderr


def test_catalog_openapi_and_a_signed_query(server, keys, tiny_fragments):
    manifest = read_manifest(tiny_fragments[0])
    status, _, body = server.request("GET", "/v1/pool")
    catalog = json.loads(body)
    assert status == 200 and catalog["pool_id"] == manifest.pool_id and catalog["signed"]
    assert set(catalog["tasks"]) == set(manifest.tasks) and catalog["formats"] == ["onnx", "tflite"]
    experts = [f for v in catalog["variants"] for f in v["fragments"] if f["role"] == "expert"]
    assert all(f["bytes"] > 0 and 0 <= f["accuracy"] <= 1 for f in experts)
    paths = json.loads(server.request("GET", "/openapi.json")[2])["paths"]
    assert {"/v1/pool", "/v1/query", "/v1/fused", "/v1/fragments/{sha256}"} <= set(paths)

    status, headers, body = server.request("POST", "/v1/query", json.dumps(QUERY).encode(),
                                           {"Content-Type": "application/json"})
    assert status == 200, body
    payload = verify_document(json.loads(body), load_public_key(f"{keys[0]}.pub"))
    assert payload["version"] == catalog["version"] >= 1
    assert sorted(f["id"] for f in payload["fragments"]) == [
        "expert.footwear.tflite.int8", "expert.tops.tflite.int8", "library.tflite.int8"]


def test_second_query_downloads_only_the_added_expert_and_the_bundle_runs(server, keys, tmp_path):
    bundle, pub = tmp_path / "device", Path(f"{keys[0]}.pub")
    first = fetch_json(server.url, bundle, "footwear", pub)
    assert sorted(f["id"] for f in first["fetched"]) == ["expert.footwear.tflite.int8", "library.tflite.int8"]
    assert first["reused"] == [] and first["signed"]
    second = fetch_json(server.url, bundle, "footwear,tops", pub)
    assert [f["id"] for f in second["fetched"]] == ["expert.tops.tflite.int8"]
    assert second["reused_bytes"] == first["fetched_bytes"] > 0
    assert second["fetched_bytes"] == second["fetched"][0]["bytes"]
    assert fetch_json(server.url, bundle, "footwear,tops", pub)["fetched"] == []  # third time: nothing to fetch
    blobs = sorted(p.name for p in (bundle / "blobs").iterdir())
    assert blobs == sorted(f["sha256"] for f in first["fetched"] + second["fetched"])
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 255, (3, 28, 28, 1), dtype=np.uint8))
    done = _run("edge_runtime", "run", "--bundle", bundle, "--tasks", "footwear,tops", images, "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 3


def test_fragments_are_content_addressed_with_etag_and_range(server, tiny_fragments):
    frag = read_manifest(tiny_fragments[0]).fragment("library", "onnx", "fp32")
    data = (tiny_fragments[0] / frag.file).read_bytes()
    path = f"/v1/fragments/{frag.sha256}"
    status, headers, body = server.request("GET", path)
    assert (status, body, headers["etag"]) == (200, data, f'"{frag.sha256}"')
    assert server.request("GET", path, headers={"If-None-Match": f'"{frag.sha256}"'})[0] == 304
    status, headers, body = server.request("GET", path, headers={"Range": "bytes=10-19"})
    assert (status, body, headers["content-range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    assert server.request("GET", path, headers={"Range": "bytes=-5"})[2] == data[-5:]
    status, headers, body = server.request("GET", path, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}" and "error" in json.loads(body)
    status, headers, body = server.request("HEAD", path)
    assert status == 200 and int(headers["content-length"]) == len(data) and body == b""
    for bad, code in ((frag.sha256.upper(), 400), ("0" * 64, 404), ("..%2F..%2Fmanifest.json", 404),
                      ("../../manifest.json", 404), ("%2e%2e%2fmanifest.json", 404), ("..", 400),
                      (frag.file.replace("/", "%2F"), 404)):
        status, headers, body = server.request("GET", f"/v1/fragments/{bad}")
        assert status == code and headers["content-type"] == "application/json", (bad, body)
        assert json.loads(body)["error"]


@pytest.mark.parametrize("body, code, message", [
    (b"", 400, "empty request body"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1]", 400, "must be a JSON object"),
    (json.dumps({"tasks": ["nosuch"]}).encode(), 400, "unknown task 'nosuch'"),
    (json.dumps({"tasks": ["../etc"]}).encode(), 400, "invalid task name"),
    (json.dumps({"tasks": []}).encode(), 400, "no tasks given"),
    (json.dumps({"tasks": ["tops", "tops"]}).encode(), 400, "duplicate task 'tops'"),
    (json.dumps({"tasks": [3]}).encode(), 400, "task names must be strings"),
    (json.dumps({"format": "tflite"}).encode(), 400, "'tasks' is missing"),
    (json.dumps({"tasks": ["tops"], "format": "tflite", "precision": "int4"}).encode(), 400, "unknown precision"),
    (json.dumps({"tasks": ["tops"], "colour": 1}).encode(), 400, "unknown field"),
    (json.dumps({"tasks": ["tops"] * 5000}).encode(), 413, "larger than the limit"),
    (b"[" * 8000 + b"]" * 8000, 400, "nested too deeply"),
    (b'{"tasks": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (b'{"tasks": NaN}', 400, "NaN is not a valid JSON number"),
    (b'{"tasks": ["tops"], "format": 1e999}', 400, "out of range"),
])
def test_bad_requests_get_a_4xx_json_body(server, body, code, message):
    for endpoint in ("/v1/query", "/v1/fused"):
        status, headers, answer = server.request("POST", endpoint, body, {"Content-Type": "application/json"})
        error = json.loads(answer)
        assert status == code and headers["content-type"] == "application/json", answer
        assert message in error["error"] and isinstance(error["valid"], list)
        if "unknown task" in message:
            assert error["valid"] == ["bags", "bottoms", "footwear", "tops"]
    assert "Traceback" not in server.log.read_text()


def test_unknown_task_from_the_device_is_one_line_exit_2(server, keys, tmp_path):
    done = fetch_cli(server.url, tmp_path / "b", "tops,nosuch", "--public-key", f"{keys[0]}.pub")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "HTTP 400: unknown task 'nosuch' (valid: bags, bottoms, footwear, tops)" in done.stderr
    assert _complete_files(tmp_path / "b") == []


def test_fused_model_is_built_once_per_query_and_runs(server):
    import onnxruntime as ort

    request = json.dumps({"tasks": ["tops", "footwear"]}).encode()
    status, headers, model = server.request("POST", "/v1/fused", request)
    assert status == 200 and headers["x-class-ids"] == "0,2,4,5,6,7,9"
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert out.shape == (2, 7)
    cached = list((server.log.parent / "cache" / "fused").glob("*.onnx"))
    assert len(cached) == 1
    again = server.request("POST", "/v1/fused", request)
    assert again[2] == model and list((server.log.parent / "cache" / "fused").glob("*.onnx")) == cached
    assert server.request("POST", "/v1/fused", json.dumps({"tasks": ["tops"], "precision": "fp16"}).encode())[0] == 400


def test_wrong_key_or_unsigned_manifests_are_refused_unless_insecure(server, keys, tiny_fragments, tmp_path):
    bundle = tmp_path / "device"
    done = fetch_cli(server.url, bundle, "tops", "--public-key", f"{keys[1]}.pub")
    assert done.returncode == 2 and "signed by key" in done.stderr and _complete_files(bundle) == []
    with running(tiny_fragments[0], tmp_path / "unsigned", key=None) as unsigned:
        done = fetch_cli(unsigned.url, bundle, "tops", "--public-key", f"{keys[0]}.pub")
        assert done.returncode == 2 and "unsigned" in done.stderr and _complete_files(bundle) == []
        done = fetch_cli(unsigned.url, bundle, "tops", "--insecure")
        assert done.returncode == 0 and "--insecure" in done.stderr and "UNSIGNED" in done.stdout


def test_tampered_manifest_or_fragment_is_refused_and_nothing_becomes_visible(server, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"

    def more_classes(doc):
        doc["payload"]["fragments"][0]["bytes"] += 1
        return doc

    with proxy_to(server) as proxy:
        proxy.edit_answer = more_classes
        done = fetch_cli(proxy.url, bundle, "tops", "--public-key", pub)
        assert done.returncode == 2 and "signature does not verify" in done.stderr
        assert _complete_files(bundle) == []
        proxy.edit_answer, proxy.edit_blob = None, lambda data: data[:-1] + bytes([data[-1] ^ 1])
        done = fetch_cli(proxy.url, bundle, "tops", "--public-key", pub)
        assert done.returncode == 2 and "sha256 does not match the signed manifest" in done.stderr
        assert _complete_files(bundle) == [] and not list((bundle / "blobs").glob("*.partial"))


def test_server_gone_mid_transfer_then_the_download_resumes_with_range(server, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"
    with proxy_to(server) as proxy:
        proxy.cut_blobs = 1
        done = fetch_cli(proxy.url, bundle, "tops", "--public-key", pub, "--retries", "0")
    assert done.returncode == 2 and "cut off" in done.stderr and "the next fetch resumes" in done.stderr
    partials = list((bundle / "blobs").glob("*.partial"))
    assert len(partials) == 1 and _complete_files(bundle) == []  # half a file, never under its final name
    cut_at = partials[0].stat().st_size
    assert cut_at > 0
    with proxy_to(server) as proxy:  # the server is back (on another port)
        report = fetch_json(proxy.url, bundle, "tops", pub)
    assert proxy.ranges == [f"bytes={cut_at}-"]
    resumed = [f for f in report["fetched"] if f["resumed_from"]]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] == cut_at
    assert resumed[0]["downloaded"] == resumed[0]["bytes"] - cut_at
    assert not list((bundle / "blobs").glob("*.partial"))


def _reexported(src: Path, dest: Path, change_library: bool) -> Path:
    """A copy of the fragments as a new export would give: a new tool note, or (``change_library``) a different
    tflite int8 library with its experts re-linked to it."""
    shutil.copytree(src, dest)
    raw = json.loads((dest / MANIFEST_NAME).read_text())
    raw["tools"]["note"] = dest.name
    if change_library:
        lib = next(f for f in raw["fragments"] if f["id"] == "library.tflite.int8")
        path = dest / lib["file"]
        path.write_bytes(path.read_bytes() + b"\0" * 16)
        old, lib["sha256"], lib["bytes"] = lib["sha256"], hashlib.sha256(path.read_bytes()).hexdigest(), \
            path.stat().st_size
        for f in raw["fragments"]:
            if f.get("library_sha256") == old:
                f["library_sha256"] = lib["sha256"]
    (dest / MANIFEST_NAME).write_text(json.dumps(raw))
    return dest


def test_versions_only_increase_and_rollback_and_mix_and_match_are_refused(tiny_fragments, keys, tmp_path):
    key, pub, bundle, versions = keys[0], f"{keys[0]}.pub", tmp_path / "device", tmp_path / "versions.json"
    with running(tiny_fragments[0], tmp_path / "a", key, versions) as a:
        v1 = a.version()
        old_answer = json.loads(a.request("POST", "/v1/query", json.dumps(QUERY).encode())[2])
    with running(tiny_fragments[0], tmp_path / "a2", key, versions) as again:
        assert again.version() == v1  # a restart with the same fragments keeps the version
    newer = _reexported(tiny_fragments[0], tmp_path / "frag-v2", change_library=False)
    with running(newer, tmp_path / "b", key, versions) as b:
        assert b.version() == v1 + 1
        assert fetch_json(b.url, bundle, "footwear,tops", pub)["version"] == v1 + 1
        with proxy_to(b) as replay:  # an attacker replays the older, correctly signed answer
            replay.edit_answer = lambda _: old_answer
            done = fetch_cli(replay.url, bundle, "footwear,tops", "--public-key", pub)
        assert done.returncode == 2, done.stderr
        assert f"rollback refused: the server offers manifest version {v1}, older than version {v1 + 1}" \
            in done.stderr
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p.name != ".fetch.lock"}
    other = _reexported(tiny_fragments[0], tmp_path / "frag-v3", change_library=True)
    with running(other, tmp_path / "c", key, versions) as c:
        assert c.version() == v1 + 2
        done = fetch_cli(c.url, bundle, "footwear,tops,bags", "--public-key", pub)
    assert done.returncode == 2 and "mix and match refused" in done.stderr and "library" in done.stderr
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p.name != ".fetch.lock"} == before


def test_server_refuses_a_corrupt_fragment_directory(tiny_fragments, keys, tmp_path):
    bad = shutil.copytree(tiny_fragments[0], tmp_path / "frag")
    target = bad / read_manifest(bad).fragment("expert", "onnx", "int8", "bags").file
    target.write_bytes(target.read_bytes()[:-3])
    done = _run("poe_service", "serve", "--fragments", bad, "--port", "0", "--key", keys[0],
                "--version-file", tmp_path / "v.json")
    assert done.returncode == 2 and "refusing to serve" in done.stderr and "expert.bags.onnx.int8" in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--fragments", "/nonexistent/frag"], "manifest.json not found: --fragments must be a fragment directory"),
    (["--key", "/etc/hostname"], "--key: /etc/hostname is not an unencrypted PEM private key"),
    (["--port", "70000"], "--port must be 0 (any free port) to 65535"),
])
def test_serve_bad_arguments_are_one_line_exit_2(tiny_fragments, args, message):
    done = _run("poe_service", "serve", "--fragments", tiny_fragments[0], "--port", "0", *args)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


# --------------------------------------------------------------------------- abuse: limits, timeouts, concurrency

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


def test_405_answers_carry_allow(server):
    for method, path, allow in (("GET", "/v1/query", "POST"), ("POST", "/v1/pool", "GET"),
                                ("PUT", "/v1/fused", "POST")):
        status, headers, body = server.request(method, path)
        assert status == 405 and headers["allow"] == allow, (method, path, headers)
        assert json.loads(body)["valid"] == [allow]


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
    time.sleep(4.2)  # --manifest-ttl 3 (rounded up to the second): both the captured answer and the bundle's manifest have expired now
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


def test_insecure_is_refused_for_a_bundle_that_trusts_a_key(server, keys, tmp_path):
    bundle = tmp_path / "device"
    fetch_json(server.url, bundle, "tops", f"{keys[0]}.pub")
    done = fetch_cli(server.url, bundle, "tops,bags", "--insecure")
    assert done.returncode == 2 and "--insecure refused" in done.stderr and done.stderr.count("\n") == 1
    done = fetch_cli(server.url, bundle, "tops,bags", "--public-key", f"{keys[1]}.pub")
    assert done.returncode == 2 and "trusts key" in done.stderr


def test_a_narrower_or_other_variant_fetch_keeps_earlier_experts_verifiable(server, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"
    fetch_json(server.url, bundle, "footwear,tops", pub)
    narrower = fetch_json(server.url, bundle, "bags", pub)
    assert narrower["dropped"] == []
    fetch_json(server.url, bundle, "tops", pub, "--format", "onnx", "--precision", "fp32")
    held = sorted(f.id for f in read_manifest(bundle).fragments)
    assert "expert.footwear.tflite.int8" in held and "expert.bags.tflite.int8" in held and \
        "expert.tops.onnx.fp32" in held
    done = _run("edge_runtime", "verify", bundle)
    assert done.returncode == 0, done.stderr
    earlier = json.loads((bundle / "signed_earlier.json").read_text())["documents"]
    assert len(earlier) == 2  # the footwear,tops and the bags answers still vouch for their experts
    raw = json.loads((bundle / "signed_earlier.json").read_text())
    raw["documents"][0]["payload"]["class_names"][0] = "edited"
    (bundle / "signed_earlier.json").write_text(json.dumps(raw))
    done = _run("edge_runtime", "verify", bundle)
    assert done.returncode == 2 and "signature does not verify" in done.stderr
