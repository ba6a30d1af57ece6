"""``edge-runtime verify``: the boot-time self-check of a bundle, without loading any interpreter.

A bundle holds when its manifest reads (schema version, JSON types, every
field's rules), every fragment file is present with the manifest's size and
sha256, every expert's ``library_sha256`` is a library in the bundle whose file
holds, and, for a fetched bundle, ``manifest.json`` is what the saved signed
manifest says and that signature verifies.  Each failure is one line; the
CLI exits 0 only when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .authenticity import Authenticity, authenticate
from .manifest import Manifest, ManifestError, read_manifest, verified_path


@dataclass
class VerifyReport:
    """Each check's outcome; ``ok`` only when ``problems`` is empty."""

    bundle: str
    manifest: str = "ok"
    fragments: dict[str, str] = field(default_factory=dict)  # id -> "ok" | "missing" | "checksum mismatch"
    authenticity: Authenticity | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "ok": self.ok, "manifest": self.manifest, "fragments": self.fragments,
                "authenticity": self.authenticity.to_json() if self.authenticity else None,
                "problems": list(self.problems)}


def fragment_status(root: Path, manifest: Manifest) -> tuple[dict[str, str], list[str]]:
    """Every fragment file checked (size, sha256) by streaming it; never handed to an interpreter."""
    statuses, problems = {}, []
    for frag in manifest.fragments:
        try:
            verified_path(root, frag)
            statuses[frag.id] = "ok"
        except (ManifestError, OSError) as exc:
            statuses[frag.id] = "missing" if "is missing" in str(exc) else "checksum mismatch"
            problems.append(str(exc))
    return statuses, problems


def library_fingerprints(manifest: Manifest, statuses: dict[str, str]) -> list[str]:
    """Experts whose library is absent or whose library file does not hold (the manifest's own links are
    checked when it is read)."""
    problems = []
    libraries = {(f.format, f.precision): f for f in manifest.fragments if f.role == "library"}
    for frag in manifest.fragments:
        lib = libraries.get((frag.format, frag.precision))
        if frag.role == "expert" and (lib is None or lib.sha256 != frag.library_sha256):
            problems.append(f"expert fragment {frag.id!r} was built for library {str(frag.library_sha256)[:12]}, "
                            f"not this bundle's")
        elif frag.role == "expert" and statuses.get(lib.id) != "ok":
            problems.append(f"expert fragment {frag.id!r}: its library {lib.id!r} is {statuses.get(lib.id)}")
    return problems


def verify_bundle(bundle: str | Path, public_key: Any = None) -> VerifyReport:
    """Every check ``Runtime.open`` makes, for every fragment of the bundle, plus the signature when fetched."""
    root = Path(bundle)
    report = VerifyReport(bundle=str(root))
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:
        report.manifest = "invalid"
        report.problems.append(str(exc))
        return report
    report.fragments, problems = fragment_status(root, manifest)
    report.problems += problems + library_fingerprints(manifest, report.fragments)
    report.authenticity = authenticate(root, manifest, public_key)
    report.problems += report.authenticity.problems + report.authenticity.unverifiable
    return report


def format_report(report: VerifyReport) -> str:
    """One line per problem, or one line saying what held."""
    if not report.ok:
        return "\n".join(f"{report.bundle}: {p}" for p in report.problems)
    auth = report.authenticity
    signature = f"; signature {auth.signature} (key {str(auth.key_id)[:16]})" if auth and auth.fetched else ""
    return f"{report.bundle}: ok: manifest and {len(report.fragments)} fragment(s) verified{signature}"
