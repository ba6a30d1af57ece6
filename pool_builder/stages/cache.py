"""Teacher outputs computed once and kept on disk (EDL-Dist's separation of teacher inference).

An array cache is a ``.npy`` file opened memory-mapped plus a ``.json`` record
(shape, dtype, sha256 and a *fingerprint* of whatever produced it).  A cache is
reused only when its record, size and checksum all match; otherwise it is
recomputed.  Both files are written to temporaries and renamed, the record
last, so a killed build never leaves a cache that looks finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edge_runtime.atomic_io import atomic_write_json, commit_sibling, sha256_file, temporary_sibling

from pool_builder.errors import PoolBuilderError

CACHE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class CacheRecord:
    """What a cached array is and what produced it."""

    shape: tuple[int, ...]
    dtype: str
    sha256: str
    fingerprint: str


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_record(path: Path) -> CacheRecord | None:
    """The cache's record, or None when it is missing or unreadable."""
    try:
        raw = json.loads(_record_path(path).read_text())
        return CacheRecord(tuple(raw["shape"]), raw["dtype"], raw["sha256"], raw["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_cache(path: str | Path, fingerprint: str, verify: bool = True) -> np.ndarray | None:
    """The cached array memory-mapped read-only, or None if absent, stale or corrupt."""
    path = Path(path)
    record = read_record(path)
    if record is None or record.fingerprint != fingerprint or not path.is_file():
        return None
    if verify and sha256_file(path) != record.sha256:
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if tuple(array.shape) != record.shape or str(array.dtype) != record.dtype:
        return None
    return array


def write_cache(path: str | Path, fingerprint: str, shape: tuple[int, ...], dtype: str,
                chunks: Iterable[tuple[slice, np.ndarray]]) -> np.ndarray:
    """Fill a new memory-mapped ``.npy`` from ``(rows, values)`` chunks and publish it atomically."""
    if dtype not in CACHE_DTYPES:
        raise PoolBuilderError(f"unknown cache dtype {dtype!r}; valid: {', '.join(CACHE_DTYPES)}")
    path = Path(path)
    _record_path(path).unlink(missing_ok=True)  # the record goes last; remove a stale one first
    tmp = temporary_sibling(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        filled = 0
        for rows, values in chunks:
            out[rows] = values
            filled += values.shape[0]
        if filled != shape[0]:
            raise PoolBuilderError(f"cache {path.name}: producer gave {filled} rows, expected {shape[0]}")
        out.flush()
        del out
        commit_sibling(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(_record_path(path), asdict(CacheRecord(tuple(shape), dtype, sha256_file(path), fingerprint)))
    return np.load(path, mmap_mode="r")


def cached_array(path: str | Path, fingerprint: str, shape: tuple[int, ...], dtype: str,
                 produce: Callable[[], Iterable[tuple[slice, np.ndarray]]],
                 log: Callable[[str], None] = lambda _m: None) -> np.ndarray:
    """Open a valid cache or compute it once; logs which happened."""
    existing = open_cache(path, fingerprint)
    if existing is not None:
        log(f"cache {Path(path).name}: reusing {existing.shape} {existing.dtype}")
        return existing
    log(f"cache {Path(path).name}: computing {shape} {dtype}")
    return write_cache(path, fingerprint, shape, dtype, produce())
