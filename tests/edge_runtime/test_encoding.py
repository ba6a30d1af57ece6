"""The uint8 look-up table must give exactly what normalizing and quantizing each image gives."""

import numpy as np
import pytest

from edge_runtime.encoding import InputEncoder
from edge_runtime.images import InputError, normalize
from edge_runtime.manifest import Preprocessing, TensorSpec
from edge_runtime.runners import quantize, to_layout


@pytest.mark.parametrize("channels,layout,dtype", [(1, "NHWC", "int8"), (3, "NHWC", "int8"), (3, "NCHW", "uint8"),
                                                  (1, "NCHW", "float32")])
def test_table_lookup_equals_normalize_then_quantize(channels, layout, dtype):
    pre = Preprocessing(input_shape=(8, 6, channels), mean=(0.2860, 0.5, 0.1)[:channels],
                        std=(0.3530, 0.25, 0.5)[:channels])
    quantized = dtype != "float32"
    spec = TensorSpec("image", (-1, channels, 8, 6) if layout == "NCHW" else (-1, 8, 6, channels), dtype, layout,
                      0.0111093 if quantized else None, (-55 if dtype == "int8" else 100) if quantized else None)
    encoder = InputEncoder(pre, spec)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 6, channels), dtype=np.uint8)
    images[0, 0, 0] = 0
    images[0, 0, 1] = 255
    want = to_layout(quantize(normalize(images, pre), spec), "NHWC", layout)
    got = encoder(images)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    floats = images.astype(np.float32) / 255
    assert np.array_equal(encoder(floats), to_layout(quantize(normalize(floats, pre), spec), "NHWC", layout))
    with pytest.raises(InputError, match="contains NaN"):
        encoder(np.full((1, 8, 6, channels), np.nan, np.float32))
