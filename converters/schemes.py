"""Quantization schemes the accuracy gate can choose between, safest last."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_runtime.manifest import check_choice


@dataclass(frozen=True)
class QuantScheme:
    """How int8 fragments are quantized: weight granularity and activation width."""

    name: str
    per_channel: bool
    activation_bits: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


SCHEMES = {
    "per_channel": QuantScheme("per_channel", per_channel=True, activation_bits=8),
    "per_tensor": QuantScheme("per_tensor", per_channel=False, activation_bits=8),
    "int16_act": QuantScheme("int16_act", per_channel=True, activation_bits=16),
}
# Tried in this order until the accuracy gate passes (see README: chosen by measurement).
DEFAULT_SCHEME_ORDER = ("per_channel", "per_tensor", "int16_act")


def parse_schemes(names: str | list[str] | tuple[str, ...]) -> tuple[QuantScheme, ...]:
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if not items or not all(items):
        raise ValueError(f"no quantization scheme given; valid: {', '.join(SCHEMES)}")
    return tuple(SCHEMES[check_choice("quantization scheme", n, tuple(SCHEMES))] for n in items)
