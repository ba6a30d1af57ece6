"""Primitive tasks: disjoint named class sets, and the queries built from them.

A hierarchy file is JSON mapping task name -> list of class names, e.g.
``{"footwear": ["Sandal", "Sneaker", "Ankle boot"], ...}``.  Task order in the
file is kept; class ids are the data set's.  A *query* (a set of tasks) is an
:class:`edge_runtime.query.Query`: its order does not matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from edge_runtime.manifest import TASK_NAME
from edge_runtime.query import Query, QueryError, QueryLike

from pool_builder.errors import PoolBuilderError, unknown_name

DEFAULT_HIERARCHIES: dict[str, dict[str, list[str]]] = {
    "fashion_mnist": {
        "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
        "footwear": ["Sandal", "Sneaker", "Ankle boot"],
        "bottoms": ["Trouser", "Dress"],
        "bags": ["Bag"],
    },
    "cifar10": {
        "vehicles": ["airplane", "automobile", "ship", "truck"],
        "pets": ["cat", "dog"],
        "wildlife": ["bird", "deer", "frog", "horse"],
    },
}


@dataclass(frozen=True)
class TaskHierarchy:
    """Validated primitive tasks over a data set's classes."""

    class_names: tuple[str, ...]
    tasks: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[str]], class_names: Sequence[str]) -> "TaskHierarchy":
        """Validate names, class membership and disjointness."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise PoolBuilderError("a hierarchy must be a non-empty JSON object: task name -> list of class names")
        index = {name: i for i, name in enumerate(class_names)}
        owner: dict[str, str] = {}
        tasks = []
        for task, members in mapping.items():
            if not isinstance(task, str) or not TASK_NAME.match(task) or ".." in task:  # the device's rule too
                raise PoolBuilderError(f"invalid task name {task!r}: use 1-64 letters, digits, '_', '-' or '.', "
                                       "starting with a letter or digit (no '..')")
            if isinstance(members, str):
                raise PoolBuilderError(f"task {task!r} must be a list of class names, got the string {members!r} "
                                       f"(write {json.dumps([members])})")
            if not isinstance(members, Sequence) or not members:
                raise PoolBuilderError(f"task {task!r} must list at least one class name, got {members!r}")
            ids = []
            for raw in members:
                member = class_name(raw, task)
                if member not in index:
                    raise unknown_name("class", member, list(class_names))
                if owner.get(member) == task:
                    raise PoolBuilderError(f"class {member!r} is listed twice in task {task!r}")
                if member in owner:
                    raise PoolBuilderError(
                        f"tasks must be disjoint: class {member!r} is in both {owner[member]!r} and {task!r}")
                owner[member] = task
                ids.append(index[member])
            tasks.append((task, tuple(sorted(ids))))
        return cls(tuple(class_names), tuple(tasks))

    @classmethod
    def from_json(cls, path: str | Path, class_names: Sequence[str]) -> "TaskHierarchy":
        """Read and validate a hierarchy file."""
        try:
            mapping = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PoolBuilderError(f"hierarchy file {path} not found") from exc
        except json.JSONDecodeError as exc:
            raise PoolBuilderError(f"hierarchy file {path} is not valid JSON: {exc}") from exc
        return cls.from_mapping(mapping, class_names)

    @classmethod
    def default_for(cls, dataset: str, class_names: Sequence[str]) -> "TaskHierarchy":
        """The built-in hierarchy of a data set; others need ``--hierarchy FILE``."""
        if dataset not in DEFAULT_HIERARCHIES:
            raise PoolBuilderError(
                f"no built-in task hierarchy for {dataset!r} (built-in: {', '.join(sorted(DEFAULT_HIERARCHIES))}); "
                "pass --hierarchy FILE with a JSON object mapping task name -> class names")
        return cls.from_mapping(DEFAULT_HIERARCHIES[dataset], class_names)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tasks)

    def class_ids(self, task: str) -> tuple[int, ...]:
        """Global class ids of one task."""
        for name, ids in self.tasks:
            if name == task:
                return ids
        raise unknown_name("task", task, list(self.task_names))

    def to_json(self) -> dict[str, list[int]]:
        return {name: list(ids) for name, ids in self.tasks}

    def resolve_query(self, tasks: QueryLike) -> tuple[str, ...]:
        """Parse ``"a,b"`` or ``["a", "b"]`` into validated task names, in the query's canonical (sorted) order.

        The rules are :class:`edge_runtime.query.Query`'s, shared with the converters, the service and the
        device: order does not matter, duplicates and unknown tasks are refused with the valid names listed.
        """
        try:
            return Query.parse(tasks).validate(self.task_names).tasks
        except QueryError as exc:
            raise PoolBuilderError(str(exc)) from None

    def union_class_ids(self, tasks: Sequence[str]) -> tuple[int, ...]:
        """Sorted global class ids covered by a query."""
        return tuple(sorted(i for t in tasks for i in self.class_ids(t)))

    def task_of_class(self) -> dict[int, str]:
        return {i: name for name, ids in self.tasks for i in ids}

    def uncovered(self) -> tuple[str, ...]:
        """Class names no task lists: no composed model can ever answer them."""
        owned = self.task_of_class()
        return tuple(name for i, name in enumerate(self.class_names) if i not in owned)


def class_name(raw: object, task: str) -> str:
    """A class name from a hierarchy file: a string, or a JSON integer read as its digits (folders named 0..9)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise PoolBuilderError(f"task {task!r} lists {json.dumps(raw)}: class names must be strings "
                           "(or integers, read as folder names like \"3\")")
