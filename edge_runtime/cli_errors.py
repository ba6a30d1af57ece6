"""How every command line of the project reports failure: one line, exit 2, traceback only with --debug.

Shared by ``edge-runtime``, ``poe-convert`` and ``pool-builder`` (the server
side imports from the device side, never the other way round).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                errors: tuple[type[BaseException], ...] = (ValueError, OSError),
                interrupted: str = "interrupted") -> int:
    """Run ``command(args)``; an expected error prints ``prog: error: ...`` and returns 2."""
    try:
        return command(args)
    except errors as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
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
