"""Pool -> device fragments (ONNX, TFLite) with a verified manifest.

Not implemented yet: see the converters issue.  This package may import
``pool_builder``; ``edge_runtime`` must never import it.
"""
