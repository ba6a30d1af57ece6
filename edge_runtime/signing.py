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
from pathlib import Path
from typing import Any

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


def key_id(public_key: Any) -> str:
    """sha256 (hex) of the raw public key: names the key in documents and in the device's state."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()


def load_public_key(path: str | Path) -> Any:
    """An Ed25519 public key from a PEM file (as ``pool-builder keygen`` writes ``KEY.pub``)."""
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key (pool-builder keygen makes one)")
    return key


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from an unencrypted PEM file (``pool-builder keygen --out KEY``)."""
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key (pool-builder keygen makes one)")
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
