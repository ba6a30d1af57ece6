"""The realtime query service's logic, free of HTTP: catalog, signed per-query manifests, blobs, fused models.

At start every fragment is verified against the manifest and held in memory
(fragments are tens of kB), so what is served is exactly what was verified;
a corrupt fragment directory, or one whose files resolve outside it (symlinks),
is refused.  A query names tasks, a format and a precision; the answer is a
signed document whose payload is the ordinary fragment manifest cut down to the
library and the queried experts, plus the service's monotonically increasing
``version``, an ``expires`` time (TUF's timestamp role: a captured old answer
stops being accepted by fresh fetches) and the ``query`` itself.  Answers are
cached per query, so the hot path is a dictionary look-up.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from edge_runtime.manifest import (FORMATS, MANIFEST_NAME, PRECISIONS, Fragment, ManifestError, check_sha256,
                                   read_manifest, verified_bytes)
from edge_runtime.manifest_types import strict_loads
from edge_runtime.query import Query, QueryError
from edge_runtime.selection import select
from edge_runtime.signing import format_expiry, key_id, sign_document

from poe_service.errors import ServiceError
from poe_service.fused import FusedModels

QUERY_FIELDS = ("tasks", "format", "precision")
DEFAULT_FORMAT, DEFAULT_PRECISION = "tflite", "int8"
FUSED_PRECISIONS = ("fp32", "fp16", "int8")
MAX_CACHED_ANSWERS = 4096
DEFAULT_MAX_BODY = 16 * 1024  # a query is a few task names; anything bigger is refused with 413
DEFAULT_MANIFEST_TTL = 86400.0  # seconds a signed manifest stays acceptable to `edge-runtime fetch` (TUF timestamp)


class RequestError(ServiceError):
    """A bad request: the message names what was wrong, ``valid`` the choices, ``status`` the HTTP code."""

    def __init__(self, message: str, valid: Sequence[str] = (), status: int = 400) -> None:
        super().__init__(message)
        self.valid, self.status = list(valid), status

    def to_json(self) -> dict[str, Any]:
        return {"error": str(self), "valid": self.valid}

    def to_json_bytes(self) -> bytes:
        return _json_dumps(self.to_json())


@dataclass(frozen=True)
class ServiceRequest:
    """A validated request: the query's tasks in canonical (sorted) order, the format and precision asked for."""

    tasks: tuple[str, ...]
    format: str = DEFAULT_FORMAT
    precision: str = DEFAULT_PRECISION


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


