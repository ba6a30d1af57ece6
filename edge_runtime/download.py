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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .atomic_io import commit_sibling, sha256_file
from .manifest import check_sha256

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
    """How often and how patiently to retry: waits ``backoff * 2**k`` seconds (capped) between tries."""

    retries: int = 4
    timeout: float = 30.0
    backoff: float = 0.25
    max_backoff: float = 8.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError(f"retries must be >= 0 and timeout > 0, got retries={self.retries}, "
                             f"timeout={self.timeout}")

    def wait(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2 ** attempt))


def _with_retries(what: str, policy: RetryPolicy, attempt_once: Callable[[], Any], log: Log) -> Any:
    last = ""
    for attempt in range(policy.retries + 1):
        try:
            return attempt_once()
        except _Transient as exc:
            last = str(exc)
            if attempt < policy.retries:
                pause = policy.wait(attempt)
                log(f"{what}: {last}; retrying in {pause:.2f} s ({attempt + 1}/{policy.retries})")
                time.sleep(pause)
    raise DownloadError(f"{what} failed after {policy.retries + 1} tries: {last}")


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's JSON ``error`` (and valid choices) if it sent one, else the HTTP reason."""
    try:
        body = json.loads(exc.read(64 * 1024).decode("utf-8"))
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


def request_json(url: str, body: Any | None = None, policy: RetryPolicy = RetryPolicy(),
                 log: Log = lambda m: None, max_bytes: int = 16 << 20) -> Any:
    """GET (or POST ``body`` as JSON) and parse the JSON answer, retrying transient failures."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"

    def once() -> Any:
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
        response = _open(request, policy.timeout)
        try:
            with response:
                raw = response.read(max_bytes + 1)
        except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
            raise _Transient(f"{url}: answer cut off ({type(exc).__name__})") from None
        if len(raw) > max_bytes:
            raise DownloadError(f"{url}: answer larger than {max_bytes} bytes; refusing it")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DownloadError(f"{url}: answer is not JSON ({exc})") from None

    return _with_retries(f"{'POST' if data is not None else 'GET'} {url}", policy, once, log)


@dataclass(frozen=True)
class BlobResult:
    """One blob now in the store: how many bytes came over the wire, and how many a partial file saved."""

    path: Path
    downloaded: int
    resumed_from: int


def _received(partial: Path) -> int:
    return partial.stat().st_size if partial.exists() else 0


def _append(response: Any, partial: Path, start: int, expected: int, url: str) -> None:
    """Write the response body at offset ``start`` of the partial file (kept when the transfer is cut)."""
    got = 0
    with open(partial, "r+b" if start else "wb") as handle:
        handle.seek(start)
        handle.truncate()
        try:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                if start + got + len(chunk) > expected:
                    raise DownloadError(f"{url}: server sent more than the manifest's {expected} bytes")
                handle.write(chunk)
                got += len(chunk)
        except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
            handle.flush()
            raise _Transient(f"{url}: transfer cut off after {start + got} of {expected} bytes "
                             f"({type(exc).__name__})") from None
        handle.flush()
    if start + got < expected:
        raise _Transient(f"{url}: transfer cut off after {start + got} of {expected} bytes (connection closed)")


def download_blob(url: str, store: str | Path, sha256: str, size: int, policy: RetryPolicy = RetryPolicy(),
                  log: Log = lambda m: None) -> BlobResult:
    """Download ``url`` into ``store/<sha256>``, resuming ``store/<sha256>.partial``; verified before it appears."""
    check_sha256("blob", sha256)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    final, partial = store / sha256, store / f"{sha256}{PARTIAL_SUFFIX}"
    if _received(partial) > size:
        partial.unlink()
    resumed_from = _received(partial)
    downloaded, restarted = 0, False

    def once() -> None:
        nonlocal downloaded, restarted
        start = _received(partial)
        if start < size:
            headers = {"User-Agent": USER_AGENT}
            if start:
                headers["Range"] = f"bytes={start}-"
            response = _open(urllib.request.Request(url, headers=headers), policy.timeout)
            with response:
                if start and response.status == 206:
                    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    if not match or int(match.group(1)) != start:
                        raise DownloadError(f"{url}: server answered the range request from byte {start} with "
                                            f"Content-Range {response.headers.get('Content-Range')!r}")
                elif start:
                    log(f"{url}: server ignored the range request; downloading from the start")
                    start = 0
                try:
                    _append(response, partial, start, size, url)
                except DownloadError:
                    partial.unlink(missing_ok=True)  # a server sending too much is not resumed from
                    raise
                finally:  # bytes that arrived before a cut count too: they are kept for the next try
                    downloaded += max(0, _received(partial) - start)
        if sha256_file(partial) != sha256:
            partial.unlink()  # bytes that do not hash right are never kept, resumed or renamed
            if resumed_from and not restarted:  # the bytes kept from an earlier run may be the bad ones
                restarted = True
                raise _Transient(f"{url}: the resumed download does not hash right; starting over")
            raise DownloadError(f"{url}: downloaded {size} bytes whose sha256 does not match the signed manifest "
                                f"(corrupted or tampered in transit); discarded it")

    try:
        _with_retries(f"download {sha256[:12]}", policy, once, log)
    except DownloadError as exc:
        if partial.exists():
            raise DownloadError(f"{exc}; the {_received(partial):,} bytes received are kept in {partial.name} and "
                                f"the next fetch resumes from there") from None
        raise
    commit_sibling(partial, final)
    return BlobResult(final, downloaded, resumed_from)


def verified_blob(store: str | Path, sha256: str, size: int) -> Path | None:
    """``store/<sha256>`` if it is there with the right size and hash (reusable), else None."""
    path = Path(store) / check_sha256("blob", sha256)
    if not path.is_file() or path.stat().st_size != size:
        return None
    if sha256_file(path) != sha256:
        return None
    return path
