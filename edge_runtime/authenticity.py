"""Is a fetched bundle's ``manifest.json`` the one the server signed?  Checked at every open, not only at fetch.

``edge-runtime fetch`` verifies the signed per-query manifest, then saves it
(``signed_manifest.json``) beside the plain ``manifest.json`` it writes for the
runtime.  Nothing stopped a later edit of ``manifest.json`` (two class names
swapped, a foreign expert whose ``library_sha256`` was rewritten) from running
silently.  Here every field of ``manifest.json`` that decides what runs and
how it is read must equal the saved signed payload (fragment file names
excepted: they point into ``blobs/``), and the payload's Ed25519 signature is
checked again whenever a public key is at hand: the one passed in, or the one
pinned in the bundle (``trusted_key.pub``, which fetch writes).  Fragments of
earlier queries are vouched for by the earlier signed manifests fetch keeps in
``signed_earlier.json`` (:mod:`edge_runtime.vouching`).

Only the signature is checked here, never an expiry: a device must keep
running offline for months on the manifest it fetched; ``fetch`` refuses
expired manifests when it talks to the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .fetch import STATE_NAME
from .manifest import Fragment, Manifest, ManifestError
from .manifest_types import reject_constant
from .vouching import (EARLIER_NAME, SIGNED_NAME, TRUSTED_KEY_NAME, differing, earlier_documents,
                       fragment_differences, payload_manifest, voucher)

HEADER_FIELDS = ("schema_version", "pool_id", "preprocessing", "class_names", "tasks", "seam", "composites", "tools")


@dataclass
class Authenticity:
    """What the saved signed manifest says about ``manifest.json``; ``problems`` empty means nothing is wrong."""

    fetched: bool = False  # the bundle was written by ``edge-runtime fetch``
    signed: bool = False  # its saved manifest carries a signature
    signature: str = "not applicable"  # "verified", "not checked (no public key)", "unsigned", "invalid"
    key_id: str | None = None
    problems: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # only ``verify`` counts these as problems

    def to_json(self) -> dict[str, Any]:
        return {"fetched": self.fetched, "signed": self.signed, "signature": self.signature, "key_id": self.key_id,
                "problems": list(self.problems), "unverifiable": list(self.unverifiable)}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from None


def _public_key(bundle: Path, public_key: Any) -> tuple[Any, str | None]:
    """The key to check with and where it came from: the caller's (a key object or a PEM path), else the pinned one."""
    from .signing import load_public_key

    if public_key is None and (bundle / TRUSTED_KEY_NAME).is_file():
        public_key = bundle / TRUSTED_KEY_NAME
    if public_key is None:
        return None, None
    if isinstance(public_key, (str, Path)):
        return load_public_key(public_key), str(public_key)
    return public_key, "the key given"


def compare_with_signed(local: Manifest, signed: Manifest, ids: Iterable[str] | None = None,
                        earlier: Iterable[tuple[Any, Manifest]] = ()) -> list[str]:
    """One line per field of ``local`` that the signed manifest does not vouch for (``ids``: only those fragments).

    A fragment the latest signed manifest does not list may be vouched for by an ``earlier`` one (a bundle
    grown over several queries; see :mod:`edge_runtime.vouching`).
    """
    problems = []
    earlier = list(earlier)
    header = differing(local, signed, HEADER_FIELDS)
    if header:
        problems.append(f"manifest.json differs from the signed manifest in {', '.join(header)}: edited after "
                        f"fetch; refusing it (fetch again)")
    signed_by_id = {f.id: f for f in signed.fragments}
    wanted = set(ids) if ids is not None else None
    for frag in local.fragments:
        if wanted is not None and frag.id not in wanted:
            continue
        vouched: Fragment | None = signed_by_id.get(frag.id)
        if vouched is None:
            if voucher(frag, signed, earlier) is None:
                problems.append(f"fragment {frag.id!r} is not in any signed manifest saved by fetch (or was "
                                f"edited after fetch); fetch a query that includes it again")
            continue
        changed = fragment_differences(frag, vouched)
        if changed:
            problems.append(f"fragment {frag.id!r} differs from the signed manifest in {', '.join(changed)}: "
                            f"edited after fetch; refusing it")
    return problems


