"""torch -> ONNX for the library and one expert, in the two seam layouts.

ONNX fragments keep torch's NCHW features.  The graphs handed to onnx2tf end
(library) or start (expert) in NHWC instead, so that the TFLite library's
output is exactly the TFLite expert's input - no transpose at the seam, and
int8 features can pass straight through.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch
from torch import nn

OPSET = 17
IMAGE, FEATURES, LOGITS = "image", "features", "logits"


class _NHWCOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).permute(0, 2, 3, 1)


class _NHWCInput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


@dataclass(frozen=True)
class OnnxSource:
    """An exported graph plus the names and float shapes (batch = -1) of its input and output."""

    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]


def _export(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str) -> OnnxSource:
    module = module.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation on every call
        out = module(example)
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    return OnnxSource(model, input_name, (-1, *example.shape[1:]), output_name, (-1, *out.shape[1:]))


def export_library(library: nn.Module, input_chw: tuple[int, int, int], nhwc_features: bool) -> OnnxSource:
    example = torch.zeros(1, *input_chw)
    return _export(_NHWCOutput(library) if nhwc_features else library, example, IMAGE, FEATURES)


def export_expert(expert: nn.Module, features_nchw: tuple[int, int, int], nhwc_features: bool) -> OnnxSource:
    c, h, w = features_nchw
    if nhwc_features:
        return _export(_NHWCInput(expert), torch.zeros(1, h, w, c), FEATURES, LOGITS)
    return _export(expert, torch.zeros(1, c, h, w), FEATURES, LOGITS)


def export_classifier(model: nn.Module, input_chw: tuple[int, int, int]) -> OnnxSource:
    """A whole image classifier (the oracle, or a composed query as one graph): image -> logits, NCHW."""
    return _export(model, torch.zeros(1, *input_chw), IMAGE, LOGITS)
