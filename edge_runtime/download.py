"""Standard-library HTTP for the device: JSON requests and content-addressed downloads that resume.

A blob is downloaded into ``<store>/<sha256>.partial``; an interrupted transfer
(server gone, connection reset, timeout) keeps what arrived and the next try
asks for the rest with an HTTP ``Range`` header.  Only after the whole file's
size and sha256 match is it renamed to ``<store>/<sha256>``, so no partial or
unverified file is ever visible under a final name.  Transient failures
(connection errors, 5xx, 429) are retried with exponential backoff; 4xx
answers are not, they name what the server refused.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .atomic_io import commit_sibling, sha256_file
from .manifest import check_sha256
from .manifest_types import strict_loads

USER_AGENT = "edge-runtime-fetch/1"
PARTIAL_SUFFIX = ".partial"
_CHUNK = 1 << 16
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
Log = Callable[[str], None]


class DownloadError(OSError):
    """A request or download that failed for good (after retries, or refused by the server)."""


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, 5xx)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: waits ``backoff * 2**k`` seconds (capped) between tries.

    ``timeout`` bounds each socket read; ``deadline_at`` (a ``time.monotonic()`` value) bounds everything, retries
    and backoff included; ``min_rate`` bytes/s over any ``rate_window`` seconds of a transfer stops a server that
    drips bytes just fast enough to never hit ``timeout``.
    """

    retries: int = 4
    timeout: float = 30.0
    backoff: float = 0.25
    max_backoff: float = 8.0
    deadline_at: float | None = None
    min_rate: float = 1024.0
    rate_window: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0 or self.min_rate < 0 or self.rate_window <= 0:
            raise ValueError(f"retries and min_rate must be >= 0, timeout and rate_window > 0, got retries="
                             f"{self.retries}, timeout={self.timeout}, min_rate={self.min_rate}, "
                             f"rate_window={self.rate_window}")

    def wait(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2 ** attempt))

    def remaining(self) -> float:
        """Seconds left before the deadline (infinite without one)."""
        return float("inf") if self.deadline_at is None else self.deadline_at - time.monotonic()

    def socket_timeout(self) -> float:
        """Per-read timeout, never beyond the deadline; DeadlineError once it has passed."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineError("the fetch deadline (--deadline) passed")
        return min(self.timeout, left)


class DeadlineError(DownloadError):
    """The whole fetch ran past its deadline: final, not retried."""


class RateMeter:
    """Bytes received over a sliding window; raises when a transfer is slower than ``min_rate`` or late."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy, self.what = policy, what
        self.start = time.monotonic()
        self.total = 0
        self.samples: deque[tuple[float, int]] = deque([(self.start, 0)])

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.total += n
        self.samples.append((now, self.total))
        if self.policy.deadline_at is not None and now > self.policy.deadline_at:
            raise DeadlineError(f"{self.what}: the fetch deadline (--deadline) passed after {self.total:,} bytes")
        window = self.policy.rate_window
        if self.policy.min_rate <= 0 or now - self.start < window:
            return
        while len(self.samples) > 1 and self.samples[1][0] <= now - window:
            self.samples.popleft()  # samples[0] is the last one at or before the window's start
        rate = (self.total - self.samples[0][1]) / window
        if rate < self.policy.min_rate:
            raise _Transient(f"{self.what}: {rate:,.0f} bytes/s over the last {window:g} s, below the minimum of "
                             f"{self.policy.min_rate:,.0f} (--min-rate)")


def _with_retries(what: str, policy: RetryPolicy, attempt_once: Callable[[], Any], log: Log) -> Any:
    last = ""
    for attempt in range(policy.retries + 1):
        try:
            return attempt_once()
        except _Transient as exc:
            last = str(exc)
            if attempt < policy.retries:
                pause = policy.wait(attempt)
                if pause >= policy.remaining():
                    raise DeadlineError(f"{what}: the fetch deadline (--deadline) passed; last failure: {last}") \
                        from None
                log(f"{what}: {last}; retrying in {pause:.2f} s ({attempt + 1}/{policy.retries})")
                time.sleep(pause)
    raise DownloadError(f"{what} failed after {policy.retries + 1} tries: {last}")


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's JSON ``error`` (and valid choices) if it sent one, else the HTTP reason."""
    try:
        body = strict_loads(exc.read(64 * 1024), "the error body")
        detail = str(body.get("error", exc.reason))
        if body.get("valid"):
            detail += f" (valid: {', '.join(map(str, body['valid']))})"
        return detail
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


