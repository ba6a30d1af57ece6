"""Over-the-air update of a device bundle: ask the query service, download only the missing fragments.

``fetch`` posts the query, checks the signed per-query manifest (signature,
version not older than the one held, library the same as the one held), then
downloads every fragment the query needs that is not already in the bundle's
content-addressed store ``DIR/blobs/<sha256>`` (each verified before it is
renamed into place), and only then writes ``DIR/manifest.json`` in the
ordinary manifest format (fragment files ``blobs/<sha256>``), so
``edge-runtime run --bundle DIR`` works on it unchanged.  ``fetch_state.json``
remembers the version, pool, libraries and key the bundle holds,
``trusted_key.pub`` pins the key, and ``signed_manifest.json`` plus
``signed_earlier.json`` vouch for every fragment the bundle holds (see
:mod:`edge_runtime.vouching`).  Only fetch refuses an expired manifest: a
bundle already on a device keeps running however old its manifest is.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .atomic_io import LockBusyError, atomic_write_bytes, atomic_write_json, exclusive_lock
from .download import RetryPolicy, download_blob, request_json, verified_blob
from .manifest import FORMATS, PRECISIONS, Fragment, Manifest, ManifestError, check_choice, read_manifest
from .manifest_types import strict_loads
from .query import Query, QueryError
from .selection import select
from .signing import (SignatureError, check_not_expired, key_id, load_public_key, public_key_pem,
                      verify_document)
from .vouching import EARLIER_NAME, SIGNED_NAME, TRUSTED_KEY_NAME, earlier_documents, payload_manifest, voucher

BLOBS = "blobs"
STATE_NAME = "fetch_state.json"
LOCK_NAME = ".fetch.lock"
RATE_WINDOW = 10.0  # seconds over which --min-rate is measured
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
    deadline: float = 600.0  # seconds for the whole fetch, retries included
    min_rate: float = 1024.0  # bytes/s over any RATE_WINDOW seconds of a transfer
    allow_expired: bool = False

    def __post_init__(self) -> None:
        if not self.deadline > 0 or self.min_rate < 0 or not self.timeout > 0 or self.retries < 0:
            raise FetchError(f"--deadline and --timeout must be > 0, --min-rate and --retries >= 0, got "
                             f"{self.deadline}, {self.timeout}, {self.min_rate}, {self.retries}")
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

    def policy(self, deadline_at: float | None = None) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, timeout=self.timeout, deadline_at=deadline_at,
                           min_rate=self.min_rate, rate_window=RATE_WINDOW)


@dataclass
class FetchReport:
    """What one fetch did, in figures that do not flatter: bytes over the wire, whole fragments reused from the
    store, and bytes of partial files from earlier runs that ended up in a fragment (``resumed``)."""

    version: int
    pool_id: str
    tasks: tuple[str, ...]
    fetched: list[dict[str, Any]] = field(default_factory=list)
    reused: list[dict[str, Any]] = field(default_factory=list)
    signed: bool = True
    expires: str | None = None
    dropped: list[str] = field(default_factory=list)  # earlier fragments no signed manifest vouches for any more

    @property
    def downloaded_bytes(self) -> int:
        return sum(f["downloaded"] for f in self.fetched)

    @property
    def reused_bytes(self) -> int:
        return sum(f["bytes"] for f in self.reused)

    @property
    def resumed_bytes(self) -> int:
        return sum(f["resumed_from"] for f in self.fetched)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "pool_id": self.pool_id, "tasks": list(self.tasks), "signed": self.signed,
                "expires": self.expires, "fetched": self.fetched, "reused": self.reused,
                "downloaded_bytes": self.downloaded_bytes, "fetched_bytes": self.downloaded_bytes,
                "reused_bytes": self.reused_bytes, "resumed_bytes": self.resumed_bytes, "dropped": self.dropped}

    def summary(self) -> str:
        resumed = f"; {self.resumed_bytes:,} bytes resumed from partial files" if self.resumed_bytes else ""
        return (f"manifest version {self.version} ({'signed' if self.signed else 'UNSIGNED, --insecure'}"
                f"{f', expires {self.expires}' if self.expires else ''}) for {','.join(self.tasks)}: fetched "
                f"{len(self.fetched)} fragment(s), {self.downloaded_bytes:,} bytes downloaded; reused "
                f"{len(self.reused)} already held, {self.reused_bytes:,} bytes{resumed}")


def read_state(bundle: Path) -> dict[str, Any]:
    path = bundle / STATE_NAME
    if not path.is_file():
        return {}
    try:
        state = strict_loads(path.read_bytes(), str(path))
    except ValueError as exc:  # deep nesting and huge numbers too: one line, never a traceback
        raise FetchError(f"{exc}; remove the bundle directory to start over") from None
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


def _answer(cfg: FetchConfig, policy: RetryPolicy, public_key: Any, log: Log) -> tuple[dict[str, Any],
                                                                                  dict[str, Any], str | None]:
    """The signed answer to the query, its verified (and unexpired) payload, and the key id it was signed with."""
    document = request_json(f"{cfg.server}/v1/query", {"tasks": list(cfg.tasks), "format": cfg.format,
                                                        "precision": cfg.precision}, policy, log)
    if cfg.insecure:
        log("warning: --insecure: the manifest's signature is NOT checked")
    payload = verify_document(document, public_key, insecure=cfg.insecure)
    if not cfg.insecure:
        try:
            check_not_expired(payload)
        except SignatureError as exc:
            if not cfg.allow_expired:
                raise
            log(f"warning: --allow-expired: {str(exc).split('; refusing')[0]}")
    return document, payload, None if cfg.insecure else document.get("key_id")


def _trusted_key_id(bundle: Path, state: dict[str, Any]) -> str | None:
    """The key this bundle already trusts: the one recorded by earlier fetches, else the pinned public key."""
    if state.get("key_id"):
        return str(state["key_id"])
    pinned = bundle / TRUSTED_KEY_NAME
    return key_id(load_public_key(pinned)) if pinned.is_file() else None


def _check_trust(cfg: FetchConfig, bundle: Path, state: dict[str, Any], public_key: Any) -> None:
    """``--insecure`` or another ``--public-key`` must not switch a bundle that trusts a key to another one."""
    trusted = _trusted_key_id(bundle, state)
    if trusted is None:
        return
    if cfg.insecure:
        raise FetchError(f"--insecure refused: {bundle} trusts key {trusted[:16]}, and --insecure would accept a "
                         f"manifest signed by any key; pass --public-key with that key, or fetch into a new --bundle")
    given = key_id(public_key)
    if given != trusted:
        raise FetchError(f"--public-key is key {given[:16]}, but {bundle} trusts key {trusted[:16]}; fetch into a "
                         f"new --bundle directory to change keys")


def _signed_so_far(bundle: Path) -> list[tuple[Any, Manifest]]:
    """Every saved signed document of the bundle (latest first) with the manifest it carries."""
    documents = []
    for name in (SIGNED_NAME, EARLIER_NAME):
        path = bundle / name
        try:
            raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            documents += [raw] if name == SIGNED_NAME and raw is not None else \
                earlier_documents(raw) if raw is not None else []
        except (OSError, ValueError, RecursionError):
            continue  # unreadable: the fragments it vouched for are dropped, never trusted blindly
    return [(d, m) for d in documents if (m := payload_manifest(d)) is not None]


def _bundle_manifest(bundle: Path, manifest: Manifest, wanted: tuple[Fragment, ...],
                     held: Manifest | None) -> tuple[Manifest, list[Any], list[str]]:
    """The query's fragments pointing into blobs/, plus those of earlier queries that a saved signed manifest
    still vouches for; returns the manifest, the earlier documents it needs and the fragment ids dropped."""
    new = {f.id: replace(f, file=f"{BLOBS}/{f.sha256}") for f in wanted}
    kept: dict[str, Fragment] = {}
    needed: list[Any] = []
    dropped: list[str] = []
    if held is not None and held.pool_id == manifest.pool_id:
        signed = _signed_so_far(bundle)
        for frag in held.fragments:
            if frag.id in new:
                continue
            document = voucher(frag, manifest, signed)
            if document is None:
                dropped.append(frag.id)
                continue
            kept[frag.id] = frag
            if not any(d is document for d in needed):
                needed.append(document)
    fragments = {**kept, **new}
    try:
        return replace(manifest, fragments=tuple(fragments[k] for k in sorted(fragments))), needed, dropped
    except ManifestError:  # the held fragments belong to another library: keep only this query's
        return replace(manifest, fragments=tuple(new[k] for k in sorted(new))), [], dropped + sorted(kept)


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
    policy = cfg.policy(time.monotonic() + cfg.deadline)
    bundle = Path(cfg.bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(bundle / LOCK_NAME):
            return _fetch_locked(cfg, policy, bundle, log)
    except LockBusyError as exc:
        raise FetchError(f"another fetch (pid {exc.pid}) is updating {bundle}; wait for it to finish") from None


def _fetch_locked(cfg: FetchConfig, policy: RetryPolicy, bundle: Path, log: Log) -> FetchReport:
    state = read_state(bundle)
    public_key = load_public_key(cfg.public_key) if cfg.public_key else None
    _check_trust(cfg, bundle, state, public_key)
    document, payload, key_id_ = _answer(cfg, policy, public_key, log)
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
    check_update(state, version, manifest, selection.library, key_id_)

    report = FetchReport(version, manifest.pool_id, cfg.tasks, signed=not cfg.insecure,
                         expires=payload.get("expires") if isinstance(payload.get("expires"), str) else None)
    store = bundle / BLOBS
    for frag in selection.fragments:
        if verified_blob(store, frag.sha256, frag.bytes) is not None:
            report.reused.append({"id": frag.id, "sha256": frag.sha256, "bytes": frag.bytes})
            continue
        got = download_blob(f"{cfg.server}/v1/fragments/{frag.sha256}", store, frag.sha256, frag.bytes, policy, log)
        report.fetched.append({"id": frag.id, "sha256": frag.sha256, "bytes": frag.bytes,
                               "downloaded": got.downloaded, "resumed_from": got.resumed_from})
        log(f"fetched {frag.id} ({frag.bytes:,} bytes, {got.downloaded:,} downloaded"
            + (f", resumed from byte {got.resumed_from:,})" if got.resumed_from else ")"))
    bundled, earlier, report.dropped = _bundle_manifest(bundle, manifest, selection.fragments,
                                                        _held_manifest(bundle))
    for dropped in report.dropped:
        log(f"dropped {dropped} from the bundle: no saved signed manifest vouches for it any more (fetch it again)")
    atomic_write_json(bundle / EARLIER_NAME, {"documents": earlier})
    atomic_write_json(bundle / SIGNED_NAME, document)
    atomic_write_json(bundle / "manifest.json", bundled.to_json())
    libraries = dict(state.get("libraries", {})) if state.get("pool_id") == manifest.pool_id else {}
    libraries[f"{cfg.format}.{cfg.precision}"] = selection.library.sha256
    atomic_write_json(bundle / STATE_NAME, {"version": version, "pool_id": manifest.pool_id,
                                            "libraries": libraries, "key_id": key_id_ or state.get("key_id"),
                                            "tasks": list(cfg.tasks)})
    if public_key is not None and not cfg.insecure:
        _pin_key(bundle, public_key)
    return report


def _pin_key(bundle: Path, public_key: Any) -> None:
    """``trusted_key.pub`` (0644): ``edge-runtime verify`` and ``run`` check signatures without ``--public-key``."""
    pem = public_key_pem(public_key)
    path = bundle / TRUSTED_KEY_NAME
    if not path.is_file() or path.read_bytes() != pem:
        atomic_write_bytes(path, pem)
        path.chmod(0o644)
