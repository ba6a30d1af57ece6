"""Fragment formats, one backend per format, registered by name (see ``registry``).

Importing the package registers the built-in backends in the order of
``edge_runtime.manifest.FORMATS`` (tflite, onnx), which is the order messages
and defaults list them in.
"""

from __future__ import annotations

from .base import Calibration, FormatBackend, UnitKey
from .registry import create_backend, get_backend, list_formats, register_backend

from . import tflite_backend, onnx_backend  # noqa: E402,F401  (registers them; order = FORMATS)

__all__ = ["Calibration", "FormatBackend", "UnitKey", "create_backend", "get_backend", "list_formats",
           "register_backend"]
