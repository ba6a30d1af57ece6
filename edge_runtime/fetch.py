"""Over-the-air update of a device bundle: ask the query service, download only the missing fragments.

``fetch`` posts the query, checks the signed per-query manifest (signature,
version not older than the one held, library the same as the one held), then
downloads every fragment the query needs that is not already in the bundle's
content-addressed store ``DIR/blobs/<sha256>`` (each verified before it is
renamed into place), and only then writes ``DIR/manifest.json`` in the
ordinary manifest format (fragment files ``blobs/<sha256>``), so
``edge-runtime run --bundle DIR`` works on it unchanged.  ``fetch_state.json``
remembers the version, pool, libraries and key the bundle holds.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .atomic_io import LockBusyError, atomic_write_json, exclusive_lock
from .download import RetryPolicy, download_blob, request_json, verified_blob
from .manifest import FORMATS, PRECISIONS, Fragment, Manifest, ManifestError, check_choice, read_manifest
from .query import Query, QueryError
from .selection import select
from .signing import SignatureError, load_public_key, verify_document

BLOBS = "blobs"
STATE_NAME = "fetch_state.json"
SIGNED_NAME = "signed_manifest.json"
LOCK_NAME = ".fetch.lock"
Log = Callable[[str], None]


class FetchError(ValueError):
    """The server's answer may not be used: rollback, mix-and-match, or an answer to another question."""


@dataclass(frozen=True)
class FetchConfig:
    """One ``edge-runtime fetch``: which server, which query, where the bundle lives, whom to trust."""

    server: str
    tasks: tuple[str, ...]  # any form ``Query.parse`` takes; held as the query's sorted task names
    bundle: str
    public_key: str | None = None
    insecure: bool = False
    format: str = "tflite"
    precision: str = "int8"
    retries: int = 4
    timeout: float = 30.0

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise FetchError(f"--server must be an http:// or https:// URL, got {self.server!r}")
        object.__setattr__(self, "server", self.server.rstrip("/"))
        object.__setattr__(self, "tasks", Query.parse(self.tasks).tasks)
        check_choice("format", self.format, FORMATS)
        check_choice("precision", self.precision, PRECISIONS)
        if self.public_key is None and not self.insecure:
            raise SignatureError("--public-key KEY.pub is needed to check the server's signature "
                                 "(or --insecure to accept unsigned manifests)")

    @property
    def query(self) -> Query:
        return Query(self.tasks)

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, timeout=self.timeout)


@dataclass
class FetchReport:
    """What one fetch did: fragments downloaded, reused from the store, and the bytes each way."""

    version: int
    pool_id: str
    tasks: tuple[str, ...]
    fetched: list[dict[str, Any]] = field(default_factory=list)
    reused: list[dict[str, Any]] = field(default_factory=list)
    signed: bool = True

    @property
    def fetched_bytes(self) -> int:
        return sum(f["downloaded"] for f in self.fetched)

    @property
    def reused_bytes(self) -> int:
        return sum(f["bytes"] for f in self.reused) + sum(f["resumed_from"] for f in self.fetched)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "pool_id": self.pool_id, "tasks": list(self.tasks), "signed": self.signed,
                "fetched": self.fetched, "reused": self.reused, "fetched_bytes": self.fetched_bytes,
                "reused_bytes": self.reused_bytes}

    def summary(self) -> str:
        return (f"manifest version {self.version} ({'signed' if self.signed else 'UNSIGNED, --insecure'}) for "
                f"{','.join(self.tasks)}: fetched {len(self.fetched)} fragment(s), {self.fetched_bytes:,} bytes; "
                f"reused {len(self.reused)}, {self.reused_bytes:,} bytes saved by reuse")


def read_state(bundle: Path) -> dict[str, Any]:
    path = bundle / STATE_NAME
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FetchError(f"{path} is not valid JSON ({exc}); remove the bundle directory to start over") from None
    if not isinstance(state, dict):
        raise FetchError(f"{path} is not a fetch state object; remove the bundle directory to start over")
    return state


def check_update(state: dict[str, Any], version: int, manifest: Manifest, library: Fragment,
                 key_id: str | None) -> None:
    """Refuse an answer older than what the bundle holds (rollback) or built on another library (mix and match)."""
    held = state.get("version")
    if isinstance(held, int) and version < held:
        raise FetchError(f"rollback refused: the server offers manifest version {version}, older than version "
                         f"{held} this bundle already holds")
    if state.get("pool_id") not in (None, manifest.pool_id):
        raise FetchError(f"mix and match refused: the bundle holds pool {state['pool_id']}, the server offers pool "
                         f"{manifest.pool_id}; fetch into a new --bundle directory")
    variant = f"{library.format}.{library.precision}"
    held_library = state.get("libraries", {}).get(variant)
    if held_library not in (None, library.sha256):
        raise FetchError(f"mix and match refused: the server's {variant} experts are built on library "
                         f"{library.sha256[:12]}, this bundle holds library {held_library[:12]}; "
                         f"fetch into a new --bundle directory")
    if key_id and state.get("key_id") not in (None, key_id):
        raise FetchError(f"the manifest is signed by key {key_id[:16]}, this bundle trusts key "
                         f"{str(state['key_id'])[:16]}; fetch into a new --bundle directory to change keys")


