"""The attacks a tester ran against the query service, replayed against a real server: answers and server RSS.

Starts ``poe-service serve`` (a real process, signed answers, default limits
unless ``--serve-arg`` says otherwise) on an ephemeral 127.0.0.1 port and sends,
each on its own connection: a 200 MB and a 1 MB header, 10,000 headers, a
half-sent request, deeply nested JSON, a 5,000-digit number, NaN and a wrong
method.  Records the status line, the seconds until the server answered or
closed, and the server's RSS (VmRSS) before and after each.

    python benchmarks/serve_abuse.py --fragments runs/demo/fragments --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import BenchError, cpu_model, markdown_table  # noqa: E402
from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402

SECTION = "serve_abuse"
MB = 1 << 20


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stream_header(sock: socket.socket, size: int) -> None:
    """A header of ``size`` bytes, sent in 1 MiB pieces (never held in the client's memory whole)."""
    sock.sendall(b"GET /v1/pool HTTP/1.1\r\nHost: x\r\nX-Big: ")
    piece = b"a" * MB
    for _ in range(size // MB):
        sock.sendall(piece)
    sock.sendall(b"\r\n\r\n")


def _post(body: bytes) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        sock.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
    return send


ATTACKS: dict[str, Callable[[socket.socket], None]] = {
    "200 MB header": lambda s: _stream_header(s, 200 * MB),
    "1 MB header": lambda s: _stream_header(s, MB),
    "10,000 headers": lambda s: s.sendall(b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n"
                                          + b"".join(b"X-%d: v\r\n" % i for i in range(10_000)) + b"\r\n"),
    "half-sent request": lambda s: s.sendall(b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n"),
    "nested JSON (8,000 deep)": _post(b"[" * 8000 + b"]" * 8000),
    "5,000-digit number": _post(b'{"tasks": ' + b"9" * 5000 + b"}"),
    "NaN": _post(b'{"tasks": NaN}'),
    "GET on a POST endpoint": lambda s: s.sendall(b"GET /v1/query HTTP/1.1\r\nHost: x\r\n\r\n"),
}


def attack(port: int, pid: int, send: Callable[[socket.socket], None], wait: float) -> dict[str, Any]:
    before = _rss_mib(pid)
    start = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            send(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server before the attack was fully sent: the limit at work
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"connection: close" not in answer.lower():
                    break  # a keep-alive answer: do not wait for the close
        except (socket.timeout, ConnectionResetError):
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return {"status": lines[0] if answer else "(no answer)", "allow": headers.get("allow"),
            "body": body[:160].decode("utf-8", "replace"), "seconds": round(time.monotonic() - start, 3),
            "rss_before_mib": round(before, 1), "rss_after_mib": round(_rss_mib(pid), 1)}


def run(fragments: str, serve_args: Sequence[str], wait: float, code: Path = ROOT) -> dict[str, Any]:
    if not (Path(fragments) / "manifest.json").is_file():
        raise BenchError(f"no fragments at {fragments} (manifest.json missing); run `make demo`")
    with tempfile.TemporaryDirectory() as tmp:
        key, port_file, log = Path(tmp) / "key", Path(tmp) / "port", Path(tmp) / "server.log"
        env = {**os.environ, "PYTHONPATH": str(code)}
        subprocess.run([sys.executable, "-m", "poe_service", "keygen", "--out", str(key)], check=True, env=env,
                       capture_output=True, cwd=code)  # cwd too: `-m` puts it first on sys.path
        with open(log, "w") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "poe_service", "serve", "--fragments",
                                     str(Path(fragments).resolve()),
                                     "--key", str(key), "--port", "0", "--port-file", str(port_file),
                                     "--cache-dir", str(Path(tmp) / "cache"), *serve_args],
                                    stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=code)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"server did not start: {log.read_text()[-500:]}")
                time.sleep(0.05)
            port = int(port_file.read_text())
            results = {name: attack(port, proc.pid, send, wait) for name, send in ATTACKS.items()}
            tracebacks = log.read_text().count("Traceback")
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    if code != ROOT:
        commit = f"server code from {code} (script at {commit})"
    return {"attacks": results, "tracebacks_in_server_log": tracebacks, "serve_args": list(serve_args),
            "commit": commit, "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(result: dict[str, Any]) -> str:
    rows = [[name, r["status"], r["allow"] or "", r["seconds"], r["rss_before_mib"], r["rss_after_mib"]]
            for name, r in result["attacks"].items()]
    return ("# Query service under the tester's attacks\n\n"
            f"**Conditions.** `python benchmarks/serve_abuse.py` against `poe-service serve` with default limits"
            f"{' and ' + ' '.join(result['serve_args']) if result['serve_args'] else ''}; commit "
            f"{result['commit']}; CPU: {result['cpu']}; cores: {result['cores']}; load average "
            f"{result['load_average'][0]:.2f} at the end; date: {result['date']}.\n\n"
            + markdown_table(["attack", "answer", "Allow", "seconds", "RSS before MiB", "RSS after MiB"], rows)
            + f"\n\nTracebacks in the server log: {result['tracebacks_in_server_log']}.\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragments", default="runs/demo/fragments")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `poe-service serve` argument")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for each answer")
    parser.add_argument("--server-code", default=str(ROOT),
                        help="run the server from another checkout (e.g. `git archive` of the commit before a fix) "
                             "for a before/after comparison")
    parser.add_argument("--name", default=SECTION, help="output folder under --out (default serve_abuse)")
    args = parser.parse_args(argv)
    try:
        result = run(args.fragments, args.serve_arg, args.wait, Path(args.server_code).resolve())
    except BenchError as exc:
        print(f"serve_abuse: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) / args.name
    atomic_write_json(out / "result.json", result)
    atomic_write_bytes(out / "report.md", markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
