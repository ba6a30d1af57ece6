"""``python -m tools.arm64`` / ``make test-arm``: the edge runtime on emulated Pi 4 and Pi 5 CPUs vs x86.

Sets up (cached: sysroot, wheels), builds the tiny pool and fragments, runs
``guest.py`` on x86 and then under ``qemu-aarch64-static`` for every
interpreter x CPU model, compares, checks that a broken install (numpy 2 beside
tflite-runtime) is refused by the runtime's own up-front check, prints a table
and writes ``results.json``.  Exit 0 all pass; 1 a comparison or run failed;
2 the check could not set itself up (one line saying why).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_runtime.atomic_io import atomic_write_json
from edge_runtime.backends import BACKENDS, unusable_reason
from edge_runtime.cli_errors import run_command

from .compare import TOLERANCES, Comparison, compare
from .fixtures import PRECISIONS, build_fixtures
from .sysroot import BOARDS, CPUS, WHEELS, SetupError, cpu_root, guest_command, require_tools, sysroot, wheels

ROOT = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest.py"
GUEST_TIMEOUT_S = 600
FP32_IMAGES = 100  # fp32 runs ~5x slower than int8 under emulation; max |Δ| needs no more images
BROKEN_MESSAGE = ("edge-runtime: error: tflite-runtime was built for numpy 1.x and fails under numpy {numpy}: "
                  "pip install 'numpy<2', or use ai-edge-litert instead (pip install ai-edge-litert)")
RAW_TFLITE = ("import numpy as np, tflite_runtime.interpreter as t; i = t.Interpreter(model_path={model!r}); "
              "i.allocate_tensors(); print('ran')")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Cell:
    """One emulated run: an interpreter on a CPU model, with its comparisons or why it did not run."""

    cpu: str
    interpreter: str
    version: str
    numpy: str
    seconds: float
    comparisons: tuple[Comparison, ...]
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(c.ok for c in self.comparisons)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _copy_edge_package(work: Path) -> Path:
    """The project's edge package alone (no pool_builder, no converters), as a device installs it."""
    site = work / "edge"
    shutil.copytree(ROOT / "edge_runtime", site / "edge_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _reference(fixtures: Any, interpreter: str, out: Path) -> dict[str, Any]:
    """The x86 run of the same guest code, in this process."""
    from .guest import predict_all

    reason = unusable_reason(interpreter)
    if reason:
        raise SetupError(f"x86 reference for {interpreter}: {reason} (make venv installs it)")
    logits, meta = predict_all(str(fixtures.fragments), np.load(fixtures.images), ",".join(fixtures.tasks),
                               interpreter, PRECISIONS, FP32_IMAGES)
    out.mkdir(parents=True, exist_ok=True)
    for precision, values in logits.items():
        np.save(out / f"{precision}.npy", values)
    return {"logits": logits, "meta": meta}


def _emulated(cpu: str, interpreter: str, root: Path, site: Path, edge: Path, fixtures: Any, out: Path,
              reference: dict[str, Any]) -> Cell:
    cmd, env = guest_command(cpu, root, [edge, site], [str(GUEST), "--bundle", str(fixtures.fragments),
                             "--images", str(fixtures.images), "--tasks", ",".join(fixtures.tasks),
                             "--backend", interpreter, "--precisions", ",".join(PRECISIONS),
                             "--fp32-images", str(FP32_IMAGES), "--out", str(out)])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=GUEST_TIMEOUT_S, cwd=out)
    except subprocess.TimeoutExpired:
        return Cell(cpu, interpreter, "", "", GUEST_TIMEOUT_S, (), f"no result within {GUEST_TIMEOUT_S} s")
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return Cell(cpu, interpreter, "", "", seconds, (),
                    f"emulated run exited {done.returncode}: {_tail(done.stderr)}")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    if meta["machine"] != "aarch64":
        return Cell(cpu, interpreter, meta["version"], meta["numpy"], seconds, (),
                    f"the guest ran as {meta['machine']}, not aarch64")
    comparisons = tuple(compare(reference["logits"][p], np.load(out / f"{p}.npy"), p,
                                reference["meta"]["int8_step"] if p == "int8" else None) for p in PRECISIONS)
    return Cell(cpu, interpreter, meta["version"], meta["numpy"], seconds, comparisons)


