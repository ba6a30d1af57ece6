"""Format backends by name, in the manner of timm's ``register_model``/``list_models``.

The export looks every requested format up here instead of branching on its
name, so a new format is one new backend module, and every "unknown format"
message lists exactly the formats that can be produced.
"""

from __future__ import annotations

from typing import TypeVar

from ..errors import ConvertError
from .base import Calibration, FormatBackend, Log

B = TypeVar("B", bound=type[FormatBackend])

_BACKENDS: dict[str, type[FormatBackend]] = {}


def register_backend(cls: B) -> B:
    """Class decorator: make ``cls`` the backend of the format ``cls.name``."""
    if cls.name in _BACKENDS:
        raise ValueError(f"format {cls.name!r} already has a backend ({_BACKENDS[cls.name].__name__})")
    _BACKENDS[cls.name] = cls
    return cls


def list_formats() -> tuple[str, ...]:
    """Names of the registered formats, in registration order."""
    return tuple(_BACKENDS)


def get_backend(name: str) -> type[FormatBackend]:
    """The backend class of a format; ConvertError naming the valid formats otherwise."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConvertError(f"unknown format {name!r}; valid: {', '.join(list_formats())}") from None


def create_backend(name: str, calibration: Calibration, log: Log) -> FormatBackend:
    """A fresh backend for one format and one export run."""
    return get_backend(name)(calibration, log)
