"""Bad input stops an export with a clear message and leaves nothing half-written."""

import json

import numpy as np
import pytest

from converters.errors import ConvertError, GateError
from converters.export import ExportConfig, export_fragments
from pool_builder.errors import PoolFormatError


def _quiet(message):
    pass


def test_tampered_pool_file_is_refused_before_any_work(pool_copy, tmp_path):
    with open(pool_copy / "experts" / "tops.pt", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01")
    with pytest.raises(PoolFormatError, match="tops"):
        export_fragments(ExportConfig(pool=str(pool_copy), out=str(tmp_path / "f"), formats=("onnx",)), log=_quiet)
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.*"))


def test_missing_pool_file(pool_copy, tmp_path):
    (pool_copy / "library.pt").unlink()
    with pytest.raises(PoolFormatError, match="library"):
        export_fragments(ExportConfig(pool=str(pool_copy), out=str(tmp_path / "f"), formats=("onnx",)), log=_quiet)


def test_calibration_file_of_the_wrong_shape(tiny_pool_dir, tmp_path):
    bad = tmp_path / "calib.npy"
    np.save(bad, np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(ConvertError, match=r"uint8 of shape \(N, 28, 28, 1\).*got uint8 \(10, 32, 32, 3\)"):
        export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(tmp_path / "f"), formats=("onnx",),
                                      calibration_file=str(bad)), log=_quiet)
    assert not (tmp_path / "f").exists()


def test_out_dir_of_another_pool_or_foreign_content(tiny_pool_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"schema_version": 1, "pool_id": "0123456789abcdef"}))
    with pytest.raises(ConvertError, match="holds fragments of pool 0123456789abcdef.*--overwrite"):
        export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(other), formats=("onnx",)), log=_quiet)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="non-empty directory without manifest.json"):
        export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(foreign), formats=("onnx",)), log=_quiet)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_failed_gate_publishes_nothing_and_reports(tiny_pool_dir, tmp_path):
    """A zero-point tolerance with the coarsest scheme fails on this pool (measured: per-tensor int8 loses
    more than one held-out image); the summary says why, the output directory is never created."""
    summary = tmp_path / "summary.json"
    with pytest.raises(GateError, match="nothing was published"):
        export_fragments(ExportConfig(pool=str(tiny_pool_dir), out=str(tmp_path / "f"), formats=("onnx",),
                                      precisions=("int8",), schemes=("per_tensor",), max_accuracy_drop=0.0),
                         log=_quiet, summary_path=str(summary))
    report = json.loads(summary.read_text())
    assert report["ok"] is False and "onnx/int8: per_tensor" in report["failures"][0]
    assert report["schemes"]["onnx.int8"]["attempts"][0]["worst_drop_points"] > 0
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.*staging*"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(formats=("onnx",), precisions=("bf16",)), "unknown precision 'bf16'"),
    (dict(schemes=("per_channel", "int4")), "unknown quantization scheme 'int4'; valid: per_channel, per_tensor, int16_act"),
    (dict(max_accuracy_drop=-1.0), "must be >= 0"),
    (dict(eval_images=0), "must be >= 1"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExportConfig(pool="p", out="o", **kwargs)
