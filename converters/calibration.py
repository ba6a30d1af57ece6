"""Calibration and evaluation images: the tiny protocol quantizers and agreement checks share.

Calibration images come from the pool's training split (or a user's ``.npy``
of uint8 images), evaluation images from its held-out split, so a quantizer
never calibrates on the images its accuracy is judged on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pool_builder.data.datasets import reload_dataset
from pool_builder.pool.evaluate import held_out_split
from pool_builder.pool.loader import Pool

from .errors import ConvertError


@dataclass(frozen=True)
class ImageSet:
    """Normalized float images (N, C, H, W) with their labels (-1 where unknown)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def nhwc(self) -> np.ndarray:
        return np.ascontiguousarray(self.images.transpose(0, 2, 3, 1))


def _normalized(pool: Pool, uint8_images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pool.normalizer(uint8_images).numpy())


def check_image_shape(pool: Pool, images: np.ndarray, source: str) -> None:
    want = tuple(pool.meta.dataset.input_shape)  # C, H, W
    hwc = (want[1], want[2], want[0])
    if images.ndim != 4 or tuple(images.shape[1:]) != hwc or images.dtype != np.uint8 or len(images) == 0:
        raise ConvertError(f"{source}: calibration images must be uint8 of shape (N, {hwc[0]}, {hwc[1]}, {hwc[2]}) "
                           f"(N×H×W×C, N >= 1) for this pool; got {images.dtype} {tuple(images.shape)}")


def calibration_images(pool: Pool, count: int, data_dir: str | None = None, npy_file: str | None = None,
                       seed: int = 0) -> ImageSet:
    """``count`` training images, the same share from every class (or the first ``count`` of ``npy_file``)."""
    if count < 1:
        raise ConvertError(f"calibration image count must be >= 1, got {count}")
    if npy_file:
        path = Path(npy_file)
        if not path.is_file():
            raise ConvertError(f"calibration file {path} not found")
        try:
            images = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ConvertError(f"calibration file {path} is not a plain .npy array: {exc}") from None
        check_image_shape(pool, images, str(path))
        images = images[:count]
        return ImageSet(_normalized(pool, images), np.full(len(images), -1, dtype=np.int64))
    settings = pool.meta.build.get("settings", {})
    dataset = reload_dataset(pool.meta.dataset.name, settings, data_dir)
    split = dataset.train.stratified(count, seed)
    return ImageSet(_normalized(pool, split.images), split.labels)


def evaluation_images(pool: Pool, count: int | None, data_dir: str | None = None) -> ImageSet:
    """Held-out images the pool was evaluated on at build time, at most ``count`` of them (stratified)."""
    split = held_out_split(pool, data_dir)
    if count is not None and count < len(split):
        split = split.stratified(count, 1)
    return ImageSet(_normalized(pool, split.images), split.labels)


@torch.no_grad()
def torch_outputs(module: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The torch source's outputs, the reference every fragment is compared against."""
    module.eval()
    parts = [module(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float32)
