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
