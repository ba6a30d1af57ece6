"""Load a verified fragment and prove it runs, or refuse it in one line that names it.

A file can match its manifest checksum and still be unusable (a manifest
written for damaged bytes, a converter bug): interpreters then fail in their
own words - XNNPACK ``RuntimeError``, onnxruntime ``InvalidProtobuf`` /
``InvalidArgument`` (which are not even ``RuntimeError``s), and onnxruntime
prints an "EP Error" banner on stdout first.  Here the banner is kept off
stdout (a ``--json`` reader must see only JSON), each of those exceptions
becomes a :class:`ManifestError` naming the fragment, and one batch-1 call on
zeros runs at load, so a fragment that builds but cannot invoke fails at boot,
not on the first camera frame; that call also warms the interpreter up.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .manifest import Fragment, ManifestError
from .runners import Runner, open_runner

_ORT_ERRORS = ("Fail", "InvalidArgument", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "RuntimeException",
               "EPFail", "NotImplemented", "ModelLoadCanceled")


def interpreter_errors() -> tuple[type[BaseException], ...]:
    """What interpreters raise on bytes they cannot use (onnxruntime's classes only if it is already imported)."""
    errors: list[type[BaseException]] = [RuntimeError, ValueError, TypeError, IndexError, MemoryError]
    state = sys.modules.get("onnxruntime.capi.onnxruntime_pybind11_state")
    if state is not None:
        errors += [c for c in (getattr(state, n, None) for n in _ORT_ERRORS) if isinstance(c, type)]
    return tuple(errors)


def trial_input(fragment: Fragment) -> np.ndarray:
    """A batch-1 tensor of the fragment's input dtype and shape, all zero-point (a real value every model accepts)."""
    spec = fragment.inputs[0]
    shape = [1 if d < 0 else d for d in spec.shape]
    shape[0] = 1
    return np.full(shape, spec.zero_point or 0, dtype=np.dtype(spec.dtype))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def load_runner(bundle: str | Path, fragment: Fragment, threads: int | None = None, backend: str | None = None,
                providers: Sequence[str] | None = None, trial: bool = True) -> Runner:
    """``open_runner`` (read once, checksum in memory, load those bytes), then one trial call; interpreter
    failures become one ``ManifestError`` naming the fragment and the interpreter's reason."""
    banner = io.StringIO()
    try:
        with contextlib.redirect_stdout(banner):
            runner = open_runner(bundle, fragment, threads, backend, providers)
            if trial:
                runner.run_raw(trial_input(fragment))
    except ManifestError:
        raise
    except interpreter_errors() as exc:
        raise ManifestError(f"fragment {fragment.id!r} matches its checksum but {backend or 'the interpreter'} "
                            f"cannot run it ({_one_line(exc)}); the bundle is damaged or was exported wrongly: "
                            f"export or fetch it again") from None
    return runner
