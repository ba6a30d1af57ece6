"""Per-image latency of the long-running mode (`edge-runtime stream`) against a bare interpreter loop.

Measured on one bundle, one query, batch 1, in this order:
- bare: the library's and the experts' interpreters called back to back on one
  pre-encoded image (no preprocessing, no softmax): the floor;
- predict: ``Runtime.predict`` on one uint8 image array (preprocessing,
  interpreters, hand-over, softmax);
- stream: ``edge-runtime stream -`` in a child process fed one .npy path at a
  time, the next written only when the previous answer's JSON line came back:
  the ``ms`` it reports (file read to answer, in the process) and the round
  trip seen by the writer (adds the pipe and JSON);
- cold: ``edge-runtime run`` started once per image (process start-up, imports,
  loading, one inference);
- threads: images/s with 1, 2, 4 threads sharing one Runtime (its lock lets one
  call in at a time) and with one ``Runtime.clone()`` per thread.

    python benchmarks/edge_stream.py --bundle runs/demo/fragments --tasks footwear,tops
        [--iterations 2000] [--out docs/results/edge_stream]   (writes OUT.md and OUT.json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime import Runtime  # noqa: E402
from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from edge_runtime.bench import cpu_model  # noqa: E402


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": len(ms), "p50": round(float(np.percentile(a, 50)), 4), "p90": round(float(np.percentile(a, 90)), 4),
            "p99": round(float(np.percentile(a, 99)), 4), "mean": round(float(a.mean()), 4)}


def timed(fn: Callable[[], Any], iterations: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return percentiles(out)


def bare_loop(rt: Runtime, image: np.ndarray, iterations: int) -> dict[str, float]:
    encoded = rt.encode(image)

    def once() -> None:
        raw = rt.library.run_raw(encoded)
        for expert in rt.experts:
            expert.run_raw(raw)
    return timed(once, iterations)


def stream_child(bundle: str, tasks: str, paths: list[Path], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "stream", "--bundle", bundle, "--tasks", tasks,
                             "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None
    inside, round_trip = [], []
    for i, path in enumerate(paths):
        start = time.perf_counter()
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        row = json.loads(proc.stdout.readline())
        if i >= 20:  # the first answers include the child's start-up
            round_trip.append((time.perf_counter() - start) * 1000.0)
            inside.append(row["ms"])
    proc.stdin.close()
    proc.wait(timeout=60)
    return {"reported_ms": percentiles(inside), "round_trip_ms": percentiles(round_trip)}


def cold_runs(bundle: str, tasks: str, path: Path, env: dict[str, str], n: int) -> dict[str, float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "edge_runtime", "run", "--bundle", bundle, "--tasks", tasks, str(path)],
                       check=True, capture_output=True, env=env, cwd=ROOT)
        out.append((time.perf_counter() - start) * 1000.0)
    return percentiles(out)


def throughput(rt: Runtime, image: np.ndarray, threads: int, per_thread: bool, seconds: float) -> float:
    runtimes = [rt.clone() if per_thread else rt for _ in range(threads)]
    counts = [0] * threads
    stop = threading.Event()

    def work(k: int) -> None:
        mine = runtimes[k]
        while not stop.is_set():
            mine.predict(image)
            counts[k] += 1
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return round(sum(counts) / seconds, 1)


def stamp() -> dict[str, Any]:
    flags = ""
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        flags = " ".join(f for f in line.split(":", 1)[1].split() if f in ("sse4_2", "avx", "avx2", "fma",
                                                                          "avx512f", "avx512_vnni", "avx_vnni"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"commit": commit.stdout.strip() or "unknown", "cpu": cpu_model(), "cpu_flags": flags,
            "cores": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": sys.version.split()[0], "numpy": np.__version__}


def report(r: dict[str, Any]) -> str:
    s, m = r["results"], r["machine"]
    rows = [("bare interpreter loop (library + experts, pre-encoded)", s["bare_ms"]),
            ("Runtime.predict (one uint8 image)", s["predict_ms"]),
            ("stream: reported per image (file read to answer)", s["stream"]["reported_ms"]),
            ("stream: round trip seen by the writer (pipe + JSON)", s["stream"]["round_trip_ms"]),
            ("cold `edge-runtime run`, one image per process", s["cold_ms"])]
    table = "\n".join(f"| {name} | {v['n']} | {v['p50']:.3f} | {v['p90']:.3f} | {v['p99']:.3f} |" for name, v in rows)
    tp = "\n".join(f"| {t} | {v['shared']:,.0f} | {v['per_thread']:,.0f} |" for t, v in s["threads"].items())
    return f"""# Long-running edge mode: per-image latency

