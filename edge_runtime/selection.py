"""Which fragments a query needs: the library and one expert per requested task, nothing else.

Both the runtime (what to load) and a fetch client (what to download) ask this
question, so it is answered in one place, with errors that list the valid
tasks, formats and precisions of the bundle at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .manifest import PRECISIONS, Fragment, Manifest, ManifestError, check_choice


@dataclass(frozen=True)
class Selection:
    """The fragments of one composite query, in a stable order (library first, experts by task name)."""

    format: str
    precision: str
    library: Fragment
    experts: tuple[Fragment, ...]  # per task its first fragment (the expert, or stage 1 of a progressive one)
    stages: tuple[tuple[Fragment, ...], ...] = ()  # per task all its fragments in stage order (progressive)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(str(f.task) for f in self.experts)

    @property
    def fragments(self) -> tuple[Fragment, ...]:
        """Everything the query may run: the library and every stage of every expert."""
        return (self.library, *(f for stages in (self.stages or tuple((e,) for e in self.experts)) for f in stages))

    @property
    def class_ids(self) -> tuple[int, ...]:
        """The union of the queried classes, ascending: the order of every output column."""
        return tuple(sorted(c for f in self.experts for c in f.class_ids))

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.fragments)


def parse_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` -> sorted unique task names (order does not change a composite)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = sorted({str(t).strip() for t in items if str(t).strip()})
    if not names:
        raise ManifestError("no tasks given; name at least one primitive task, e.g. --tasks footwear,tops")
    return tuple(names)


def select(manifest: Manifest, tasks: str | Sequence[str], fmt: str, precision: str) -> Selection:
    """The library and experts for ``tasks`` in one format and precision, checked to belong together."""
    names = parse_tasks(tasks)
    unknown = [t for t in names if t not in manifest.tasks]
    if unknown:
        raise ManifestError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(sorted(manifest.tasks))}")
    check_choice("precision", precision, PRECISIONS)
    present = [p for f, p in manifest.variants() if f == fmt]
    if precision not in present:
        raise ManifestError(f"the bundle has no {fmt} {precision} fragments; {fmt} precisions present: "
                            f"{', '.join(present) or 'none'}")
    library = manifest.fragment("library", fmt, precision)
    stages = tuple(manifest.expert_stages(t, fmt, precision) for t in names)
    experts = tuple(s[0] for s in stages)
    for expert in (f for s in stages for f in s):
        if expert.library_sha256 != library.sha256:
            raise ManifestError(f"expert {expert.id!r} was built for another library "
                                f"({str(expert.library_sha256)[:12]}, bundle has {library.sha256[:12]}): "
                                f"fragments from two different pools or exports cannot be mixed")
    return Selection(fmt, precision, library, experts, stages)