def _open(request: urllib.request.Request, timeout: float) -> Any:
    """urlopen that sorts failures into transient (raise _Transient) and final (raise DownloadError)."""
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc)
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code}: {detail}") from None
        raise DownloadError(f"{request.get_method()} {request.full_url}: HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise _Transient(f"cannot reach {request.full_url}: {exc.reason}") from None
    except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
        raise _Transient(f"{request.full_url}: {type(exc).__name__}: {exc}") from None


_NET_ERRORS = (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


def _pieces(response: Any, meter: RateMeter) -> Iterator[bytes]:
    """The body as it arrives (``read1``: whatever the socket has, never waiting for a full 64 KiB), metered.

    ``read(64 KiB)`` raised IncompleteRead on a cut and dropped the bytes of that read, so a transfer cut at
    12,000 bytes resumed from 0; here every byte that arrived is handed on before the next read.
    """
    while True:
        chunk = response.read1(_CHUNK)
        if not chunk:
            return
        meter.add(len(chunk))
        yield chunk


def request_json(url: str, body: Any | None = None, policy: RetryPolicy = RetryPolicy(),
                 log: Log = lambda m: None, max_bytes: int = 16 << 20) -> Any:
    """GET (or POST ``body`` as JSON) and parse the JSON answer, retrying transient failures."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"

    def once() -> Any:
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
        response = _open(request, policy.socket_timeout())
        raw = bytearray()
        try:
            with response:
                for chunk in _pieces(response, RateMeter(policy, url)):
                    raw += chunk
                    if len(raw) > max_bytes:
                        raise DownloadError(f"{url}: answer larger than {max_bytes} bytes; refusing it")
        except _NET_ERRORS as exc:
            raise _Transient(f"{url}: answer cut off ({type(exc).__name__})") from None
        if response.length:  # Content-Length promised more than arrived
            raise _Transient(f"{url}: answer cut off after {len(raw)} bytes")
        try:
            return strict_loads(bytes(raw), f"the answer of {url}")
        except ValueError as exc:  # deep nesting, huge numbers, NaN: one line, never a traceback
            raise DownloadError(str(exc)) from None

    return _with_retries(f"{'POST' if data is not None else 'GET'} {url}", policy, once, log)


@dataclass(frozen=True)
class BlobResult:
    """One blob now in the store.

    ``downloaded``: bytes that came over the wire in this run, all tries together; ``resumed_from``: bytes of a
    partial file left by an earlier run that ended up in the blob (0 when they were discarded or the server
    ignored the range, so they are never counted as saved).
    """

    path: Path
    downloaded: int
    resumed_from: int


def _received(partial: Path) -> int:
    return partial.stat().st_size if partial.exists() else 0


def _write_body(response: Any, partial: Path, start: int, expected: int, url: str, policy: RetryPolicy) -> int:
    """Write the body at offset ``start`` of the partial file, each piece as it arrives (kept when cut off);
    returns the bytes written."""
    got = 0
    with open(partial, "r+b" if start else "wb") as handle:
        handle.seek(start)
        handle.truncate()
        try:
            for chunk in _pieces(response, RateMeter(policy, url)):
                if start + got + len(chunk) > expected:
                    raise DownloadError(f"{url}: server sent more than the manifest's {expected} bytes")
                handle.write(chunk)
                got += len(chunk)
        except _NET_ERRORS as exc:
            raise _Transient(f"{url}: transfer cut off after {start + got} of {expected} bytes "
                             f"({type(exc).__name__})") from None
        finally:
            handle.flush()
    if start + got < expected:
        raise _Transient(f"{url}: transfer cut off after {start + got} of {expected} bytes (connection closed)")
    return got


def download_blob(url: str, store: str | Path, sha256: str, size: int, policy: RetryPolicy = RetryPolicy(),
                  log: Log = lambda m: None) -> BlobResult:
    """Download ``url`` into ``store/<sha256>``, resuming ``store/<sha256>.partial`` from its last byte.

    The whole file's sha256 is checked at the end; a file pieced together from more than one transfer that does
    not hash right is deleted and downloaded once more from byte 0, a single whole transfer that does not is
    refused (tampered or corrupted in transit).  Nothing unverified is ever renamed to its final name.
    """
    check_sha256("blob", sha256)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    final, partial = store / sha256, store / f"{sha256}{PARTIAL_SUFFIX}"
    if _received(partial) > size:
        partial.unlink()
    state = {"downloaded": 0, "kept": _received(partial), "pieced": _received(partial) > 0, "restarted": False}

    def once() -> None:
        start = _received(partial)
        if start < size:
            headers = {"User-Agent": USER_AGENT}
            if start:
                headers["Range"] = f"bytes={start}-"
            with _open(urllib.request.Request(url, headers=headers), policy.socket_timeout()) as response:
                if start and response.status == 206:
                    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    if not match or int(match.group(1)) != start:
                        raise DownloadError(f"{url}: server answered the range request from byte {start} with "
                                            f"Content-Range {response.headers.get('Content-Range')!r}")
                    state["pieced"] = True
                elif start:
                    log(f"{url}: server ignored the range request; downloading from the start")
                    start, state["kept"] = 0, 0
                try:
                    _write_body(response, partial, start, size, url, policy)
                except DownloadError:
                    partial.unlink(missing_ok=True)  # a server sending too much is not resumed from
                    raise
                finally:  # bytes that arrived before a cut count too: they are kept for the next try
                    state["downloaded"] += max(0, _received(partial) - start)
        if sha256_file(partial) != sha256:
            partial.unlink()  # bytes that do not hash right are never kept, resumed or renamed
            state["kept"] = 0
            if state["pieced"] and not state["restarted"]:  # one of the pieces may be stale: start over once
                state["restarted"], state["pieced"] = True, False
                raise _Transient(f"{url}: the file pieced together from resumed transfers does not hash right; "
                                 f"starting over from byte 0")
            raise DownloadError(f"{url}: downloaded {size} bytes whose sha256 does not match the signed manifest "
                                f"(corrupted or tampered in transit); discarded it")

    try:
        _with_retries(f"download {sha256[:12]}", policy, once, log)
    except DownloadError as exc:
        if partial.exists():
            raise type(exc)(f"{exc}; the {_received(partial):,} bytes received are kept in {partial.name} and "
                            f"the next fetch resumes from there") from None
        raise
    commit_sibling(partial, final)
    return BlobResult(final, state["downloaded"], state["kept"])


def verified_blob(store: str | Path, sha256: str, size: int) -> Path | None:
    """``store/<sha256>`` if it is there with the right size and hash (reusable), else None."""
    path = Path(store) / check_sha256("blob", sha256)
    if not path.is_file() or path.stat().st_size != size:
        return None
    if sha256_file(path) != sha256:
        return None
    return path
