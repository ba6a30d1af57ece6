"""What every format backend provides, so that the export drives all formats through one interface.

A backend turns the torch-exported ONNX graph of the library or of one expert
unit into the bytes of one fragment file per precision, reads back the tensor
specs the manifest records for it, and runs the structural checks a file of its
format must pass before it is listed.  One backend instance serves one format
for one export run, so per-run caches (onnx2tf runs) live and die with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from edge_runtime.manifest import Fragment, TensorSpec
from edge_runtime.runners import to_layout

from ..agreement import Reference
from ..onnx_export import OnnxSource, export_expert, export_library
from ..schemes import QuantScheme
from ..stages import ExpertUnit

Log = Callable[[str], None]
UnitKey = Optional[str]  # None: the library; otherwise an expert unit's key (``tops`` or ``tops.stage2``)


@dataclass(frozen=True)
class Calibration:
    """Float NCHW inputs that int8 conversions calibrate on: images for the library, its torch features for experts."""

    images_nchw: np.ndarray
    features_nchw: np.ndarray

    def for_unit(self, key: UnitKey, layout: str) -> np.ndarray:
        """The calibration inputs of one graph, in the layout that graph receives."""
        data = self.images_nchw if key is None else self.features_nchw
        return to_layout(data, "NCHW", layout)


class FormatBackend(ABC):
    """One fragment format: its precisions, file names, conversion, tensor specs and checks."""

    name: ClassVar[str]  # the format's name in the manifest, on the command line and in file paths
    title: ClassVar[str]  # how messages spell it
    precisions: ClassVar[tuple[str, ...]]  # the precisions it can produce
    extension: ClassVar[str]
    nhwc_seam: ClassVar[bool]  # whether library output / expert input are NHWC (else torch's NCHW)
    seam: ClassVar[str]  # the manifest's description of how its library and experts join
    second_runtime: ClassVar[str | None] = None  # a device runtime its fragments are cross-checked in

    def __init__(self, calibration: Calibration, log: Log) -> None:
        self.calibration = calibration
        self.log = log

    def wanted(self, precisions: Sequence[str]) -> list[str]:
        """Those of the requested precisions this format offers, in the requested order."""
        return [p for p in precisions if p in self.precisions]

    def sources(self, library: nn.Module, units: Mapping[str, ExpertUnit], input_chw: tuple[int, ...],
                feature_chw: tuple[int, ...]) -> dict[UnitKey, OnnxSource]:
        """ONNX graphs of the library (key None) and of every expert unit, in this format's seam layout."""
        sources: dict[UnitKey, OnnxSource] = {None: export_library(library, input_chw, self.nhwc_seam)}
        for key, unit in units.items():
            sources[key] = export_expert(unit.module, feature_chw, self.nhwc_seam)
        return sources

    def file(self, precision: str, key: UnitKey) -> str:
        """Relative path of a fragment inside the fragment directory."""
        return f"{self.name}/{precision}/" + ("library" if key is None else f"experts/{key}") + f".{self.extension}"

    @abstractmethod
    def fragment_bytes(self, precision: str, key: UnitKey, source: OnnxSource, scheme: QuantScheme | None) -> bytes:
        """The file contents of one fragment (``scheme`` is set for int8 only)."""

    @abstractmethod
    def tensor_specs(self, data: bytes, key: UnitKey, source: OnnxSource) -> tuple[TensorSpec, TensorSpec]:
        """Input and output specs of a fragment, as the device runtime will see them."""

    @abstractmethod
    def check(self, data: bytes, what: str) -> None:
        """Raise ConvertError unless the file is one a device runtime can load; ``what`` names it in the message."""

    @classmethod
    def cross_check(cls, fragments_dir: Path, fragments: Sequence[Fragment], ref: Reference,
                    threads: int | None) -> list[str]:
        """Failures of this format's written fragments in ``second_runtime``; none when it has none."""
        return []
