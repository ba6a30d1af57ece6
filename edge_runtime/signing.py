"""Signed per-query manifests: Ed25519 over canonical JSON, checked on the device before anything is used.

The server signs ``canonical_json(payload)`` (sorted keys, no whitespace,
UTF-8) and sends ``{"payload": ..., "signature": base64, "key_id": hex}``;
``key_id`` is the sha256 of the raw 32-byte public key, so a device can tell
"signed by another key" from "tampered".  ``cryptography`` is imported only
here and only when a key is used, so a device that never fetches does not
need it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .manifest_types import strict_loads

SIGNATURE_ALGORITHM = "ed25519"


class SignatureError(ValueError):
    """A signed document that must not be trusted (missing, malformed, tampered or signed by another key)."""


def canonical_json(payload: Any) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _crypto() -> Any:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("checking signed manifests needs the 'cryptography' package: "
                             "pip install 'pool-of-experts-edge[edge]' (or pip install cryptography)") from None
    return serialization, ed25519, InvalidSignature


def public_key_bytes(public_key: Any) -> bytes:
    serialization, _, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: Any) -> bytes:
    """The PEM (SubjectPublicKeyInfo) form, as ``KEY.pub`` files hold it."""
    serialization, _, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key: Any) -> str:
    """sha256 (hex) of the raw public key: names the key in documents and in the device's state."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()


def load_public_key(path: str | Path) -> Any:
    """An Ed25519 public key from a PEM file (as ``poe-service keygen`` writes ``KEY.pub``)."""
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key (poe-service keygen makes one)")
    return key


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from an unencrypted PEM file (``poe-service keygen --out KEY``)."""
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key (poe-service keygen makes one)")
    return key


def sign_document(payload: dict[str, Any], private_key: Any | None) -> dict[str, Any]:
    """``{"payload", "signature", "key_id", "algorithm"}``; without a key, signature and key_id are None."""
    if private_key is None:
        return {"payload": payload, "signature": None, "key_id": None, "algorithm": None}
    signature = private_key.sign(canonical_json(payload))
    return {"payload": payload, "signature": base64.b64encode(signature).decode("ascii"),
            "key_id": key_id(private_key.public_key()), "algorithm": SIGNATURE_ALGORITHM}


def verify_document(document: Any, public_key: Any | None, insecure: bool = False) -> dict[str, Any]:
    """The payload of a signed document after its signature checked out against ``public_key``.

    ``insecure=True`` skips the check (the caller warns the user); anything else
    that is unsigned, malformed or does not verify raises :class:`SignatureError`.
    """
    if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
        raise SignatureError("not a signed manifest: expected a JSON object with a 'payload' object")
    payload = document["payload"]
    if insecure:
        return payload
    if public_key is None:
        raise SignatureError("no public key to check the manifest with: pass --public-key KEY.pub "
                             "(or --insecure to accept unsigned manifests)")
    signature = document.get("signature")
    if not signature:
        raise SignatureError("the manifest is unsigned; refusing it (start the server with --key, "
                             "or pass --insecure to accept unsigned manifests)")
    invalid_signature = _crypto()[2]
    want = key_id(public_key)
    if document.get("key_id") != want:
        raise SignatureError(f"the manifest is signed by key {str(document.get('key_id'))[:16]}, not by the "
                             f"public key given ({want[:16]}); refusing it")
    try:
        raw = base64.b64decode(str(signature), validate=True)
        public_key.verify(raw, canonical_json(payload))
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"the manifest's signature is malformed ({exc}); refusing it") from None
    except invalid_signature:
        raise SignatureError("the manifest's signature does not verify (tampered in transit or on disk); "
                             "refusing it") from None
    return payload


EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_expiry(epoch_seconds: float) -> str:
    """ISO-8601 UTC with a ``Z``, rounded up to the second: ``2026-12-04T17:45:00Z``."""
    return datetime.fromtimestamp(math.ceil(epoch_seconds), tz=timezone.utc).strftime(EXPIRY_FORMAT)


def parse_expiry(value: Any) -> float:
    """Seconds since the epoch of an ``expires`` field; SignatureError when it is not ISO-8601 UTC."""
    try:
        moment = datetime.strptime(str(value), EXPIRY_FORMAT)
    except ValueError:
        raise SignatureError(f"the manifest's expiry {value!r} is not an ISO-8601 UTC time like "
                             f"2026-12-04T17:45:00Z; refusing it") from None
    return moment.replace(tzinfo=timezone.utc).timestamp()


def check_not_expired(payload: dict[str, Any], now: float | None = None) -> None:
    """Refuse a signed payload whose ``expires`` has passed (or that carries none): replayed old answers.

    Only ``edge-runtime fetch`` calls this, when it talks to the server; a bundle already on a device is
    never refused for its manifest's age.
    """
    if "expires" not in payload:
        raise SignatureError("the manifest carries no expiry ('expires'); refusing it (a server older than "
                             "this device, or a replayed answer; --allow-expired accepts it)")
    expires = parse_expiry(payload["expires"])
    now = time.time() if now is None else now
    if now > expires:
        raise SignatureError(f"the manifest expired at {payload['expires']} (now "
                             f"{format_expiry(now)}): a replayed old answer, or this device's clock is wrong; "
                             f"refusing it (--allow-expired accepts it, e.g. offline from a local mirror)")


SIGNED_PAYLOAD_HEADER, SIGNATURE_HEADER, KEY_ID_HEADER = "X-Signed-Payload", "X-Signature", "X-Key-Id"


def signed_headers(payload: dict[str, Any], private_key: Any) -> dict[str, str]:
    """A signed description of a binary answer (a fused model) as HTTP headers: the payload in URL-safe base64
    of its canonical JSON, the signature and key id as in :func:`sign_document`."""
    document = sign_document(payload, private_key)
    return {SIGNED_PAYLOAD_HEADER: base64.urlsafe_b64encode(canonical_json(payload)).decode("ascii"),
            SIGNATURE_HEADER: document["signature"] or "", KEY_ID_HEADER: document["key_id"] or ""}


def verify_signed_bytes(data: bytes, headers: Any, public_key: Any) -> dict[str, Any]:
    """The signed payload of a binary answer after its signature verified and ``data`` matches its
    ``sha256`` and ``bytes``; ``headers`` is any case-insensitive mapping (``response.headers``) or a dict."""
    def header(name: str) -> str:
        value = headers.get(name) or headers.get(name.lower())
        if not value:
            raise SignatureError(f"the answer carries no {name} header: unsigned; refusing it")
        return str(value)

    try:
        payload = strict_loads(base64.urlsafe_b64decode(header(SIGNED_PAYLOAD_HEADER).encode("ascii")),
                               f"the {SIGNED_PAYLOAD_HEADER} header")
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"the answer's {SIGNED_PAYLOAD_HEADER} header is malformed ({exc})") from None
    verify_document({"payload": payload, "signature": header(SIGNATURE_HEADER), "key_id": header(KEY_ID_HEADER)},
                    public_key)
    if not isinstance(payload, dict) or payload.get("sha256") != hashlib.sha256(data).hexdigest() \
            or payload.get("bytes") != len(data):
        raise SignatureError("the answer's bytes do not match the sha256 and size it was signed with "
                             "(tampered in transit or in a cache); refusing them")
    return payload