def _answer(cfg: FetchConfig, log: Log) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """The signed answer to the query, its verified payload, and the key id it was signed with."""
    public_key = load_public_key(cfg.public_key) if cfg.public_key else None
    document = request_json(f"{cfg.server}/v1/query", {"tasks": list(cfg.tasks), "format": cfg.format,
                                                        "precision": cfg.precision}, cfg.policy, log)
    if cfg.insecure:
        log("warning: --insecure: the manifest's signature is NOT checked")
    payload = verify_document(document, public_key, insecure=cfg.insecure)
    return document, payload, None if cfg.insecure else document.get("key_id")


def _bundle_manifest(manifest: Manifest, wanted: tuple[Fragment, ...], held: Manifest | None) -> Manifest:
    """The query's fragments pointing into blobs/, plus the ones of earlier queries of the same pool."""
    fragments = {}
    if held is not None and held.pool_id == manifest.pool_id:
        fragments.update({f.id: f for f in held.fragments})
    fragments.update({f.id: replace(f, file=f"{BLOBS}/{f.sha256}") for f in wanted})
    try:
        return replace(manifest, fragments=tuple(fragments[k] for k in sorted(fragments)))
    except ManifestError:  # the held fragments belong to another library: keep only this query's
        return replace(manifest, fragments=tuple(replace(f, file=f"{BLOBS}/{f.sha256}") for f in wanted))


def _parsed(tasks: Any) -> Query | None:
    """The server's echo of the query, or None when it is not a valid one (then it answers another query)."""
    try:
        return Query.parse(tasks)
    except QueryError:
        return None


def _held_manifest(bundle: Path) -> Manifest | None:
    try:
        return read_manifest(bundle) if (bundle / "manifest.json").is_file() else None
    except ManifestError:
        return None


def fetch(cfg: FetchConfig, log: Log = lambda m: None) -> FetchReport:
    """Bring the bundle up to date for ``cfg.tasks``; nothing becomes visible before it is verified."""
    bundle = Path(cfg.bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(bundle / LOCK_NAME):
            return _fetch_locked(cfg, bundle, log)
    except LockBusyError as exc:
        raise FetchError(f"another fetch (pid {exc.pid}) is updating {bundle}; wait for it to finish") from None


def _fetch_locked(cfg: FetchConfig, bundle: Path, log: Log) -> FetchReport:
    document, payload, key_id = _answer(cfg, log)
    try:
        version = payload["version"]
        manifest = Manifest.from_json(payload)
    except KeyError:
        raise FetchError("the server's manifest carries no version; refusing it") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FetchError(f"the server's manifest version must be an integer >= 1, got {version!r}")
    selection = select(manifest, cfg.query, cfg.format, cfg.precision)
    asked = payload.get("query", {})
    if not isinstance(asked, dict) or _parsed(asked.get("tasks")) != cfg.query or asked.get("format") != cfg.format \
            or asked.get("precision") != cfg.precision:
        raise FetchError(f"the server answered another query ({asked}) than the one asked "
                         f"({cfg.query} {cfg.format} {cfg.precision}); refusing it")
    state = read_state(bundle)
    check_update(state, version, manifest, selection.library, key_id)

    report = FetchReport(version, manifest.pool_id, cfg.tasks, signed=not cfg.insecure)
    store = bundle / BLOBS
    for frag in selection.fragments:
        if verified_blob(store, frag.sha256, frag.bytes) is not None:
            report.reused.append({"id": frag.id, "sha256": frag.sha256, "bytes": frag.bytes})
            continue
        got = download_blob(f"{cfg.server}/v1/fragments/{frag.sha256}", store, frag.sha256, frag.bytes,
                            cfg.policy, log)
        report.fetched.append({"id": frag.id, "sha256": frag.sha256, "bytes": frag.bytes,
                               "downloaded": got.downloaded, "resumed_from": got.resumed_from})
        log(f"fetched {frag.id} ({frag.bytes:,} bytes" + (f", resumed from byte {got.resumed_from:,})"
                                                          if got.resumed_from else ")"))
    atomic_write_json(bundle / SIGNED_NAME, document)
    atomic_write_json(bundle / "manifest.json", _bundle_manifest(manifest, selection.fragments,
                                                                 _held_manifest(bundle)).to_json())
    libraries = dict(state.get("libraries", {})) if state.get("pool_id") == manifest.pool_id else {}
    libraries[f"{cfg.format}.{cfg.precision}"] = selection.library.sha256
    atomic_write_json(bundle / STATE_NAME, {"version": version, "pool_id": manifest.pool_id,
                                            "libraries": libraries, "key_id": key_id or state.get("key_id"),
                                            "tasks": list(cfg.tasks)})
    return report
