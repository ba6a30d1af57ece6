"""``edge-runtime``: run a query on images (``run``, ``stream``), check (``verify``), describe (``info``), time (``bench``) or update (``fetch``) a bundle.

Input errors print one line and exit 2 (``--debug`` shows the traceback; under
``--json`` a JSON error object on stdout too); a bad ``--tasks`` or ``--top`` is
checked inside the command rather than by argparse so it gets that same line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .atomic_io import atomic_write_json
from .backends import BACKEND_CHOICES, BACKENDS, unusable_reason
from .cli_errors import EXIT_USAGE, run_command
from .images import ARRAY_LAYOUTS
from .manifest import PRECISIONS, ManifestError, read_manifest, verified_bytes
from .providers import PROVIDER_CHOICES
from .query import Query
from .runners import native_info_muted

TASKS_HELP = "comma list of primitive tasks, e.g. footwear,tops (any order, each once)"


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    return values


def _add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="fragment directory (manifest.json + fragment files)")
    p.add_argument("--tasks", required=True, help=TASKS_HELP)
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="interpreter; auto = first installed of " + ", ".join(BACKENDS))
    p.add_argument("--precision", default="int8", choices=PRECISIONS, help="fragment precision (default int8)")
    p.add_argument("--public-key", help="Ed25519 public key to re-check a fetched bundle's signed manifest with "
                                        "(default: the bundle's pinned trusted_key.pub, if any)")
    p.add_argument("--provider", metavar="LIST",
                   help="onnxruntime execution providers in priority order, comma list of "
                        f"{', '.join(PROVIDER_CHOICES)} (implies --backend onnxruntime); each must be available; "
                        "the CPU runs nothing unless listed (cuda,cpu)")
    p.add_argument("--io-binding", action="store_true",
                   help="keep the library's output on the providers' device for the experts (onnxruntime I/O "
                        "binding) instead of copying it through host memory")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="predict the classes of images with library + the tasks' experts")
    _add_query_args(r)
    r.add_argument("inputs", nargs="+", metavar="INPUT", help=".npy arrays or PNG/JPEG files")
    r.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    r.add_argument("--layout", default="auto", choices=ARRAY_LAYOUTS, help="layout of .npy arrays (default: infer)")
    r.add_argument("--resize", action="store_true", help="resize image files to the model's size")
    r.add_argument("--top", type=int, help="probabilities shown per image (default 3; with --json: all)")
    r.add_argument("--json", action="store_true", help="print JSON (all probabilities unless --top is given)")
    anytime = r.add_argument_group("progressive experts (anytime inference)")
    budget = anytime.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms", type=float, metavar="MS",
                        help="run as many stages of each expert as fit in MS per image (batch 1 latencies from the "
                             "manifest, or measured here with --calibrate)")
    budget.add_argument("--stages", type=int, metavar="K", help="run the first K stages of every expert")
    anytime.add_argument("--early-exit", type=float, metavar="P",
                         help="stop adding stages for an image once its top probability reaches P (off by default)")
    anytime.add_argument("--calibrate", action="store_true",
                         help="measure fragment latencies on this device before planning (instead of the manifest's)")
    v = sub.add_parser("verify", help="boot-time self-check: manifest schema and types, every fragment's size and "
                                      "sha256, library fingerprints, signature of a fetched bundle; exit 0 only "
                                      "when all hold, else one line per problem and exit 2")
    v.add_argument("bundle", metavar="BUNDLE", help="fragment directory")
    v.add_argument("--public-key", help="Ed25519 public key (KEY.pub) to check a fetched bundle's signature with "
                                        "(default: the bundle's pinned trusted_key.pub)")
    v.add_argument("--json", action="store_true", help="print the JSON report")
    s = sub.add_parser("stream", help="keep interpreters warm and answer images as they arrive: one JSON line each")
    _add_query_args(s)
    s.add_argument("source", metavar="SOURCE", help="'-' (paths on stdin, one per line), a directory to watch, or "
                                                   "a quoted glob such as 'frames/*.png'")
    s.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    s.add_argument("--layout", default="auto", choices=ARRAY_LAYOUTS, help="layout of .npy arrays (default: infer)")
    s.add_argument("--resize", action="store_true", help="resize image files to the model's size")
    s.add_argument("--top", type=int, help="probabilities per image (default: all)")
    s.add_argument("--poll", type=float, default=0.1, help="seconds between looks at a directory or glob (0.1)")
    s.add_argument("--once", action="store_true", help="answer the files present now, then exit (directory/glob)")
    s.set_defaults(json=True)  # its output is JSON lines, so its errors are JSON too
    i = sub.add_parser("info", help="pool, tasks, fragments and their checks, usable interpreters")
    i.add_argument("--bundle", required=True, help="fragment directory")
    i.add_argument("--json", action="store_true")
    b = sub.add_parser("bench", help="latency p50/p90/p99 per fragment and in total, peak RSS, bytes")
    _add_query_args(b)
    b.add_argument("--threads", type=_positive_ints, default=(1, 2), help="comma list of thread counts (default 1,2)")
    b.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    b.add_argument("--iterations", type=int, default=200)
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--json", action="store_true", help="print the JSON record")
    b.add_argument("--out", help="also write the JSON record here (gather several boards with benchmarks/edge_boards.py)")
    f = sub.add_parser("fetch", help="download only the fragments a query needs that the bundle lacks, signed "
                                     "and verified (from `poe-service serve`)")
    f.add_argument("--server", required=True, help="query service URL, e.g. http://10.0.0.2:8000")
    f.add_argument("--tasks", required=True, help=TASKS_HELP)
    f.add_argument("--bundle", required=True, help="bundle directory (created if needed): blobs/, manifest.json")
    f.add_argument("--public-key", help="the server's Ed25519 public key (KEY.pub from `poe-service keygen`); kept "
                                        "in the bundle as trusted_key.pub, so later commands need not repeat it")
    f.add_argument("--insecure", action="store_true", help="accept unsigned or badly signed manifests (never in "
                                                          "production; refused for a bundle that trusts a key)")
    f.add_argument("--format", default="tflite", choices=["tflite", "onnx"],
                   help="fragment format (default tflite)")
    f.add_argument("--precision", default="int8", choices=PRECISIONS, help="fragment precision (default int8)")
    f.add_argument("--retries", type=int, default=4, help="retries per request, with exponential backoff (default 4)")
    f.add_argument("--timeout", type=float, default=30.0, help="seconds without a byte before a try fails")
    f.add_argument("--deadline", type=float, default=600.0, metavar="SECONDS",
                   help="the whole fetch, retries included, ends after this (default 600; partial files are kept "
                        "and the next fetch resumes them)")
    f.add_argument("--min-rate", type=float, default=1024.0, metavar="BYTES_PER_S",
                   help="a transfer slower than this over any 10 s is cut and retried (default 1024; 0: off)")
    f.add_argument("--allow-expired", action="store_true",
                   help="accept a signed manifest past its expiry (offline, from a local mirror); the signature is "
                        "still checked")
    f.add_argument("--json", action="store_true", help="print the JSON report")
    return parser


def _input_names(inputs: Sequence[str], counts: Sequence[int]) -> list[str]:
    names = []
    for path, n in zip(inputs, counts):
        names += [path] if n == 1 else [f"{path}[{k}]" for k in range(n)]
    return names


def _check_top(top: int | None) -> None:
    if top is not None and top < 1:
        raise ValueError(f"--top must be at least 1 (probabilities shown per image), got {top}")


def _run(args: argparse.Namespace) -> int:
    from .images import load_inputs
    from .runtime import Runtime

    _check_top(args.top)
    query = Query.parse(args.tasks)
    pre = read_manifest(args.bundle).preprocessing
    batches = [load_inputs([path], pre, args.layout, args.resize) for path in args.inputs]  # bad input fails first
    with native_info_muted():
        runtime = Runtime.open(args.bundle, query, args.backend, args.precision, num_threads=args.threads,
                               providers=args.provider, stages=args.stages, budget_ms=args.budget_ms,
                               early_exit=args.early_exit, calibrate=args.calibrate, public_key=args.public_key,
                               io_binding=args.io_binding)
    prediction = runtime.predict(load_inputs(batches, pre, "NHWC"), "NHWC")
    names = _input_names(args.inputs, [len(b) for b in batches])
    stages_run = runtime.composer.stages_run if runtime.composer is not None else None
    if args.json:
        rows = prediction.to_json(args.top)
        for i, (row, name) in enumerate(zip(rows, names)):
            row["input"] = name
            if stages_run is not None and args.early_exit is not None:
                row["stages_run"] = stages_run[i]
        print(json.dumps({"loaded": runtime.describe(), "predictions": rows}, indent=2))
        return 0
    if runtime.plan is not None:
        print(format_plan(runtime.plan) + (f"; early exit at p >= {args.early_exit:g}: {sum(stages_run)} stage "
                                           f"runs over {len(stages_run)} image(s)" if args.early_exit else ""))
    top = prediction.top(args.top or 3)
    for name, label, best in zip(names, prediction.labels, top):
        print(f"{name}: {label}  (" + ", ".join(f"{n} {p:.3f}" for n, p in best) + ")")
    return 0


def format_plan(plan: Any) -> str:
    """One line saying which stages of which experts run, and why."""
    ran = ", ".join(f"{t} {k}/{plan.available[t]}" for t, k in plan.stages.items())
    budget = f" within budget {plan.budget_ms:g} ms" if plan.budget_ms is not None else ""
    return (f"stages run: {ran} (predicted {plan.predicted_ms:.3f} ms of fragment time at batch 1{budget}; "
            f"{plan.latency_source} latencies)")


def bundle_info(bundle: str) -> dict[str, Any]:
    """What a bundle holds and whether each file is present and intact (checked, never loaded)."""
    root = Path(bundle)
    manifest = read_manifest(root)
    files = {}
    for frag in manifest.fragments:
        try:
            verified_bytes(root, frag)
            files[frag.id] = "ok"
        except ManifestError as exc:
            files[frag.id] = "missing" if "is missing" in str(exc) else "checksum mismatch"
    variants = []
    everything = Query(tuple(manifest.tasks)).canonical
    for fmt, precision in manifest.variants():
        frags = [f for f in manifest.fragments if f.format == fmt and f.precision == precision]
        composite = manifest.composites.get(f"{fmt}.{precision}", {}).get("queries", {}).get(everything, {})
        variants.append({"format": fmt, "precision": precision, "bytes": sum(f.bytes for f in frags),
                         "all_tasks_accuracy": composite.get("accuracy"),
                         "fragments": [{"id": f.id, "bytes": f.bytes, "status": files[f.id]} for f in frags]})
    return {"pool_id": manifest.pool_id, "schema_version": manifest.schema_version,
            "input_shape": list(manifest.preprocessing.input_shape),
            "tasks": {t: [manifest.class_names[c] for c in ids] for t, ids in sorted(manifest.tasks.items())},
            "variants": variants,
            "interpreters": {name: unusable_reason(name) or "usable" for name in BACKENDS}}


def _info(args: argparse.Namespace) -> int:
    info = bundle_info(args.bundle)
    bad = [f"{f['id']} {f['status']}" for v in info["variants"] for f in v["fragments"] if f["status"] != "ok"]
    if args.json:
        print(json.dumps({**info, "ok": not bad, **({"error": f"{len(bad)} fragment(s) fail their checks: "
                                                               + "; ".join(bad)} if bad else {})}, indent=2))
        return EXIT_USAGE if bad else 0
    print(f"pool {info['pool_id']} (manifest schema {info['schema_version']}), images "
          f"{'x'.join(map(str, info['input_shape']))}")
    for task, names in info["tasks"].items():
        print(f"  task {task}: {', '.join(names)}")
    for v in info["variants"]:
        acc = v["all_tasks_accuracy"]
        damaged = [f"{f['id']} {f['status']}" for f in v["fragments"] if f["status"] != "ok"]
        print(f"  {v['format']:>6} {v['precision']:<4} {v['bytes']:>9,} bytes"
              + (f"  all-task accuracy {acc * 100:.2f}%" if acc is not None else "")
              + (f"  [{'; '.join(damaged)}]" if damaged else ""))
    for name, status in info["interpreters"].items():
        print(f"  interpreter {name}: {status}")
    if bad:  # a boot-time self-check must not pass a damaged bundle
        print(f"edge-runtime: error: {len(bad)} fragment(s) fail their checks: {'; '.join(bad)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import format_report, verify_bundle

    report = verify_bundle(args.bundle, args.public_key)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else EXIT_USAGE


def _stream(args: argparse.Namespace) -> int:
    from .runtime import Runtime
    from .stream import StopFlag, run_stream, source_paths

    _check_top(args.top)
    if not args.poll > 0:
        raise ValueError(f"--poll must be a positive number of seconds, got {args.poll}")
    stop = StopFlag()
    paths = source_paths(args.source, args.poll, args.once, stop, sys.stdin)  # a bad source fails before loading
    with native_info_muted():
        runtime = Runtime.open(args.bundle, Query.parse(args.tasks), args.backend, args.precision,
                               num_threads=args.threads, providers=args.provider, public_key=args.public_key,
                               warmup=True, io_binding=args.io_binding)
    stop.install()
    stats = run_stream(runtime, paths, sys.stdout, args.top, args.layout, args.resize)
    print(f"edge-runtime: stream: {stats.images} image(s), {stats.failed} failed, {stats.seconds:.1f} s",
          file=sys.stderr)
    return EXIT_USAGE if stats.failed else 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_bench, run_bench

    cfg = BenchConfig(bundle=args.bundle, tasks=args.tasks, backend=args.backend, precision=args.precision,
                      threads=args.threads, batch=args.batch, warmup=args.warmup, iterations=args.iterations,
                      providers=args.provider, io_binding=args.io_binding)
    record = run_bench(cfg, log=lambda m: print(m, file=sys.stderr))
    if args.out:
        atomic_write_json(args.out, record)
    print(json.dumps(record, indent=2) if args.json else format_bench(record))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from .fetch import FetchConfig, fetch

    cfg = FetchConfig(server=args.server, tasks=args.tasks, bundle=args.bundle, public_key=args.public_key,
                      insecure=args.insecure, format=args.format, precision=args.precision, retries=args.retries,
                      timeout=args.timeout, deadline=args.deadline, min_rate=args.min_rate,
                      allow_expired=args.allow_expired)
    report = fetch(cfg, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


COMMANDS = {"run": _run, "verify": _verify, "stream": _stream, "info": _info, "bench": _bench, "fetch": _fetch}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("edge-runtime", COMMANDS[args.command], args, json_errors=True)


if __name__ == "__main__":
    sys.exit(main())
