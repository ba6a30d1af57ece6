"""Camera frames, arrays and files -> the library's normalized float input.

Users hand over whatever their pipeline has: one image or a batch, uint8
pixels or floats in [0, 1], HW / HWC / NHWC / NCHW arrays, ``.npy`` files, PNG
or JPEG paths (Pillow, optional).  The manifest's preprocessing says the
image size, channels, mean and std; anything that does not fit is refused
with what was expected instead of being guessed at.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .manifest import Preprocessing, check_choice

ARRAY_LAYOUTS = ("auto", "HW", "HWC", "NHW", "NHWC", "NCHW")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm")
# Refused from the file header, before any pixel is decoded: a 12-megapixel photo resizes, a bomb does not.
MAX_RESIZE_PIXELS = 40_000_000
FLOAT_RANGE_SLACK = 1e-3  # float pixels must lie in [0, 1]; allow rounding noise at the ends
ImageInput = Union[np.ndarray, str, Path]


class InputError(ValueError):
    """Images the model cannot take as they are; the message says what it expects."""


def _expected(pre: Preprocessing) -> str:
    h, w, c = pre.input_shape
    return f"expected HxW{'' if c == 1 else 'xC'} = {h}x{w}{'' if c == 1 else f'x{c}'} images (layouts HW, HWC, " \
           f"NHW, NHWC, NCHW) as uint8 0..255 or float 0..1"


def to_nhwc(images: np.ndarray, pre: Preprocessing, layout: str = "auto") -> np.ndarray:
    """Any accepted array layout -> (N, H, W, C), dtype unchanged."""
    check_choice("image layout", layout, ARRAY_LAYOUTS)
    h, w, c = pre.input_shape
    x = np.asarray(images)
    shape = x.shape
    if layout == "auto":
        layout = _guess_layout(shape, (h, w, c))
        if layout is None:
            raise InputError(f"images of shape {shape} do not fit the model: {_expected(pre)}")
    converted = {"HW": lambda a: a[None, :, :, None], "HWC": lambda a: a[None],
                 "NHW": lambda a: a[:, :, :, None], "NHWC": lambda a: a,
                 "NCHW": lambda a: a.transpose(0, 2, 3, 1)}
    if x.ndim != len(layout):
        raise InputError(f"images of shape {shape} are not {layout}: {_expected(pre)}")
    out = converted[layout](x)
    if out.shape[1:] != (h, w, c):
        raise InputError(f"images of shape {shape} read as {layout} give {out.shape[1:]} per image: {_expected(pre)}")
    if out.shape[0] == 0:
        raise InputError("empty batch: no images given")
    return out


def _guess_layout(shape: tuple[int, ...], hwc: tuple[int, int, int]) -> str | None:
    h, w, c = hwc
    candidates = {2: [("HW", (h, w))] if c == 1 else [],
                  3: [("HWC", (h, w, c))] + ([("NHW", (h, w))] if c == 1 else []),
                  4: [("NHWC", (h, w, c)), ("NCHW", (c, h, w))]}.get(len(shape), [])
    for name, tail in candidates:
        if tuple(shape[-len(tail):]) == tail:
            return name
    return None


def check_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 kept; floats must be finite and in [0, 1]; anything else is refused."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise InputError(f"image dtype {x.dtype} is not supported; valid: uint8 (0..255), float16/32/64 (0..1)")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.argwhere(~finite.reshape(len(x), -1).all(axis=1))[0][0])
        raise InputError(f"image {bad} contains NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -FLOAT_RANGE_SLACK or hi > 1 + FLOAT_RANGE_SLACK:
        raise InputError(f"float images must hold pixels in [0, 1], got values in [{lo:g}, {hi:g}]; "
                         f"pass uint8 for 0..255")
    return x


def normalize(images_nhwc: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(pixel in [0, 1] - mean) / std per channel, float32 NHWC."""
    x = check_pixels(images_nhwc)
    scaled = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    return (scaled - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)


def load_image_file(path: Path, pre: Preprocessing, resize: bool = False) -> np.ndarray:
    """A PNG/JPEG file as (H, W, C) uint8; size must match unless ``resize``."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"{path}: reading image files needs Pillow (pip install Pillow), "
                         f"or pass a .npy array instead") from None
    h, w, c = pre.input_shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
            img = Image.open(path)  # reads the header only; convert() decodes
        with img:
            size = img.size
            if size != (w, h) and not resize:
                raise InputError(f"{path} is {size[0]}x{size[1]} pixels, the model takes {w}x{h}; "
                                 f"resize it first or pass --resize")
            if size[0] * size[1] > MAX_RESIZE_PIXELS:
                raise InputError(f"{path} is {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels), "
                                 f"more than the {MAX_RESIZE_PIXELS // 1_000_000} this runtime decodes; refusing it")
            img.draft("L" if c == 1 else "RGB", (w, h))  # JPEG: decode at reduced size when resizing
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path} refused as a decompression bomb: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path} is not a readable image: {exc}") from None
    return arr.reshape(h, w, c)


def load_inputs(items: Sequence[ImageInput] | np.ndarray, pre: Preprocessing, layout: str = "auto",
                resize: bool = False) -> np.ndarray:
    """Arrays, ``.npy`` files and image files -> one (N, H, W, C) batch of uint8 or float pixels."""
    if isinstance(items, np.ndarray):
        return check_pixels(to_nhwc(items, pre, layout))
    if isinstance(items, (str, Path)):
        items = [items]
    batches = []
    for item in items:
        if isinstance(item, np.ndarray):
            batches.append(to_nhwc(item, pre, layout))
            continue
        path = Path(item)
        if str(item) == "-":
            raise InputError("input '-': standard input is not read by `run`; use `edge-runtime stream -` "
                             "(one path per line)")
        if path.is_dir():
            raise InputError(f"input {path} is a directory; give its files (e.g. {path}/*.png) or use "
                             f"`edge-runtime stream {path}`")
        if not path.is_file():
            raise InputError(f"input {path} not found")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, EOFError, OSError) as exc:  # a 0-byte or truncated file raises EOFError
                raise InputError(f"{path} is not a plain numpy array file ({type(exc).__name__}: "
                                 f"{exc or 'empty or truncated'})") from None
            batches.append(to_nhwc(array, pre, layout))
        elif suffix in IMAGE_SUFFIXES:
            batches.append(load_image_file(path, pre, resize)[None])
        else:
            raise InputError(f"input {path}: unknown file type {suffix or '(none)'}; "
                             f"valid: .npy, {', '.join(IMAGE_SUFFIXES)}")
    if not batches:
        raise InputError("empty batch: no images given")
    kinds = {b.dtype == np.uint8 for b in batches}
    if len(kinds) > 1:
        raise InputError("inputs mix uint8 and float images; convert them to one kind")
    return check_pixels(np.concatenate(batches))
