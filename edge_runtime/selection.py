"""Which fragments a query needs: the library and one expert per requested task, nothing else.

Both the runtime (what to load) and a fetch client (what to download) ask this
question, so it is answered in one place, with errors that list the valid
tasks, formats and precisions of the bundle at hand.  What a query *is*
(parsing, canonical form, duplicates) lives in ``query.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import PRECISIONS, Fragment, Manifest, ManifestError, check_choice
from .query import Query, QueryLike


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
    def query(self) -> Query:
        return Query(self.tasks)

    @property
    def column_order(self) -> tuple[int, ...]:
        """Where each output column comes from in the experts' concatenated logits (ascending class ids).

        The runtime and the anytime composer both reorder with it, so it is computed in one place.
        """
        concatenated = [c for f in self.experts for c in f.class_ids]
        return tuple(sorted(range(len(concatenated)), key=concatenated.__getitem__))  # stable, like np.argsort

    @property
    def class_ids(self) -> tuple[int, ...]:
        """The union of the queried classes, ascending: the order of every output column."""
        return tuple(sorted(c for f in self.experts for c in f.class_ids))

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.fragments)


def select(manifest: Manifest, tasks: QueryLike, fmt: str, precision: str) -> Selection:
    """The library and experts for ``tasks`` (a :class:`Query` or its text/list form) in one format and
    precision, checked to belong together."""
    names = Query.parse(tasks).validate(manifest.tasks).tasks
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
