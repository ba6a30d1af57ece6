"""Long-running inference: interpreters loaded and warmed once, images taken as they arrive.

``edge-runtime run`` pays 150-220 ms of process start-up and loading for a
sub-millisecond inference.  ``edge-runtime stream`` opens the runtime once and
then reads image paths from standard input (one per line), from a directory it
watches (files appear there by rename, so a half-written file is never read:
names starting with '.' or ending in .tmp/.part are skipped), or from a glob
pattern it polls; it prints one JSON line per image as soon as it is done.
A bad image is one JSON line with an ``error`` and the stream goes on.
"""

from __future__ import annotations

import glob
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from .images import InputError, load_inputs

SKIPPED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
GLOB_CHARS = "*?["


@dataclass
class StreamStats:
    """What one stream did, for the exit status and the closing log line."""

    images: int = 0
    failed: int = 0
    seconds: float = 0.0


class StopFlag:
    """Set by SIGTERM/SIGINT so a service manager's stop ends the loop between images, not inside one."""

    def __init__(self) -> None:
        self.stopped = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, *_: Any) -> None:
        self.stopped = True

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopped and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def _ready(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and not path.name.endswith(SKIPPED_SUFFIXES)


def lines_of(stream: TextIO, stop: StopFlag) -> Iterator[str]:
    """Paths from standard input, one per line (blank lines ignored), until EOF."""
    for line in stream:
        if stop.stopped:
            return
        path = line.strip()
        if path:
            yield path


def polled(list_paths: Callable[[], Iterable[Path]], poll: float, once: bool, stop: StopFlag) -> Iterator[str]:
    """New files as they appear, oldest name first per poll; forgets files once they are gone (bounded memory)."""
    seen: set[Path] = set()
    while not stop.stopped:
        present = sorted(p for p in list_paths() if _ready(p))
        seen &= set(present)
        for path in present:
            if stop.stopped:
                return
            if path not in seen:
                seen.add(path)
                yield str(path)
        if once:
            return
        stop.sleep(poll)


def source_paths(source: str, poll: float, once: bool, stop: StopFlag, stdin: TextIO) -> Iterator[str]:
    """``-`` (stdin), a directory, or a glob pattern (quote it so the shell leaves it alone)."""
    if source == "-":
        return lines_of(stdin, stop)
    root = Path(source)
    if root.is_dir():
        return polled(root.iterdir, poll, once, stop)
    if any(ch in source for ch in GLOB_CHARS):
        return polled(lambda: (Path(p) for p in glob.iglob(source)), poll, once, stop)
    raise InputError(f"stream source {source!r} is neither '-' (paths on stdin), a directory nor a glob pattern "
                     f"such as 'frames/*.png'")


def predict_one(runtime: Any, path: str, top: int | None, layout: str, resize: bool) -> list[dict[str, Any]]:
    """JSON rows for one file (one per image in it), each with the milliseconds from reading to answer."""
    start = time.perf_counter()
    batch = load_inputs([path], runtime.manifest.preprocessing, layout, resize)
    rows = runtime.predict(batch, "NHWC").to_json(top)
    ms = round((time.perf_counter() - start) * 1000.0, 3)
    for k, row in enumerate(rows):
        row.pop("index", None)
        row["input"] = path if len(rows) == 1 else f"{path}[{k}]"
        row["ms"] = ms
    return rows


def run_stream(runtime: Any, paths: Iterable[str], out: TextIO = sys.stdout, top: int | None = None,
               layout: str = "auto", resize: bool = False) -> StreamStats:
    """Answer every path as it comes, one JSON line per image, flushed at once."""
    stats, start = StreamStats(), time.perf_counter()
    for path in paths:
        try:
            rows = predict_one(runtime, path, top, layout, resize)
        except (ValueError, OSError) as exc:  # InputError and friends: report, keep going
            stats.failed += 1
            rows = [{"input": path, "error": str(exc)}]
        stats.images += len(rows)
        out.write("".join(json.dumps(row) + "\n" for row in rows))
        out.flush()
    stats.seconds = time.perf_counter() - start
    return stats
