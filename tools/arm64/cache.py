"""Content-keyed cache folders that are either complete or absent.

A folder is named after a hash of everything that determines its content and
is built in a temporary sibling, stamped, then renamed into place: a killed
build leaves only a temporary folder (removed on the next run), and a folder
without its stamp is never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

STAMP = ".complete.json"


def inputs_key(inputs: dict[str, Any]) -> str:
    """Short hex digest of a JSON-able description of what goes into a folder."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def is_complete(folder: Path, inputs: dict[str, Any]) -> bool:
    """True only when ``folder`` carries a stamp naming exactly these inputs."""
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8")) == inputs
    except (OSError, ValueError):
        return False


def cached_folder(root: Path, name: str, inputs: dict[str, Any], build: Callable[[Path], None],
                  log: Callable[[str], None] = lambda m: None) -> Path:
    """``root/<name>-<key>``, built by ``build(tmp_folder)`` unless a complete copy is already there."""
    inputs = json.loads(json.dumps(inputs))  # the form it is compared in after a round trip
    final = Path(root) / f"{name}-{inputs_key(inputs)}"
    if is_complete(final, inputs):
        log(f"cached: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in [final, *final.parent.glob(f".{final.name}.*.tmp")]:
        if stale.exists():  # a half-built folder (no stamp) or a killed build's temporary
            shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        (tmp / STAMP).write_text(json.dumps(inputs, sort_keys=True), encoding="utf-8")
        try:
            tmp.rename(final)
        except OSError:
            if not is_complete(final, inputs):  # not a concurrent run finishing the same folder first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
