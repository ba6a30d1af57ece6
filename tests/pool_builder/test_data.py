"""Data loaders on real Fashion-MNIST and on tiny files in each supported layout."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from pool_builder.data.datasets import (DataNotFoundError, load_dataset, read_idx, Normalizer)
from pool_builder.errors import PoolBuilderError, UnknownNameError


def test_fashion_mnist_real_files(fmnist_small):
    ds = fmnist_small
    assert ds.input_shape == (1, 28, 28)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert len(ds.train) == 600 and len(ds.test) == 300
    assert np.bincount(ds.train.labels).tolist() == [60] * 10  # stratified
    assert ds.mean[0] == pytest.approx(0.286, abs=0.002) and ds.std[0] == pytest.approx(0.353, abs=0.002)


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(UnknownNameError, match="valid datasets: cifar10, cifar100, fashion_mnist, image_folder"):
        load_dataset("mnist")


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_parser_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "y").write_bytes(raw[:-3])
    with pytest.raises(PoolBuilderError, match="truncated"):
        read_idx(tmp_path / "y")
    (tmp_path / "z").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(PoolBuilderError, match="bad magic"):
        read_idx(tmp_path / "z")


def _cifar_batch(n, seed, key="labels", classes=10):
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}


def test_cifar10_pickle_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, i)))
    (root / "test_batch").write_bytes(pickle.dumps(_cifar_batch(3, 9)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    ds = load_dataset("cifar10", tmp_path)  # parent folder works too
    assert ds.input_shape == (3, 32, 32) and len(ds.train) == 20 and len(ds.test) == 3
    first = _cifar_batch(4, 1)["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(ds.train.images[0], first)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3 is missing"):
        load_dataset("cifar10", root)


def test_cifar100_pickle_layout(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    (root / "train").write_bytes(pickle.dumps(_cifar_batch(6, 1, "fine_labels", 100)))
    (root / "test").write_bytes(pickle.dumps(_cifar_batch(2, 2, "fine_labels", 100)))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    ds = load_dataset("cifar100", root)
    assert ds.num_classes == 100 and len(ds.train) == 6


def test_cifar_missing_layout_explains(tmp_path):
    with pytest.raises(DataNotFoundError, match="python-pickle layout"):
        load_dataset("cifar10", tmp_path)


def test_image_folder_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    ds = load_dataset("image_folder", tmp_path)
    assert ds.class_names == ("cat", "dog") and ds.input_shape == (3, 8, 8)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and len(ds.test) == 4
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(PoolBuilderError, match="must share one size"):
        load_dataset("image_folder", tmp_path)


def _folder(root, modes):
    """ROOT/<class>/<i>.png with one file per (class, PIL mode) given."""
    from PIL import Image

    for cls, files in modes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, mode in enumerate(files):
            shape = (8, 8) if mode == "L" else (8, 8, 3)
            Image.fromarray(np.full(shape, 40 * (i + 1), np.uint8), mode).save(root / cls / f"{cls}{i}.png")
    return root


def test_image_folder_mixed_colours_refused_with_counts(tmp_path):
    # "a" sorts first and is grey: the old loader decided grey from it and silently converted the RGB files
    root = _folder(tmp_path, {"a": ["L"] * 6, "b": ["RGB"] * 5 + ["L"]})
    with pytest.raises(PoolBuilderError, match="mixes 7 grey and 5 RGB images.*--color grey or --color rgb"):
        load_dataset("image_folder", root)
    grey, rgb = load_dataset("image_folder", root, "grey"), load_dataset("image_folder", root, "rgb")
    assert grey.input_shape[0] == 1 and grey.color == "grey"
    assert rgb.input_shape[0] == 3 and rgb.color == "rgb"
    with pytest.raises(UnknownNameError, match="valid colors: grey, rgb"):
        load_dataset("image_folder", root, "gray")


def test_image_folder_uniform_colour_needs_no_flag(tmp_path):
    root = _folder(tmp_path, {"a": ["RGB"] * 6, "b": ["RGB"] * 6})
    assert load_dataset("image_folder", root).color == "rgb"


def test_image_folder_empty_class_refused(tmp_path):
    root = _folder(tmp_path, {"a": ["L"] * 6, "b": ["L"] * 6})
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("no images")
    with pytest.raises(DataNotFoundError, match=r"class folder\(s\) with no images.*/c"):
        load_dataset("image_folder", root)


def test_hold_out_is_stratified_capped_and_leaves_every_class(fmnist_small):
    rest, held = fmnist_small.train.hold_out(0.1, 5000, seed=0)
    assert len(held) == 60 and np.bincount(held.labels).tolist() == [6] * 10 and len(rest) == 540
    _, capped = fmnist_small.train.hold_out(0.1, 20, seed=0)
    assert len(capped) == 20
    assert fmnist_small.train.hold_out(0.0, 5000, seed=0)[1] is None


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="ROOT/train/<class>"):
        load_dataset("image_folder", tmp_path / "nope")


def test_normalizer_layout_and_values():
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[..., 1] = 255
    x = Normalizer((0.0, 0.5, 0.0), (1.0, 0.5, 1.0))(images)
    assert tuple(x.shape) == (2, 3, 4, 5)
    assert float(x[0, 1, 0, 0]) == pytest.approx(1.0) and float(x[0, 0, 0, 0]) == 0.0
