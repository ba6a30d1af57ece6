"""Image classification data sets read from the files users actually have.

Supported layouts (all local; nothing is downloaded):
- ``fashion_mnist``: the four IDX files (``.gz`` or plain), as installed by
  Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``;
- ``cifar10`` / ``cifar100``: the standard python-pickle batches;
- ``image_folder``: ``ROOT/train/<class>/*.png`` and ``ROOT/test/<class>/*``
  (or only ``ROOT/<class>/*``, split deterministically) read with Pillow.

Images are kept as uint8 NHWC arrays; :class:`Normalizer` turns a batch into the
float NCHW tensor the models eat, with the mean/std recorded in ``pool.json``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from pool_builder.errors import DataNotFoundError, PoolBuilderError, unknown_name

if TYPE_CHECKING:  # torch is imported lazily so that reading data stays cheap
    import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Split:
    """Images (uint8, N×H×W×C) and integer labels of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise PoolBuilderError(f"images must be uint8 N×H×W×C, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise PoolBuilderError(f"{len(self.labels)} labels for {self.images.shape[0]} images")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: np.ndarray) -> "Split":
        return Split(self.images[indices], self.labels[indices])

    def stratified(self, limit: int | None, seed: int) -> "Split":
        """At most ``limit`` images, the same share from every class, chosen by ``seed``."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise PoolBuilderError(f"a split limit must be >= 1, got {limit}")
        rng = np.random.default_rng(seed)
        classes = np.unique(self.labels)
        per_class = max(1, limit // len(classes))
        chosen = [rng.permutation(np.flatnonzero(self.labels == c))[:per_class] for c in classes]
        picked = np.sort(np.concatenate(chosen))
        return self.subset(picked)

    def hold_out(self, share: float, cap: int, seed: int) -> tuple["Split", "Split | None"]:
        """(rest, held-out) with ``share`` of every class held out (at most ``cap`` images in all, and at
        least one image of each class left in the rest); ``share`` 0 holds nothing out."""
        if share <= 0 or len(self) == 0:
            return self, None
        share = min(share, cap / len(self))
        rng = np.random.default_rng(seed)
        held = []
        for c in np.unique(self.labels):
            rows = rng.permutation(np.flatnonzero(self.labels == c))
            held.append(rows[:min(len(rows) - 1, int(share * len(rows) + 0.5))])
        picked = np.sort(np.concatenate(held))
        if len(picked) == 0:
            return self, None
        keep = np.setdiff1d(np.arange(len(self)), picked)
        return self.subset(keep), self.subset(picked)


@dataclass
class Dataset:
    """A named data set with its class names and per-channel statistics."""

    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    color: str | None = None  # image_folder: "grey" or "rgb" as read (recorded so reloads read the same)

    def __post_init__(self) -> None:
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise PoolBuilderError(
                f"train images {self.train.images.shape[1:]} and test images {self.test.images.shape[1:]} differ in shape")
        n = len(self.class_names)
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= n):
                raise PoolBuilderError(f"{split_name} labels fall outside 0..{n - 1}")
        if not self.mean:
            pixels = self.train.images.reshape(-1, self.train.images.shape[-1]).astype(np.float64) / 255.0
            self.mean = tuple(round(float(v), 4) for v in pixels.mean(0))
            self.std = tuple(round(float(max(v, 1e-3)), 4) for v in pixels.std(0))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image as the models see it."""
        _, h, w, c = self.train.images.shape
        return (c, h, w)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def limited(self, train_limit: int | None, test_limit: int | None, seed: int) -> "Dataset":
        """A stratified subset, keeping the full data's normalisation statistics."""
        return Dataset(self.name, self.class_names, self.train.stratified(train_limit, seed),
                       self.test.stratified(test_limit, seed + 1), self.mean, self.std, self.color)


# --------------------------------------------------------------------------- IDX (MNIST family)

def _open_maybe_gz(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read()


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (uint8 payload) into an array of its declared shape."""
    raw = _open_maybe_gz(Path(path))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise PoolBuilderError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise PoolBuilderError(f"{path}: only uint8 IDX files are supported (type code {raw[2]:#x})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if payload.size != expected:
        raise PoolBuilderError(f"{path} is truncated: {payload.size} of {expected} values")
    return payload.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(data_dir: str | Path | None = None) -> Dataset:
    """Fashion-MNIST from its four IDX files."""
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find_idx(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(m + '.gz' for m in missing)}); "
            "install it with `sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR "
            "pointing at a folder with the four IDX files")
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    return Dataset("fashion_mnist", FASHION_MNIST_CLASSES,
                   Split(train_x[..., None].copy(), train_y.copy()), Split(test_x[..., None].copy(), test_y.copy()))


# --------------------------------------------------------------------------- CIFAR pickles

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def _cifar_root(data_dir: Path, sub: str, marker: str) -> Path:
    for candidate in (data_dir, data_dir / sub):
        if (candidate / marker).is_file():
            return candidate
    raise DataNotFoundError(
        f"CIFAR data not found in {data_dir}: expected the python-pickle layout "
        f"({sub}/ with {marker}, ...), as extracted from the official {sub.replace('-batches-py', '')}-python.tar.gz; "
        "pass --data-dir DIR")


def _cifar_images(batch: dict) -> np.ndarray:
    return np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def load_cifar10(data_dir: str | Path | None) -> Dataset:
    """CIFAR-10 from ``data_batch_1..5``, ``test_batch`` and ``batches.meta``."""
    if data_dir is None:
        raise DataNotFoundError("CIFAR-10 needs --data-dir pointing at the extracted cifar-10-batches-py folder")
    root = _cifar_root(Path(data_dir), "cifar-10-batches-py", "batches.meta")
    batches = []
    for i in range(1, 6):
        path = root / f"data_batch_{i}"
        if not path.is_file():
            raise DataNotFoundError(f"CIFAR-10 layout incomplete: {path} is missing")
        batches.append(_unpickle(path))
    if not (root / "test_batch").is_file():
        raise DataNotFoundError(f"CIFAR-10 layout incomplete: {root / 'test_batch'} is missing")
    test = _unpickle(root / "test_batch")
    names = tuple(_unpickle(root / "batches.meta")["label_names"])
    train = Split(np.concatenate([_cifar_images(b) for b in batches]),
                  np.concatenate([np.asarray(b["labels"]) for b in batches]))
    return Dataset("cifar10", names, train, Split(_cifar_images(test), np.asarray(test["labels"])))


def load_cifar100(data_dir: str | Path | None) -> Dataset:
    """CIFAR-100 (fine labels) from ``train``, ``test`` and ``meta``."""
    if data_dir is None:
        raise DataNotFoundError("CIFAR-100 needs --data-dir pointing at the extracted cifar-100-python folder")
    root = _cifar_root(Path(data_dir), "cifar-100-python", "meta")
    for name in ("train", "test"):
        if not (root / name).is_file():
            raise DataNotFoundError(f"CIFAR-100 layout incomplete: {root / name} is missing")
    train, test = _unpickle(root / "train"), _unpickle(root / "test")
    names = tuple(_unpickle(root / "meta")["fine_label_names"])
    return Dataset("cifar100", names,
                   Split(_cifar_images(train), np.asarray(train["fine_labels"])),
                   Split(_cifar_images(test), np.asarray(test["fine_labels"])))


# --------------------------------------------------------------------------- image folder

COLORS = ("grey", "rgb")
_GREY_MODES = ("L", "LA", "1", "I;16", "I", "F")  # Pillow modes read as one channel


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _pillow():  # type: ignore[no-untyped-def]
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataNotFoundError("the image_folder data set needs Pillow: pip install Pillow") from exc
    return Image


def folder_color(files: list[Path], color: str | None, root: Path) -> str:
    """The colour every image is read in: ``color`` when given, else the one all files share.

    Mixed grey and RGB files are refused with a count of each, so that the result
    never depends on which file happens to sort first.
    """
    if color is not None:
        if color not in COLORS:
            raise unknown_name("color", color, list(COLORS))
        return color
    image = _pillow()
    grey: list[Path] = []
    rgb: list[Path] = []
    for path in files:
        with image.open(path) as img:  # reads the header only
            (grey if img.mode in _GREY_MODES else rgb).append(path)
    if grey and rgb:
        raise PoolBuilderError(
            f"image folder {root} mixes {len(grey)} grey and {len(rgb)} RGB images (e.g. {grey[0]} and {rgb[0]}); "
            "pass --color grey or --color rgb to convert them all to one")
    return "rgb" if rgb else "grey"


def _read_images(files: list[Path], color: str) -> np.ndarray:
    image = _pillow()
    mode = "L" if color == "grey" else "RGB"
    arrays = []
    for path in files:
        with image.open(path) as img:
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
        if arrays[-1].shape != arrays[0].shape:
            raise PoolBuilderError(
                f"image_folder images must share one size: {path} is {arrays[-1].shape[:2]}, "
                f"{files[0]} is {arrays[0].shape[:2]}")
    return np.stack(arrays)


def _held_out(path: Path, test_fraction: float) -> bool:
    digest = hashlib.sha256(path.name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < test_fraction


def _refuse_empty(folders: list[Path]) -> None:
    """An empty class folder is a mistake (a failed copy, a typo); a class without images cannot be learnt."""
    empty = [str(f) for f in folders if f.is_dir() and not _image_files(f)]
    if empty:
        raise DataNotFoundError(f"class folder(s) with no images ({', '.join(IMAGE_SUFFIXES)}): {', '.join(empty)}; "
                                "add images or remove the folder")


def load_image_folder(data_dir: str | Path | None, test_fraction: float = 0.2, color: str | None = None) -> Dataset:
    """One sub-folder per class, under ``train/`` and ``test/`` or directly under the root.

    ``color`` ("grey" or "rgb") converts every image; without it all images must share one.
    """
    if data_dir is None or not Path(data_dir).is_dir():
        raise DataNotFoundError(
            f"image folder {data_dir!r} not found: expected ROOT/train/<class>/*.png and ROOT/test/<class>/*.png "
            "(or ROOT/<class>/*.png, split by file name); pass --data-dir ROOT")
    root = Path(data_dir)
    split_dirs = {"train": root / "train", "test": root / "test"}
    if all(p.is_dir() for p in split_dirs.values()):
        class_names = tuple(p.name for p in _class_dirs(split_dirs["train"]))
        _refuse_empty([split_dirs[s] / c for s in split_dirs for c in class_names])
        listing = {s: [(f, i) for i, c in enumerate(class_names) for f in _image_files(d / c)]
                   for s, d in split_dirs.items()}
        unknown = sorted({p.name for p in _class_dirs(split_dirs["test"])} - set(class_names))
        if unknown:
            raise PoolBuilderError(f"test classes {unknown} have no train folder; train classes: {list(class_names)}")
    else:
        class_names = tuple(p.name for p in _class_dirs(root))
        _refuse_empty([root / c for c in class_names])
        files = [(f, i) for i, c in enumerate(class_names) for f in _image_files(root / c)]
        listing = {"train": [x for x in files if not _held_out(x[0], test_fraction)],
                   "test": [x for x in files if _held_out(x[0], test_fraction)]}
    if len(class_names) < 2 or not listing["train"] or not listing["test"]:
        raise DataNotFoundError(
            f"image folder {root} holds no usable images: expected ROOT/train/<class>/*.png and "
            f"ROOT/test/<class>/*.png with at least two classes (found classes {list(class_names)})")
    color = folder_color([f for s in ("train", "test") for f, _ in listing[s]], color, root)
    train_x = _read_images([f for f, _ in listing["train"]], color)
    test_x = _read_images([f for f, _ in listing["test"]], color)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise PoolBuilderError(f"train images are {train_x.shape[1:3]} but test images are {test_x.shape[1:3]}")
    return Dataset("image_folder", class_names,
                   Split(train_x, np.array([i for _, i in listing["train"]])),
                   Split(test_x, np.array([i for _, i in listing["test"]])), color=color)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "image_folder": load_image_folder,
}


def load_dataset(name: str, data_dir: str | Path | None = None, color: str | None = None) -> Dataset:
    """Load a data set by registry name; unknown names list the valid ones.

    ``color`` only applies to ``image_folder`` (the other layouts have one fixed colour).
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, list(DATASETS))
    if name == "image_folder":
        return load_image_folder(data_dir, color=color)
    return DATASETS[name](data_dir)


def reload_dataset(name: str, settings: dict, data_dir: str | Path | None = None) -> Dataset:
    """The data set a pool was built from, read again as the build read it (its directory and colour).

    Everything that reloads a pool's data (query, evaluate, export calibration) goes through here.
    """
    return load_dataset(name, data_dir or settings.get("data_dir"), settings.get("color"))


# --------------------------------------------------------------------------- tensors

@dataclass(frozen=True)
class Normalizer:
    """uint8 NHWC batch -> float32 NCHW (channels-last memory), (x/255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: np.ndarray) -> "torch.Tensor":
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        x = (x - mean) / std
        return x.permute(0, 3, 1, 2)  # NHWC storage = channels_last NCHW view
