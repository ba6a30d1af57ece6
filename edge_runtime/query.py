"""One composite query: which primitive tasks' experts are composed, in one canonical form.

Every place that takes a query (``Runtime.open``, ``select``, ``edge-runtime
run|bench|fetch``) parses it here, so "which tasks, and is that a valid
request" has one answer and one set of error messages.

Decisions (issue 17):

* Task ORDER DOES NOT MATTER.  The composite places every expert's logits at
  its global class ids and orders the columns by class id, so "a,b" and
  "b,a" are the same model; a ``Query`` holds its tasks sorted, and equal
  queries compare and hash equal.
* The canonical form is the sorted task names joined by "," (``str(query)``);
  it names the query in manifests, reports and caches.
* Duplicates are refused, naming the duplicate: "a,a" is almost always a
  typo for another task, and silently dropping it would hide that.  Empty
  queries and empty items ("a,,b", a stray trailing comma) are refused too.
* Task names follow the hierarchy's rule ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$``
  (``manifest.TASK_NAME``), and like every name the manifest accepts they may
  not contain "..": they become parts of file names and URLs.

``QueryError`` subclasses ``ManifestError`` (itself a ``ValueError``) so the
handlers that already turn ``ManifestError`` into "one line, exit 2" in the
CLIs and the query service keep doing so for bad queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Iterator, Union

from .manifest import ManifestError, check_name

EXAMPLE = "footwear,tops"


class QueryError(ManifestError):
    """A query that cannot be answered as written; ``valid`` holds the task names it may use, when known."""

    def __init__(self, message: str, valid: Iterable[str] = (), reason: str | None = None) -> None:
        super().__init__(message)
        self.valid = tuple(sorted(valid))
        self.reason = reason or message  # the message without the list of valid names (for {"error", "valid"})


@dataclass(frozen=True)
class Query:
    """The task names of one composite query, sorted and unique (see the module docstring for why)."""

    tasks: tuple[str, ...]

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
            raise QueryError(f"Query(tasks=...) takes a sequence of task names, got {type(tasks).__name__}; "
                             "use Query.parse for text like 'footwear,tops'")
        object.__setattr__(self, "tasks", _checked(list(tasks), shown=",".join(map(str, tasks))))

    @classmethod
    def parse(cls, value: "QueryLike") -> "Query":
        """``"a,b"``, ``" a , b "``, ``["a", "b"]``, ``("a", "b")`` or a ``Query`` -> a ``Query``."""
        if isinstance(value, Query):
            return value
        if isinstance(value, str):
            return cls(tuple(t.strip() for t in value.split(","))) if value.strip() else cls(())
        if isinstance(value, (bytes, bytearray)) or not isinstance(value, Sequence):
            raise QueryError(f"a query is a comma-separated string or a list of task names (e.g. {EXAMPLE!r}), "
                             f"got {type(value).__name__}")
        bad = [t for t in value if not isinstance(t, str)]
        if bad:
            raise QueryError(f"task names must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
        return cls(tuple(t.strip() for t in value))

    @property
    def canonical(self) -> str:
        """The sorted task names joined by ","; equal queries have equal canonical forms."""
        return ",".join(self.tasks)

    def __str__(self) -> str:
        return self.canonical

    def __iter__(self) -> Iterator[str]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def validate(self, valid_tasks: Iterable[str]) -> "Query":
        """``self`` if every task is one of ``valid_tasks``; else an error naming the unknown and the valid ones."""
        valid = sorted(set(valid_tasks))
        unknown = [t for t in self.tasks if t not in valid]
        if unknown:
            reason = f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
            raise QueryError(f"{reason}; valid: {', '.join(valid)}", valid, reason)
        return self


QueryLike = Union[Query, str, Sequence[str]]


def _checked(names: list[object], shown: str) -> tuple[str, ...]:
    """Sorted, validated task names; ``shown`` is the query as the user wrote it, for messages."""
    if not names or all(isinstance(n, str) and not n.strip() for n in names):
        raise QueryError(f"no tasks given; name at least one primitive task, e.g. --tasks {EXAMPLE}")
    seen: set[str] = set()
    for name in names:
        if isinstance(name, str) and not name:
            raise QueryError(f"empty task name in query {shown!r} (a stray comma?)")
        try:
            task = check_name("task name", name)
        except ManifestError as exc:
            raise QueryError(str(exc)) from None
        if task in seen:
            raise QueryError(f"duplicate task {task!r} in query {shown!r}; name each task once")
        seen.add(task)
    return tuple(sorted(seen))


__all__ = ["Query", "QueryError", "QueryLike"]
