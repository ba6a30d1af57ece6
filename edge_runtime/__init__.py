"""Device side of Pool of Experts: numpy plus one interpreter, nothing heavier.

``Runtime.open(bundle_dir, tasks=[...])`` (any form ``Query.parse`` accepts:
one canonical ``Query`` type, task order irrelevant) verifies and loads only
the library and the requested experts, and ``predict(images)`` composes them;
``edge-runtime fetch`` (``fetch``, ``download``, ``signing``) brings a bundle
up to date from the query service with the standard library's HTTP.  This
package must never import torch, tensorflow, pool_builder or converters;
``tests/edge_runtime/test_lean_imports.py`` proves it in a subprocess.  The
shared on-disk helpers (atomic writes, sha256) and the manifest schema live
here so that the server side imports them from the device side, never the
other way round.
"""

from .query import Query, QueryError
from .runtime import Prediction, Runtime

__all__ = ["Prediction", "Query", "QueryError", "Runtime"]
