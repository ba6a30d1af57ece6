"""Pool -> device fragments: ONNX fp32/int8 and TFLite fp32/fp16/int8 with a verified manifest.

``poe-convert export`` converts, checks and measures every fragment against
its torch source and publishes the directory only when every gate passes;
``poe-convert fuse`` builds one ONNX file per query from ONNX fragments.  Each
format is one backend in ``converters.backends``, registered by format name.
This package may import ``pool_builder``; ``edge_runtime`` must never import it.
"""
