"""Errors of the conversion step; all are ValueErrors so the CLI prints one line and exits 2."""

from __future__ import annotations


class ConvertError(ValueError):
    """Bad input to a conversion (pool, calibration data, options, output directory)."""


class GateError(ConvertError):
    """A fragment or composite missed its agreement or accuracy gate; nothing was published."""
