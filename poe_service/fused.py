"""Per-query fused ONNX models, built from the service's verified in-memory fragments and signed.

Rebuilding from the files on disk meant that a fragment flipped after start
gave a 500, or worse a model with other weights than the signed manifest
names.  Here the graph is fused from the bytes verified at start (once per
query and process, kept in memory; a copy is written atomically to the cache
directory for the operator and never read back, so a file edited there is
never served), and every answer carries a signature over its sha256, size,
query and class order that a device checks with
:func:`edge_runtime.signing.verify_signed_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from edge_runtime.atomic_io import atomic_write_bytes, atomic_write_json
from edge_runtime.signing import signed_headers

if TYPE_CHECKING:  # pragma: no cover
    from poe_service.queries import QueryService, ServiceRequest

MAX_FUSED_IN_MEMORY = 32  # fused models are a few hundred kB; older ones are read back from the disk cache


class FusedModels:
    """Fused models of one :class:`QueryService`, each built once per query and fragment set."""

    def __init__(self, service: "QueryService") -> None:
        self.service = service
        self._memory: OrderedDict[str, tuple[bytes, dict[str, str]]] = OrderedDict()
        self._lock = threading.Lock()  # one build per query at a time; builds run in a worker thread

    def _key(self, query: "ServiceRequest") -> str:
        text = json.dumps([self.service.content_sha256, list(query.tasks), query.precision])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def get(self, query: "ServiceRequest") -> tuple[bytes, dict[str, str]]:
        """``(model bytes, response headers)``: class ids, tasks, ETag and (with a key) the signature."""
        key = self._key(query)
        with self._lock:
            hit = self._memory.get(key)
            if hit is None:
                hit = self._memory[key] = self._build(query, key)
                while len(self._memory) > MAX_FUSED_IN_MEMORY:
                    self._memory.popitem(last=False)
            self._memory.move_to_end(key)
            return hit

    def _build(self, query: "ServiceRequest", key: str) -> tuple[bytes, dict[str, str]]:
        svc = self.service
        from converters.fuse import fuse_verified  # the server reaches converters only here, lazily

        data, tasks, class_ids = fuse_verified(svc.manifest, lambda f: svc.blobs[f.sha256], query.tasks,
                                               query.precision)
        meta = {"sha256": hashlib.sha256(data).hexdigest(), "tasks": list(tasks), "class_ids": list(class_ids)}
        if svc.cache_dir is not None:
            path = svc.cache_dir / "fused" / f"{key}.onnx"  # a copy for the operator; never read back
            atomic_write_bytes(path, data)
            atomic_write_json(path.with_suffix(".json"), meta)
        payload = {"kind": "fused-onnx", "pool_id": svc.manifest.pool_id, "version": svc.version,
                   "content_sha256": svc.content_sha256, "tasks": list(meta["tasks"]), "precision": query.precision,
                   "class_ids": list(meta["class_ids"]), "sha256": meta["sha256"], "bytes": len(data)}
        headers = {"ETag": f'"{meta["sha256"]}"', "X-Class-Ids": ",".join(map(str, meta["class_ids"])),
                   "X-Tasks": ",".join(meta["tasks"])}
        if svc.private_key is not None:
            headers.update(signed_headers(payload, svc.private_key))
        return data, headers
