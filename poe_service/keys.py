"""Signing keys of the query service and the manifest version counter that survives restarts.

``poe-service keygen --out KEY`` writes an Ed25519 private key (PEM, mode
0600) and ``KEY.pub`` for the devices.  The served manifest version lives in a
small JSON file (default ``KEY.version.json``): it is bumped whenever the
content hash of the fragment set being served changes, so versions only ever
increase, across restarts too, and a device can refuse a rollback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json, exclusive_lock
from edge_runtime.signing import key_id

from poe_service.errors import ServiceError


def public_key_path(key: str | Path) -> Path:
    return Path(f"{key}.pub")


def default_version_file(key: str | Path) -> Path:
    return Path(f"{key}.version.json")


def generate_keypair(out: str | Path, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key to ``out`` (0600) and its public key to ``out.pub``; returns the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private, public = Path(out), public_key_path(out)
    if private.exists() and not overwrite:
        raise ServiceError(f"{private} exists; refusing to replace a signing key (devices trust its public "
                               "key). Pass --overwrite to replace it")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private.parent.mkdir(parents=True, exist_ok=True)
    tmp = private.parent / f".{private.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, private)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    public.chmod(0o644)  # the public half is meant to be copied to every device
    return private, public, key_id(key.public_key())


@dataclass(frozen=True)
class VersionCounter:
    """``{"version": N, "content_sha256": H}`` on disk; ``version_for(H')`` returns N, or N+1 when H' != H."""

    path: Path

    def version_for(self, content_sha256: str) -> int:
        with exclusive_lock(Path(f"{self.path}.lock")):
            held = {"version": 0, "content_sha256": None}
            if self.path.is_file():
                try:
                    held = json.loads(self.path.read_text(encoding="utf-8"))
                    int(held["version"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ServiceError(f"version file {self.path} is damaged ({exc}); restore it or pass a "
                                           "--version-file holding a version above every one devices have") from None
            if held.get("content_sha256") == content_sha256:
                return int(held["version"])
            version = int(held["version"]) + 1
            atomic_write_json(self.path, {"version": version, "content_sha256": content_sha256})
            return version
