"""The query service: answers devices over HTTP with signed per-query manifests, fragments and fused models.

It sits above ``converters`` (it serves their fragment directories and fuses
per-query models with them) and below nothing: ``pool_builder`` and
``edge_runtime`` never import it.  Importing the package stays cheap.
"""
