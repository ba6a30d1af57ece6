"""The output directory of an export: refuse to clobber, then swap the finished staging directory in.

Fragments are written into a hidden staging directory beside ``--out`` and put
in place by rename only when every gate passed, so a failed or killed export
never leaves half a fragment set, and a device never sees a mixed one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from edge_runtime.manifest import MANIFEST_NAME

from .errors import ConvertError


def check_output_dir(out: Path, pool_id: str, overwrite: bool) -> None:
    """Refuse to replace another pool's fragments (or any other directory) unless asked to."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            held = json.loads(manifest.read_text(encoding="utf-8")).get("pool_id")
        except (ValueError, AttributeError):
            held = "?"
        if held != pool_id and not overwrite:
            raise ConvertError(f"--out {out} holds fragments of pool {held}, not of this pool {pool_id}; "
                               "choose another --out or pass --overwrite to replace them")
    elif any(out.iterdir()):
        raise ConvertError(f"--out {out} is a non-empty directory without {MANIFEST_NAME}; "
                           "refusing to write fragments into it")


def publish(staging: Path, out: Path) -> None:
    """Put the finished staging directory in place of ``out`` (rename; the old set is removed after)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def remove_stale(out: Path) -> None:
    """Delete staging and replaced directories a killed export left beside ``out`` (caller holds the lock)."""
    for stale in list(out.parent.glob(f".{out.name}.staging-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
