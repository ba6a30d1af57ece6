"""Saving, loading and rebuilding the networks of a pool from their architecture records."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.atomic_io import atomic_write_bytes, sha256_bytes

from pool_builder.errors import PoolBuilderError, PoolFormatError
from pool_builder.models.registry import (KIND_TORCHSCRIPT, architecture_kind, list_models, named_architecture,
                                          register_kind)


def state_dict_bytes(module: nn.Module) -> bytes:
    """A module's state dict serialised exactly as it is stored in a pool (same weights, same bytes)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, buffer)
    return buffer.getvalue()


def save_state_dict(module: nn.Module, path: str | Path) -> str:
    """Write a module's state dict atomically; returns the file's sha256."""
    data = state_dict_bytes(module)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict read with ``weights_only=True`` (no pickled code runs)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for bad files
        raise PoolFormatError(f"{path} is not a readable torch weights file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PoolFormatError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Strictly load ``state`` into ``module``; mismatches become one readable error."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PoolBuilderError(f"{what}: weights do not fit the architecture ({' '.join(first[:3])[:400]})") from exc
    return module.eval()


def build_module(arch: dict[str, Any]) -> nn.Module:
    """An untrained module from an architecture record of ``pool.json`` (kinds that are built, not loaded)."""
    kind = architecture_kind(arch)
    if kind.build is None:
        raise PoolBuilderError(f"architecture kind {kind.name!r} is loaded from its file, not built")
    return kind.build(arch)


def load_module(arch: dict[str, Any], path: str | Path, what: str) -> nn.Module:
    """Rebuild a module and load its (already verified) weights."""
    kind = architecture_kind(arch)
    if kind.load is not None:
        return kind.load(arch, Path(path), what)
    return load_into(kind.build(arch), load_state_dict(path), what)


def load_torchscript(path: str | Path, what: str) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch.jit raises RuntimeError or ValueError subclasses
        raise PoolBuilderError(
            f"{what} {path} is not a TorchScript file ({str(exc).splitlines()[0][:200]}); "
            f"for a state dict pass --oracle-arch NAME (--teacher-archs for teachers; "
            f"valid: {', '.join(list_models())})") from exc


def load_user_oracle(path: str | Path, arch_name: str | None, input_shape: tuple[int, int, int],
                     num_classes: int, what: str = "oracle") -> tuple[nn.Module, dict[str, Any]]:
    """The user's oracle or teacher (TorchScript, or state dict + registered architecture), checked for output width."""
    path = Path(path)
    if not path.is_file():
        raise PoolBuilderError(f"{what} file {path} not found")
    if arch_name:
        arch = named_architecture(arch_name, input_shape[0], num_classes)
        model = load_into(build_module(arch), load_state_dict(path), f"{what} {path}")
    else:
        arch = {"kind": KIND_TORCHSCRIPT}
        model = load_torchscript(path, what)
    check_output_width(model, input_shape, num_classes, f"{what} {path}")
    return model, arch


def check_output_width(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, what: str) -> None:
    """Run two blank images through ``model``; its logits must be (2, num_classes)."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # a user model can raise anything on the wrong input shape
        raise PoolBuilderError(f"{what} fails on input of shape (N, {', '.join(map(str, input_shape))}): {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PoolBuilderError(
            f"{what} outputs {got} for 2 images, but the data set has {num_classes} classes "
            f"(expected (2, {num_classes}))")


register_kind(KIND_TORCHSCRIPT, load=lambda _arch, path, what: load_torchscript(path, what))
