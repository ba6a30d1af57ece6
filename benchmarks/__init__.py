"""Standalone benchmark scripts (see benchmarks/README.md); a package so that they share benchmarks.common."""