def _broken_case(root: Path, litert: Path, tflite: Path, edge: Path, fixtures: Any, work: Path) -> dict[str, Any]:
    """numpy 2 beside tflite-runtime on aarch64: ``edge-runtime run`` must refuse it up front, one line, exit 2."""
    broken = work / "site-broken"
    broken.mkdir()
    numpy_dist = sorted(litert.glob("numpy-*.dist-info"))
    if not numpy_dist:
        raise SetupError(f"no numpy in {litert} to build the numpy-2-beside-tflite-runtime case from")
    numpy_version = numpy_dist[0].name[len("numpy-"):-len(".dist-info")]
    for source, names in ((litert, ["numpy", "numpy.libs", numpy_dist[0].name]),
                          (tflite, ["tflite_runtime"] + [p.name for p in tflite.glob("tflite_runtime-*.dist-info")])):
        for name in names:
            if (source / name).exists():
                (broken / name).symlink_to((source / name).resolve())
    one = work / "one_image.npy"
    np.save(one, np.load(fixtures.images)[:1])
    cmd, env = guest_command("cortex-a72", root, [edge, broken],
                             ["-m", "edge_runtime", "run", "--bundle", str(fixtures.fragments),
                              "--tasks", ",".join(fixtures.tasks), "--backend", "tflite_runtime", str(one)])
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=GUEST_TIMEOUT_S, cwd=work)  # not the checkout: `-m` would import from it
    expected = BROKEN_MESSAGE.format(numpy=numpy_version)
    seen = done.stderr.strip()
    ok = done.returncode == 2 and seen == expected
    # Why the check exists: the same install without it fails deep inside the interpreter.
    model = next((fixtures.fragments / "tflite" / "fp32").glob("*.tflite"))
    cmd, env = guest_command("cortex-a72", root, [broken], ["-c", RAW_TFLITE.format(model=str(model))])
    raw = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=GUEST_TIMEOUT_S, cwd=work)
    return {"numpy": numpy_version, "exit": done.returncode, "stderr": seen, "expected": expected, "ok": ok,
            "without_the_check": f"exit {raw.returncode}: {_tail(raw.stderr, 1) or raw.stdout.strip()}"}