Data: [edge_stream.json](edge_stream.json). Script: `python benchmarks/edge_stream.py --bundle {r['config']['bundle_label']}
--tasks {r['config']['tasks']} --iterations {r['config']['iterations']}`.

**Conditions.** Bundle: {r['config']['bundle_label']}; query `{r['config']['tasks']}`; backend
{r['config']['backend']} {r['config']['precision']}, 1 interpreter thread, batch 1. Commit {m['commit']}; CPU
{m['cpu']} (flags: {m['cpu_flags']}); {m['cores']} cores; Python {m['python']}, numpy {m['numpy']}; load average
before {m['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}; {m['date']}. Seen on this 2-core x86
machine, shared with other jobs: the figures are this machine's, not general.

| path | images | p50 ms | p90 ms | p99 ms |
|---|---:|---:|---:|---:|
{table}

Throughput, images/s over {r['config']['seconds']} s per cell (batch 1, `Runtime.predict`):

| threads | one shared Runtime (lock) | one Runtime.clone() per thread |
|---:|---:|---:|
{tp}

- Stream mode removes the per-call start-up entirely: the cold CLI pays process
  start, imports and loading for every image; `stream` pays them once.
- What stream adds over `Runtime.predict` is reading the file and writing a JSON
  line; what `predict` adds over the bare loop is preprocessing, hand-over,
  softmax and the prediction record.
- Threads: a shared Runtime serializes only the interpreter calls (TFLite
  interpreters must not be invoked from two threads at once); reading,
  preprocessing and softmax still overlap. Per-thread clones run the
  interpreters in parallel too, bounded by the cores that are free. In this run,
  at 2 threads: shared {s['threads']['2']['shared']:,.0f} vs per-thread
  {s['threads']['2']['per_thread']:,.0f} images/s; at 4: {s['threads']['4']['shared']:,.0f} vs
  {s['threads']['4']['per_thread']:,.0f}. With a load average of {m['load_before'][0]:.0f}-{r['load_after'][0]:.0f} on 2
  cores these differences are within the noise of a shared machine; the
  shared Runtime was never slower here, so it is the documented default.
- The cold CLI figure is inflated by the load (the issue measured 150-220 ms
  start-up on a quieter machine); the stream figures are per image after one
  start-up.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--bundle-label", help="how the report names the bundle (default: its path)")
    ap.add_argument("--tasks", default="footwear,tops")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--stream-images", type=int, default=300)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "edge_stream"))
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        atomic_write_bytes(f"{args.out}.md", report(json.loads(Path(f"{args.out}.json").read_text())).encode())
        return 0
    machine = stamp()
    rt = Runtime.open(args.bundle, args.tasks, warmup=True)
    h, w, c = rt.manifest.preprocessing.input_shape
    image = np.random.default_rng(0).integers(0, 255, (1, h, w, c), dtype=np.uint8)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.stream_images + 20):
            paths.append(Path(tmp) / f"frame{i:05d}.npy")
            np.save(paths[-1], np.random.default_rng(i).integers(0, 255, (h, w, c), dtype=np.uint8))
        results = {"bare_ms": bare_loop(rt, image, args.iterations),
                   "predict_ms": timed(lambda: rt.predict(image), args.iterations),
                   "stream": stream_child(args.bundle, args.tasks, paths, env),
                   "cold_ms": cold_runs(args.bundle, args.tasks, paths[0], env, args.cold),
                   "threads": {str(t): {"shared": throughput(rt, image, t, False, args.seconds),
                                   "per_thread": throughput(rt, image, t, True, args.seconds)} for t in (1, 2, 4)}}
    record = {"config": {"bundle": args.bundle, "bundle_label": args.bundle_label or args.bundle, "tasks": args.tasks,
                         "backend": rt.backend.name, "precision": rt.selection.precision,
                         "iterations": args.iterations, "seconds": args.seconds},
              "machine": machine, "results": results, "load_after": [round(x, 2) for x in os.getloadavg()]}
    atomic_write_json(f"{args.out}.json", record)
    atomic_write_bytes(f"{args.out}.md", report(record).encode())
    print(report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
