"""Load on the query service: queries per second and p50/p99 latency of POST /v1/query, loopback only.

Starts ``poe-service serve`` on an ephemeral 127.0.0.1 port (a real process,
signed manifests), then N client threads with keep-alive connections post
queries that cycle over every task subset and variant the pool offers.  Bounded
twice: at most ``--requests`` per client count and ``--max-seconds`` each.
Target (issue 5): >= 200 queries/s with p99 < 50 ms and zero errors on 2 cores.

    python benchmarks/serve_load.py --fragments runs/demo/fragments --out runs/bench
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (BenchArgumentParser, BenchError, Headline, describe_machine, machine,  # noqa: E402
                               run_main, write_section)

SECTION = "serve_load"
TARGET_QPS, TARGET_P99_MS = 200.0, 50.0


@dataclass(frozen=True)
class LoadConfig:
    fragments: str = "runs/demo/fragments"
    out: str = "runs/bench"
    clients: tuple[int, ...] = (8, 32)
    requests: int = 10_000
    max_seconds: float = 60.0
    warmup: int = 200

    def __post_init__(self) -> None:
        if not (Path(self.fragments) / "manifest.json").is_file():
            raise BenchError(f"no fragments at {self.fragments} (manifest.json missing); run `make demo` or "
                             "`poe-convert export`")
        if not self.clients or min(self.clients) < 1 or self.requests < 1 or self.max_seconds <= 0:
            raise BenchError("--clients must be positive integers, --requests >= 1, --max-seconds > 0")


def _queries(fragments: str) -> list[bytes]:
    manifest = json.loads((Path(fragments) / "manifest.json").read_text())
    tasks = sorted(manifest["tasks"])
    variants = sorted({(f["format"], f["precision"]) for f in manifest["fragments"] if f["role"] == "library"})
    subsets = [list(c) for k in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, k)]
    return [json.dumps({"tasks": s, "format": f, "precision": p}).encode() for s in subsets for f, p in variants]


class _Server:
    def __init__(self, fragments: str, work: Path) -> None:
        key, port_file = work / "key", work / "port"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, "-m", "poe_service", "keygen", "--out", str(key)], check=True, env=env,
                       capture_output=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "poe_service", "serve", "--fragments", fragments,
                                      "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                                      "--key", str(key), "--cache-dir", str(work / "cache")], env=env)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError("the server did not start (see its output above)")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _load(port: int, bodies: list[bytes], clients: int, requests: int, max_seconds: float) -> dict[str, Any]:
    """``clients`` threads, one keep-alive connection each, until ``requests`` are done or time is up."""
    lock, counter = threading.Lock(), itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    deadline = time.perf_counter() + max_seconds
    headers = {"Content-Type": "application/json"}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = latencies[i]
        while time.perf_counter() < deadline:
            n = next(counter)
            if n >= requests:
                break
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/query", bodies[n % len(bodies)], headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or not body.startswith(b"{"):
                    with lock:
                        errors.append(f"HTTP {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            mine.append(time.perf_counter() - start)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray([x for per in latencies for x in per]) * 1000.0
    done = int(lat.size)
    return {"clients": clients, "requests": done, "errors": len(errors), "error_examples": errors[:5],
            "seconds": round(wall, 3), "qps": round(done / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if done else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if done else None,
            "max_ms": round(float(lat.max()), 2) if done else None}


def run(cfg: LoadConfig) -> dict[str, Any]:
    bodies = _queries(cfg.fragments)
    before = asdict(machine())
    with tempfile.TemporaryDirectory(prefix="serve_load.") as work:
        server = _Server(cfg.fragments, Path(work))
        try:
            _load(server.port, bodies, 4, cfg.warmup, cfg.max_seconds)  # fills the per-query answer cache
            rows = [_load(server.port, bodies, c, cfg.requests, cfg.max_seconds) for c in cfg.clients]
        finally:
            server.stop()
    return {"config": asdict(cfg), "distinct_queries": len(bodies), "rows": rows, "machine": before,
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def headlines(result: dict[str, Any]) -> list[Headline]:
    out = []
    for row in result["rows"]:
        met = row["qps"] >= TARGET_QPS and (row["p99_ms"] or 1e9) < TARGET_P99_MS and row["errors"] == 0
        out.append(Headline(f"POST /v1/query, {row['clients']} concurrent clients (loopback)",
                            f"{row['qps']:,.0f} q/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                            f"{row['errors']} errors",
                            f">= {TARGET_QPS:.0f} q/s, p99 < {TARGET_P99_MS:.0f} ms, 0 errors",
                            met, row["qps"]))
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["## Query service under load", "",
             f"`POST /v1/query` on `poe-service serve` (one uvicorn process, signed answers cached per query), "
             f"{result['distinct_queries']} distinct queries cycled; keep-alive client threads in the benchmark "
             "process, the server in its own, on the same machine over loopback.", "",
             "| clients | requests | seconds | queries/s | p50 ms | p99 ms | max ms | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['clients']} | {r['requests']:,} | {r['seconds']} | {r['qps']:,.0f} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['max_ms']} | {r['errors']} |")
    lines += ["", describe_machine(result["machine"], load_after=result["load_after"]) + ".", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = BenchArgumentParser(prog="serve_load.py", description=__doc__.splitlines()[0])
    ap.add_argument("--fragments", default=LoadConfig.fragments, help="fragment directory to serve")
    ap.add_argument("--out", default=LoadConfig.out, help=f"results go to OUT/{SECTION}/")
    ap.add_argument("--clients", default="8,32", help="comma list of concurrent client counts (default 8,32)")
    ap.add_argument("--requests", type=int, default=LoadConfig.requests, help="requests per client count")
    ap.add_argument("--max-seconds", type=float, default=LoadConfig.max_seconds, help="time bound per client count")
    args = ap.parse_args(argv)
    try:
        clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        raise BenchError(f"--clients takes comma-separated integers, got {args.clients!r}") from None
    cfg = LoadConfig(fragments=args.fragments, out=args.out, clients=clients, requests=args.requests,
                     max_seconds=args.max_seconds)
    result = run(cfg)
    out = write_section(Path(cfg.out) / SECTION, result, markdown(result), headlines(result))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