def format_table(cells: Sequence[Cell]) -> str:
    lines = [f"{'board (QEMU_CPU)':<28} {'interpreter':<24} {'numpy':<7} {'prec':<5} {'images':>6} "
             f"{'max |Δ|':>13} {'top-1':>8} {'strict':>8} {'flips':>5}  result"]
    for cell in cells:
        board = f"{BOARDS[cell.cpu]} ({cell.cpu})"
        name = f"{cell.interpreter} {cell.version}".strip()
        if cell.error:
            lines.append(f"{board:<28} {name:<24} {cell.numpy:<7} {'-':<5} {'-':>6} {'-':>13} {'-':>8} {'-':>8} "
                         f"{'-':>5}  FAIL")
            continue
        for c in cell.comparisons:
            delta = "-" if c.max_abs is None else f"{c.max_abs:.2g}"
            delta += f" ({c.max_steps:.0f} step)" if c.max_steps is not None else ""
            lines.append(f"{board:<28} {name:<24} {cell.numpy:<7} {c.precision:<5} {c.images:>6} {delta:>13} "
                         f"{c.top1_agreement:>8.2%} {c.top1_strict:>8.2%} {len(c.flips):>5}  "
                         f"{'ok' if c.ok else 'FAIL'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test-arm", description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(ROOT / ".cache" / "arm64"), help="sysroot and wheel cache (default .cache/arm64)")
    p.add_argument("--out", default=str(ROOT / "runs" / "test-arm"), help="where results.json goes")
    p.add_argument("--cpus", default=",".join(CPUS), help=f"comma list of QEMU_CPU models; valid: {', '.join(CPUS)}")
    p.add_argument("--interpreters", default=",".join(BACKENDS), help=f"comma list; valid: {', '.join(BACKENDS)}")
    p.add_argument("--jobs", type=int, default=2, help="emulated runs at a time (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (fragments, images, logits)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _choices(kind: str, text: str, valid: Sequence[str]) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise SetupError(f"unknown {kind} {bad[0] if bad else '(none)'!r}; valid: {', '.join(valid)}")
    return items


def run_check(args: argparse.Namespace, log: Log = _log) -> int:
    cpus = _choices("CPU model", args.cpus, list(CPUS))
    interpreters = _choices("interpreter", args.interpreters, list(WHEELS))
    if args.jobs < 1:
        raise SetupError(f"--jobs must be >= 1, got {args.jobs}")
    started = time.perf_counter()
    require_tools()
    cache = Path(args.cache).resolve()  # the guest runs elsewhere: every path it gets is absolute
    root = sysroot(cache, log)
    sites = {name: wheels(cache, name, log) for name in sorted(set(interpreters) | {"ai_edge_litert", "tflite_runtime"})}
    log(f"set-up done in {time.perf_counter() - started:.0f} s")
    work = Path(tempfile.mkdtemp(prefix="test-arm-")).resolve()
    try:
        fixtures = build_fixtures(work, log)
        log(f"fixtures done at {time.perf_counter() - started:.0f} s")
        edge = _copy_edge_package(work)
        references = {name: _reference(fixtures, name, work / "x86" / name) for name in interpreters}
        roots = {cpu: cpu_root(root, cpu, work) for cpu in cpus}
        jobs = [(cpu, name) for cpu in cpus for name in interpreters]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            cells = list(pool.map(lambda job: _emulated(job[0], job[1], roots[job[0]], sites[job[1]], edge, fixtures,
                                                        work / "arm" / f"{job[0]}-{job[1]}", references[job[1]]), jobs))
        broken = _broken_case(roots[cpus[0]], sites["ai_edge_litert"], sites["tflite_runtime"], edge, fixtures, work)
        log(f"emulated runs done at {time.perf_counter() - started:.0f} s")
    finally:
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(cells))
    print(f"numpy {broken['numpy']} beside tflite-runtime on aarch64: "
          + ("refused up front as on a Pi: " + broken["stderr"] if broken["ok"] else "NOT refused as expected"))
    print(f"  the same install without the check: {broken['without_the_check']}")
    failures = [f"{c.interpreter} on {c.cpu}: {c.error}" for c in cells if c.error]
    failures += [f"{c.interpreter} on {c.cpu}: {f}" for c in cells for comp in c.comparisons for f in comp.failures]
    if not broken["ok"]:
        failures.append(f"broken case: expected exit 2 and {broken['expected']!r}, got exit {broken['exit']} "
                        f"and {broken['stderr']!r}")
    atomic_write_json(Path(args.out) / "results.json", {
        "tolerances": TOLERANCES, "seconds": round(time.perf_counter() - started, 1), "broken_case": broken,
        "cells": [{**asdict(c), "ok": c.ok} for c in cells], "failures": failures})
    for failure in failures:
        print(f"test-arm: FAIL {failure}", file=sys.stderr)
    print(f"test-arm: {'FAILED' if failures else 'passed'} in {time.perf_counter() - started:.0f} s "
          f"({len(cells)} emulated runs; results in {Path(args.out) / 'results.json'})")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("test-arm", run_check, args, errors=(SetupError, OSError, subprocess.SubprocessError))


if __name__ == "__main__":
    sys.exit(main())