class QueryService:
    """One fragment directory, verified once, answering catalog, query, blob and fused-model requests."""

    def __init__(self, fragments_dir: str | Path, private_key: Any | None = None, version: int = 1,
                 cache_dir: str | Path | None = None, manifest_ttl: float = DEFAULT_MANIFEST_TTL,
                 key_file: str | Path | None = None) -> None:
        if not manifest_ttl > 0:
            raise ServiceError(f"--manifest-ttl must be a positive number of seconds, got {manifest_ttl}")
        self.dir = Path(fragments_dir)
        try:
            self.manifest = read_manifest(self.dir)
            self.blobs = {f.sha256: self._load(f, key_file) for f in self.manifest.fragments}
        except ManifestError as exc:
            raise ServiceError(f"refusing to serve {self.dir}: {exc}") from None
        self.content_sha256 = hashlib.sha256((self.dir / MANIFEST_NAME).read_bytes()).hexdigest()
        self.private_key, self.version, self.manifest_ttl = private_key, version, float(manifest_ttl)
        self.key_id = key_id(private_key.public_key()) if private_key is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.variants = self.manifest.variants()
        self.catalog_bytes = _json_dumps(self.catalog())
        self._signed = lru_cache(maxsize=MAX_CACHED_ANSWERS)(self._answer)
        self.fused_models = FusedModels(self)

    def _load(self, frag: Fragment, key_file: str | Path | None) -> bytes:
        """A fragment's verified bytes, refusing files that resolve outside the directory (a symlink to the
        private key, to /etc/...) or that are the signing key itself."""
        root, path = self.dir.resolve(), (self.dir / frag.file)
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise ManifestError(f"fragment {frag.id!r}: {path} resolves to {resolved}, outside the fragment "
                                "directory (a symlink?); copy the file in instead")
        if key_file is not None and resolved == Path(key_file).resolve():
            raise ManifestError(f"fragment {frag.id!r}: {path} is the signing key; it is never served")
        return verified_bytes(self.dir, frag)

    # ------------------------------------------------------------------ catalog
    def catalog(self) -> dict[str, Any]:
        m = self.manifest
        variants = []
        for fmt, precision in self.variants:
            composite = m.composites.get(f"{fmt}.{precision}", {})
            variants.append({
                "format": fmt, "precision": precision, "scheme": composite.get("scheme"),
                "composite_accuracy": composite.get("queries", {}),
                "fragments": [{"id": f.id, "role": f.role, "task": f.task, "sha256": f.sha256, "bytes": f.bytes,
                               "accuracy": f.agreement.get("accuracy"), "agreement": f.agreement}
                              for f in m.fragments if (f.format, f.precision) == (fmt, precision)]})
        return {"pool_id": m.pool_id, "version": self.version, "content_sha256": self.content_sha256,
                "signed": self.key_id is not None, "key_id": self.key_id, "class_names": list(m.class_names),
                "tasks": {t: {"class_ids": list(ids), "classes": [m.class_names[c] for c in ids]}
                          for t, ids in sorted(m.tasks.items())},
                "formats": sorted({f for f, _ in self.variants}), "precisions": sorted({p for _, p in self.variants}),
                "variants": variants}

    # ------------------------------------------------------------------ queries
    def parse_query(self, body: bytes, fused: bool = False) -> ServiceRequest:
        """A validated query from a JSON request body; :class:`RequestError` names what was wrong."""
        if not body.strip():
            raise RequestError("empty request body: send JSON like "
                             '{"tasks": ["footwear", "tops"], "format": "tflite", "precision": "int8"}',
                             list(QUERY_FIELDS))
        try:
            raw = strict_loads(body, "request body")
        except ValueError as exc:  # deep nesting, 5,000-digit numbers, NaN: a 400, never a 500
            raise RequestError(str(exc), list(QUERY_FIELDS)) from None
        if not isinstance(raw, dict):
            raise RequestError("request body must be a JSON object", list(QUERY_FIELDS))
        unknown = sorted(set(raw) - set(QUERY_FIELDS))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}", list(QUERY_FIELDS))
        valid_tasks = sorted(self.manifest.tasks)
        if "tasks" not in raw:
            raise RequestError("'tasks' is missing: name at least one task, e.g. [\"footwear\", \"tops\"]",
                               valid_tasks)
        try:
            names = Query.parse(raw["tasks"]).validate(valid_tasks).tasks
        except QueryError as exc:
            raise RequestError(exc.reason, valid_tasks) from None
        fmt = "onnx" if fused else raw.get("format", DEFAULT_FORMAT)
        precision = raw.get("precision", "fp32" if fused else DEFAULT_PRECISION)
        if fmt not in FORMATS:
            raise RequestError(f"unknown format {fmt!r}", list(FORMATS))
        if precision not in (FUSED_PRECISIONS if fused else PRECISIONS):
            raise RequestError(f"unknown precision {precision!r}", list(FUSED_PRECISIONS if fused else PRECISIONS))
        if (fmt, precision) not in self.variants:
            raise RequestError(f"this pool has no {fmt} {precision} fragments",
                             [f"{f}/{p}" for f, p in self.variants])
        return ServiceRequest(names, fmt, precision)

    def answer(self, query: ServiceRequest, now: float | None = None) -> bytes:
        """The signed per-query manifest as JSON bytes.

        Signed answers are cached per query and per tenth of the TTL, so every answer handed out is valid for
        at least 90% of ``manifest_ttl`` while the hot path stays a dictionary look-up.
        """
        now = time.time() if now is None else now
        return self._signed(query, int(now // (self.manifest_ttl / 10)))

    def _answer(self, query: ServiceRequest, _bucket: int) -> bytes:
        selection = select(self.manifest, query.tasks, query.format, query.precision)
        payload = replace(self.manifest, fragments=selection.fragments).to_json()
        payload.update({"version": self.version, "content_sha256": self.content_sha256,
                        "expires": format_expiry(time.time() + self.manifest_ttl),
                        "query": {"tasks": list(query.tasks), "format": query.format, "precision": query.precision}})
        return _json_dumps(sign_document(payload, self.private_key))

    # ------------------------------------------------------------------ blobs and fused models
    def blob(self, sha256: str) -> bytes:
        """A fragment's bytes by content address, from the verified in-memory copy."""
        try:
            check_sha256("fragment", sha256)
        except ManifestError as exc:
            raise RequestError(str(exc)) from None
        data = self.blobs.get(sha256)
        if data is None:
            raise RequestError(f"no fragment with sha256 {sha256} in pool {self.manifest.pool_id}; GET /v1/pool "
                             "lists them", status=404)
        return data

    def fused(self, query: ServiceRequest) -> tuple[bytes, dict[str, Any]]:
        """The fused ONNX model of a query and its signed description (see :mod:`poe_service.fused`)."""
        if self.cache_dir is None:
            raise RequestError("this server has no --cache-dir for fused models", status=404)
        return self.fused_models.get(query)
