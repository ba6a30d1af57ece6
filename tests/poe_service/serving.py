"""Shared by the service tests: `poe-service serve` as a real process on an ephemeral loopback port, the real
`edge-runtime fetch` CLI, and a small stdlib proxy that plays the hostile network (cuts transfers, tampers with
manifests and fragments, replays old answers)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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




def make_keys(root: Path) -> tuple[Path, Path]:
    """Two key pairs made by `poe-service keygen`: the server's and a stranger's."""
    for name in ("server", "other"):
        done = _run("poe_service", "keygen", "--out", root / name)
        assert done.returncode == 0, done.stderr
    return root / "server", root / "other"
