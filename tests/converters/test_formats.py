"""The format-backend registry: one backend per format, looked up by name; no pool needed."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from torch import nn
from torch import no_grad as torch_no_grad

from converters import backends
from converters.backends import Calibration, FormatBackend, get_backend, list_formats, register_backend
from converters.backends import registry
from converters.config import ExportConfig
from converters.errors import ConvertError
from converters.results import SEAM
from converters.schemes import SCHEMES
from converters.stages import ExpertUnit
from edge_runtime.manifest import FORMATS, PRECISIONS

CONVERTERS = Path(__file__).resolve().parents[2] / "converters"


def test_registry_lists_the_manifest_formats_with_their_precisions():
    assert list_formats() == FORMATS
    assert {f: get_backend(f).precisions for f in list_formats()} == {"onnx": ("fp32", "fp16", "int8"),
                                                                      "tflite": ("fp32", "fp16", "int8")}
    for fmt in list_formats():
        backend = get_backend(fmt)
        assert backend.name == fmt and set(backend.precisions) <= set(PRECISIONS) and SEAM[fmt] == backend.seam
    assert ExportConfig(pool="p", out="o").formats == FORMATS


def test_unknown_format_names_the_registered_ones():
    with pytest.raises(ConvertError, match=r"unknown format 'coreml'; valid: tflite, onnx$"):
        get_backend("coreml")
    with pytest.raises(ConvertError, match=r"unknown format 'coreml'; valid: tflite, onnx$"):
        ExportConfig(pool="p", out="o", formats="onnx,coreml")


def test_a_registered_backend_is_what_the_export_drives(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))

    @register_backend
    class Fake(FormatBackend):
        name, title, precisions, extension, nhwc_seam, seam = "fake", "Fake", ("fp32",), "bin", False, "none"

        def fragment_bytes(self, precision, key, source, scheme):
            return b""

        def tensor_specs(self, data, key, source):
            raise NotImplementedError

        def check(self, data, what):
            pass

    assert list_formats() == (*FORMATS, "fake")
    cfg = ExportConfig(pool="p", out="o", formats="fake,onnx", precisions="fp32,int8")
    assert cfg.variants() == [("fake", "fp32"), ("onnx", "fp32"), ("onnx", "int8")]
    assert Fake(Calibration(np.zeros(1), np.zeros(1)), print).file("fp32", "tops.stage2") == \
        "fake/fp32/experts/tops.stage2.bin"
    with pytest.raises(ValueError, match="already has a backend"):
        register_backend(Fake)
    with pytest.raises(ConvertError, match="nothing to produce"):  # a precision no chosen format offers
        ExportConfig(pool="p", out="o", formats="fake", precisions="int8")


def test_calibration_is_handed_over_in_each_graphs_layout():
    cal = Calibration(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5), np.ones((2, 8, 2, 2)))
    assert cal.for_unit(None, "NCHW") is cal.images_nchw
    assert cal.for_unit(None, "NHWC").shape == (2, 4, 5, 3)
    assert cal.for_unit("tops", "NHWC").shape == (2, 2, 2, 8)


def test_onnx_backend_fragments_and_specs():
    rng = np.random.default_rng(0)
    cal = Calibration(rng.normal(size=(16, 1, 8, 8)).astype(np.float32),
                      rng.normal(size=(16, 4, 4, 4)).astype(np.float32))
    backend = backends.create_backend("onnx", cal, lambda m: None)
    library = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU())
    expert = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3))
    sources = backend.sources(library, {"tops": ExpertUnit("tops", None, expert)}, (1, 8, 8), (4, 4, 4))
    assert set(sources) == {None, "tops"}
    fp32 = backend.fragment_bytes("fp32", None, sources[None], None)
    assert fp32 == sources[None].model.SerializeToString()
    backend.check(fp32, "library")
    lib_in, lib_out = backend.tensor_specs(fp32, None, sources[None])
    assert (lib_in.layout, lib_out.layout, lib_out.shape) == ("NCHW", "NCHW", (-1, 4, 4, 4))
    int8 = backend.fragment_bytes("int8", "tops", sources["tops"], SCHEMES["per_channel"])
    backend.check(int8, "expert")
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(int8).graph.node)
    _, out = backend.tensor_specs(int8, "tops", sources["tops"])
    assert (out.dtype, out.layout, out.shape) == ("float32", "NC", (-1, 3))


def test_onnx_fp16_keeps_float32_at_the_edges_and_follows_fp32():
    """fp16 fragments: float16 weights inside, float32 input and output (the seam of every ONNX precision)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    cal = Calibration(rng.normal(size=(16, 1, 8, 8)).astype(np.float32),
                      rng.normal(size=(16, 4, 4, 4)).astype(np.float32))
    backend = backends.create_backend("onnx", cal, lambda m: None)
    library = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    expert = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3))
    sources = backend.sources(library, {"tops": ExpertUnit("tops", None, expert)}, (1, 8, 8), (4, 4, 4))
    for key, x in ((None, cal.images_nchw), ("tops", cal.features_nchw)):
        fp16 = backend.fragment_bytes("fp16", key, sources[key], None)
        assert backend.fragment_bytes("fp16", key, sources[key], None) == fp16  # same graph, same bytes
        backend.check(fp16, "fp16 fragment")
        model = onnx.load_from_string(fp16)
        elem = onnx.TensorProto.FLOAT
        assert model.graph.input[0].type.tensor_type.elem_type == elem
        assert model.graph.output[0].type.tensor_type.elem_type == elem
        assert {i.data_type for i in model.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
        spec_in, spec_out = backend.tensor_specs(fp16, key, sources[key])
        assert spec_in.dtype == spec_out.dtype == "float32"
        run = [ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {spec_in.name: x})[0]
               for b in (fp16, backend.fragment_bytes("fp32", key, sources[key], None))]
        assert run[0].dtype == np.float32
        np.testing.assert_allclose(run[0], run[1], atol=2e-2 * float(np.abs(run[1]).max()))


def test_onnx_fp16_refuses_weights_float16_cannot_hold():
    cal = Calibration(np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 4, 4, 4), np.float32))
    backend = backends.create_backend("onnx", cal, lambda m: None)
    library = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1))
    with torch_no_grad():
        library[0].weight[0, 0, 0, 0] = 1e6
    source = backend.sources(library, {}, (1, 8, 8), (4, 4, 4))[None]
    with pytest.raises(ConvertError, match=r"onnx fp16 library: weights .* exceed float16's range"):
        backend.fragment_bytes("fp16", None, source, None)


def test_no_converters_module_is_over_400_lines():
    sizes = {str(p.relative_to(CONVERTERS)): len(p.read_text().splitlines()) for p in CONVERTERS.rglob("*.py")}
    assert max(sizes.values()) <= 400, sizes
