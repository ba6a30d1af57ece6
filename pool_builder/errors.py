"""Exception types whose messages name what was wrong and the valid choices.

Every user-facing failure derives from :class:`PoolBuilderError` (a
``ValueError``), so the CLI can print one line and exit 2 for all of them.
"""

from __future__ import annotations


class PoolBuilderError(ValueError):
    """Base class for errors caused by user input or on-disk state."""


class DataNotFoundError(PoolBuilderError, FileNotFoundError):
    """A data set is missing or not in the expected layout."""


class UnknownNameError(PoolBuilderError, KeyError):
    """A name (task, class, architecture, profile...) is not one of the valid choices."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class PoolFormatError(PoolBuilderError):
    """A pool directory is incomplete, tampered with or from another schema version."""


def plural(noun: str) -> str:
    """English plural of the nouns these messages use ("class" -> "classes", "task" -> "tasks")."""
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x", "z")) else "s")


def unknown_name(kind: str, name: object, valid: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build the standard "unknown X 'y'; valid Xs: a, b, c" error."""
    choices = ", ".join(sorted(str(v) for v in valid)) or "(none)"
    return UnknownNameError(f"unknown {kind} {name!r}; valid {plural(kind)}: {choices}")
