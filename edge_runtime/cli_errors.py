"""How every command line of the project reports failure: one line, exit 2, traceback only with --debug.

Shared by ``edge-runtime``, ``poe-convert`` and ``pool-builder`` (the server
side imports from the device side, never the other way round).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141  # 141 = 128 + SIGPIPE, what `cat` exits with


def _quiet_stdout() -> None:
    """The reader went away (``| head -1``): send what is still buffered nowhere, so exit is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                errors: tuple[type[BaseException], ...] = (ValueError, OSError),
                interrupted: str = "interrupted", json_errors: bool = False) -> int:
    """Run ``command(args)``; an expected error prints ``prog: error: ...`` and returns 2.

    With ``json_errors`` and ``args.json`` set, stdout also gets ``{"error": ..., "type": ..., "exit": 2}`` so a
    program reading the JSON never has to parse stderr.  A closed stdout ends the command quietly (141).
    """
    try:
        status = command(args)
        sys.stdout.flush()  # a reader that left shows up here, not in the interpreter's exit handler
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except errors as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        if json_errors and getattr(args, "json", False):
            try:
                print(json.dumps({"error": str(exc), "type": type(exc).__name__, "exit": EXIT_USAGE}), flush=True)
            except BrokenPipeError:
                _quiet_stdout()
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED


DISTRIBUTION = "pool-of-experts-edge"


def missing_extra(prog: str, extra: str, modules: tuple[str, ...]) -> int | None:
    """Exit status 2 with one line naming the extra to install when a console script's dependencies are absent.

    One distribution installs every console script, so a device that installed only ``[edge]`` still has
    ``pool-builder`` and ``poe-convert``; they must say what is missing instead of raising ModuleNotFoundError.
    The modules are imported (not only looked up), so a broken install counts as missing too.
    """
    import importlib

    absent = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    if not absent:
        return None
    print(f"{prog}: error: {', '.join(absent)} not installed: install {DISTRIBUTION}[{extra}] "
          f"(pip install '{DISTRIBUTION}[{extra}]')", file=sys.stderr)
    return EXIT_USAGE
