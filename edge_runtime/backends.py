"""Which interpreter runs the fragments: found in a fixed order, or named by the user.

A device has one interpreter installed, seldom more.  ``auto`` takes the first
usable one in ``BACKENDS`` whose format the bundle has.  Known-broken
combinations are refused up front with what to install, instead of failing
deep inside the interpreter: tflite-runtime (last release 2.14) was built
against numpy 1.x and breaks under numpy 2 with "returned a result with an
exception set".
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from .manifest import ManifestError, check_choice

# Order of preference for ``auto``: maintained TFLite interpreter, legacy TFLite, ONNX Runtime.
BACKENDS = ("ai_edge_litert", "tflite_runtime", "onnxruntime")
BACKEND_CHOICES = ("auto",) + BACKENDS
BACKEND_FORMAT = {"ai_edge_litert": "tflite", "tflite_runtime": "tflite", "onnxruntime": "onnx"}
_MODULES = {"ai_edge_litert": "ai_edge_litert.interpreter", "tflite_runtime": "tflite_runtime.interpreter",
            "onnxruntime": "onnxruntime"}
PIP_NAMES = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime", "onnxruntime": "onnxruntime"}


class BackendError(ManifestError):
    """No usable interpreter for the request; the message says what to install."""


@dataclass(frozen=True)
class Backend:
    """A usable interpreter and the fragment format it runs."""

    name: str
    format: str

    def module(self) -> Any:
        return importlib.import_module(_MODULES[self.name])


def numpy_major() -> int:
    return int(np.__version__.split(".")[0])


def unusable_reason(name: str) -> str | None:
    """Why ``name`` cannot run here (not installed, or a known-broken combination); None when it can."""
    check_choice("backend", name, BACKENDS)
    top = _MODULES[name].split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{name} is not installed (pip install {PIP_NAMES[name]})"
    if name == "tflite_runtime" and numpy_major() >= 2:
        return (f"tflite-runtime was built for numpy 1.x and fails under numpy {np.__version__}: "
                f"pip install 'numpy<2', or use ai-edge-litert instead (pip install ai-edge-litert)")
    return None


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if unusable_reason(name) is None]


def resolve_backend(name: str = "auto", formats: Iterable[str] = ("tflite", "onnx")) -> Backend:
    """The backend to use for a bundle offering ``formats``; ``auto`` picks the first usable in BACKENDS."""
    check_choice("backend", name, BACKEND_CHOICES)
    formats = tuple(formats)
    if name != "auto":
        reason = unusable_reason(name)
        if reason:
            raise BackendError(reason)
        if BACKEND_FORMAT[name] not in formats:
            raise BackendError(f"backend {name} runs {BACKEND_FORMAT[name]} fragments, but the bundle has only "
                               f"{', '.join(formats) or 'none'}")
        return Backend(name, BACKEND_FORMAT[name])
    reasons = []
    for candidate in BACKENDS:
        reason = unusable_reason(candidate)
        if reason is None and BACKEND_FORMAT[candidate] in formats:
            return Backend(candidate, BACKEND_FORMAT[candidate])
        reasons.append(reason or f"{candidate}: bundle has no {BACKEND_FORMAT[candidate]} fragments")
    raise BackendError("no usable interpreter for this bundle: " + "; ".join(reasons))


def tflite_interpreter_class(name: str) -> Callable[..., Any]:
    """The ``Interpreter`` class of a TFLite backend, after the up-front checks."""
    check_choice("TFLite interpreter", name, tuple(n for n in BACKENDS if BACKEND_FORMAT[n] == "tflite"))
    reason = unusable_reason(name)
    if reason:
        raise BackendError(reason)
    return Backend(name, "tflite").module().Interpreter


def interpreter_version(name: str) -> str:
    """Installed distribution version of a backend, for benchmark records ('' when unknown)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PIP_NAMES[name])
    except PackageNotFoundError:
        return ""
