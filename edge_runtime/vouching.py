"""Which saved signed manifest vouches for each fragment a fetched bundle holds.

A bundle grows query by query: ``fetch footwear`` then ``fetch tops`` (or
another format) leaves experts of both in ``manifest.json``, but each signed
answer covers only its own query.  Keeping only the last one made ``verify``
fail for experts fetched earlier.  So ``fetch`` keeps the latest document in
``signed_manifest.json`` (it vouches for the manifest's header and its own
fragments) and, in ``signed_earlier.json``, the earlier documents still needed
to vouch for the other fragments.  An earlier document may vouch for a fragment
only when it describes the same pool, classes, tasks and preprocessing as the
latest one (composites and tool notes may differ between exports).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Iterable

from .manifest import Fragment, Manifest, ManifestError

SIGNED_NAME = "signed_manifest.json"
EARLIER_NAME = "signed_earlier.json"  # {"documents": [signed document, ...]}
TRUSTED_KEY_NAME = "trusted_key.pub"  # the PEM public key a bundle is pinned to (fetch writes it)
BINDING_FIELDS = ("schema_version", "pool_id", "preprocessing", "class_names", "tasks", "seam")
FRAGMENT_FIELDS = tuple(f.name for f in fields(Fragment) if f.name != "file")  # files point into blobs/


def differing(a: Any, b: Any, names: Iterable[str]) -> list[str]:
    return [n for n in names if getattr(a, n) != getattr(b, n)]


def fragment_differences(local: Fragment, vouched: Fragment) -> list[str]:
    """The fields (file excepted) in which ``local`` differs from the signed entry."""
    return differing(local, replace(vouched, file=local.file), FRAGMENT_FIELDS)


def payload_manifest(document: Any) -> Manifest | None:
    """The manifest a saved signed document carries, or None when it carries none that reads."""
    try:
        return Manifest.from_json(document["payload"])
    except (KeyError, TypeError, ValueError):  # ManifestError is a ValueError
        return None


def voucher(frag: Fragment, latest: Manifest, earlier: Iterable[tuple[Any, Manifest]]) -> Any:
    """The first earlier document whose manifest binds like ``latest`` and lists ``frag`` unchanged, else None."""
    for document, signed in earlier:
        if differing(signed, latest, BINDING_FIELDS):
            continue
        entry = next((f for f in signed.fragments if f.id == frag.id), None)
        if entry is not None and not fragment_differences(frag, entry):
            return document
    return None


def earlier_documents(raw: Any) -> list[Any]:
    """The documents of ``signed_earlier.json``; ManifestError when the file is not that shape."""
    if not isinstance(raw, dict) or not isinstance(raw.get("documents"), list):
        raise ManifestError(f"{EARLIER_NAME} is not {{\"documents\": [...]}}; fetch again")
    return list(raw["documents"])