def authenticate(bundle: str | Path, manifest: Manifest, public_key: Any = None,
                 fragments: Iterable[Fragment] | None = None) -> Authenticity:
    """Check ``manifest`` (read from ``bundle``) against the bundle's saved signed manifest, if it has one.

    ``fragments`` limits the fragment checks to those about to be loaded (``Runtime.open``);
    None checks all (``verify``).  Never raises for a bad bundle: problems are listed.
    """
    root = Path(bundle)
    report = Authenticity()
    signed_path, state_path = root / SIGNED_NAME, root / STATE_NAME
    if not signed_path.exists():
        if state_path.exists():
            report.fetched = True
            report.problems.append(f"{signed_path} is missing: this fetched bundle cannot be authenticated "
                                   f"(fetch again)")
        return report
    report.fetched = True
    try:
        document = _read_json(signed_path)
        state = _read_json(state_path) if state_path.exists() else {}
        if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
            raise ManifestError(f"{signed_path} is not a signed manifest (no payload object)")
        trusted = state.get("key_id") if isinstance(state, dict) else None
        key = _check_signature(root, document, trusted, public_key, report)
        signed = Manifest.from_json(document["payload"])
        ids = None if fragments is None else [f.id for f in fragments]
        earlier = _earlier(root, manifest, signed, ids, trusted, key) if root.joinpath(EARLIER_NAME).exists() else []
    except ValueError as exc:  # ManifestError and SignatureError are ValueErrors
        report.problems.append(str(exc))
        return report
    report.problems += compare_with_signed(manifest, signed, ids, earlier)
    return report


def _earlier(root: Path, local: Manifest, signed: Manifest, ids: list[str] | None, trusted: Any,
             key: Any) -> list[tuple[Any, Manifest]]:
    """The earlier signed documents needed for fragments the latest one does not list, each signature checked
    like the latest's (same trusted key; verified when a key is at hand)."""
    from .signing import SignatureError, verify_document

    listed = {f.id for f in signed.fragments}
    if all(f.id in listed for f in local.fragments if ids is None or f.id in ids):
        return []  # nothing to look up: the file is not even read
    pairs = []
    for document in earlier_documents(_read_json(root / EARLIER_NAME)):
        if not isinstance(document, dict) or (payload := payload_manifest(document)) is None:
            raise ManifestError(f"{root / EARLIER_NAME} holds a document that is not a signed manifest; fetch again")
        if trusted and (not document.get("signature") or document.get("key_id") != trusted):
            raise SignatureError(f"{root / EARLIER_NAME} holds a manifest not signed by the key this bundle "
                                 f"trusts ({str(trusted)[:16]}); refusing it")
        if key is not None and document.get("signature"):
            verify_document(document, key)
        pairs.append((document, payload))
    return pairs


def _check_signature(root: Path, document: dict[str, Any], trusted: Any, public_key: Any,
                     report: Authenticity) -> Any:
    """Checks the latest document's signature; returns the public key used (None when there was none)."""
    from .signing import SignatureError, verify_document

    report.key_id = document.get("key_id")
    report.signed = bool(document.get("signature"))
    if not report.signed:
        report.signature = "unsigned"
        if trusted:
            raise SignatureError(f"the saved manifest is unsigned, but this bundle trusts key {str(trusted)[:16]}; "
                                 f"refusing it (fetch again)")
        report.unverifiable.append("the saved manifest is unsigned (fetched with --insecure): nothing "
                                   "authenticates this bundle")
        return None
    if trusted and report.key_id != trusted:
        report.signature = "invalid"
        raise SignatureError(f"the saved manifest is signed by key {str(report.key_id)[:16]}, but this bundle "
                             f"trusts key {str(trusted)[:16]}; refusing it")
    key, _ = _public_key(root, public_key)
    if key is None:
        report.signature = "not checked (no public key)"
        report.unverifiable.append("the saved manifest's signature was not checked: no public key (pass "
                                   "--public-key KEY.pub, the key `fetch` was given)")
        return None
    try:
        verify_document(document, key)
    except SignatureError:
        report.signature = "invalid"
        raise
    report.signature = "verified"
    return key
