"""The two registries of the model zoo: architectures by name, and architecture *kinds* by their pool.json tag.

- Named architectures (``wrn_16_2``...) are what users pick with ``--oracle-arch``
  or ``--student-arch``: ``register_model`` / ``list_models`` / ``create_model``,
  in the manner of timm's registry.
- An architecture record in ``pool.json`` (``{"kind": ..., ...}``) says how to
  rebuild a stored network.  Each kind is registered once, next to the module
  that defines it, with a ``build`` (record -> untrained module, then the state
  dict is loaded) or a ``load`` (record + file -> module, for TorchScript and
  ensembles).  ``pool_builder.models`` imports every defining module, so all
  kinds are known as soon as any part of the package is imported.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from pool_builder.errors import PoolBuilderError, unknown_name

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, tuple[ModelFactory, dict[str, Any]]] = {}

# The ``kind`` tags of architecture records (the strings are part of pool.json's format).
KIND_NAMED = "registry"  # a registered architecture by name
KIND_TORCHSCRIPT = "torchscript"  # a user's TorchScript oracle or teacher, stored as is
KIND_LIBRARY = "wrn_library"
KIND_EXPERT = "wrn_expert"
KIND_PROGRESSIVE_EXPERT = "wrn_progressive_expert"
KIND_ENSEMBLE = "ensemble"  # ensemble.json naming teacher files beside it


def register_model(name: str, factory: ModelFactory, **defaults: Any) -> None:
    """Register an architecture under ``name``; a second registration is an error."""
    if name in _MODELS:
        raise PoolBuilderError(f"architecture {name!r} is already registered")
    _MODELS[name] = (factory, defaults)


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate a registered architecture; unknown names list the valid ones."""
    if name not in _MODELS:
        raise unknown_name("architecture", name, list_models())
    factory, defaults = _MODELS[name]
    return factory(in_channels=in_channels, num_classes=num_classes, **defaults)


def named_architecture(name: str, in_channels: int, num_classes: int) -> dict[str, Any]:
    """The pool.json record of a registered architecture."""
    return {"kind": KIND_NAMED, "name": name, "in_channels": in_channels, "num_classes": num_classes}


Builder = Callable[[dict[str, Any]], nn.Module]
Loader = Callable[[dict[str, Any], Path, str], nn.Module]


@dataclass(frozen=True)
class ArchitectureKind:
    """How to rebuild a network whose record carries ``kind``: ``build`` it and load a state dict, or ``load`` it."""

    name: str
    build: Optional[Builder] = None
    load: Optional[Loader] = None


_KINDS: dict[str, ArchitectureKind] = {}


def register_kind(name: str, *, build: Builder | None = None, load: Loader | None = None) -> None:
    """Register an architecture kind; exactly one of ``build`` / ``load``."""
    if name in _KINDS:
        raise PoolBuilderError(f"architecture kind {name!r} is already registered")
    if (build is None) == (load is None):
        raise PoolBuilderError(f"architecture kind {name!r}: give either build or load")
    _KINDS[name] = ArchitectureKind(name, build, load)


def list_kinds() -> list[str]:
    return sorted(_KINDS)


def architecture_kind(arch: dict[str, Any]) -> ArchitectureKind:
    """The registered kind of a record; an unknown one lists the valid kinds."""
    kind = arch.get("kind") if isinstance(arch, dict) else None
    if kind not in _KINDS:
        raise unknown_name("architecture kind", kind, list_kinds())
    return _KINDS[kind]


register_kind(KIND_NAMED, build=lambda a: create_model(a["name"], in_channels=a["in_channels"],
                                                       num_classes=a["num_classes"]))
