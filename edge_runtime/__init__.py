"""Device side of Pool of Experts: numpy plus one interpreter, nothing heavier.

This package must never import torch, tensorflow, pool_builder or converters;
``tests/edge_runtime/test_lean_imports.py`` proves it in a subprocess.  The
shared on-disk helpers (atomic writes, sha256) live here so that the server
side imports them from the device side, never the other way round.
"""

__all__ = ["atomic_io"]
