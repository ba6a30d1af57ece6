"""The service's one error type: bad flags, keys or fragment directories (the CLI prints one line, exit 2)."""

from __future__ import annotations


class ServiceError(ValueError):
    """Base class for failures caused by the operator's input or on-disk state."""
