"""Decode user images (files, PIL images, numpy arrays) into uint8 RGB arrays.

Every entry point of da3cog funnels its images through :func:`load_image`, so the rest of the
code only ever sees ``(H, W, 3)`` ``uint8`` RGB arrays in display orientation.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray
"""Anything :func:`load_image` accepts: a file path, a PIL image or an image array."""

# Pillow decodes 16-bit greyscale PNG/TIFF into these modes; a plain convert("RGB") would clip
# every value above 255 to white, so they are rescaled to 8 bits instead.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@functools.cache
def _register_heif_opener() -> bool:
    """Teach Pillow to open HEIC/HEIF files; returns whether pillow-heif is available.

    Done lazily (and once) so that importing da3cog does not import pillow-heif's native
    library, and so that a broken pillow-heif install only affects HEIC files.
    """
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def load_image(source: ImageSource) -> np.ndarray:
    """Decode ``source`` into an ``(H, W, 3)`` ``uint8`` RGB array.

    Args:
        source: One of

            * a path (``str`` or ``os.PathLike``) to a JPEG, PNG, WebP, HEIC/HEIF or any other
              format Pillow can read;
            * a ``PIL.Image.Image`` of any mode;
            * a numpy array: ``(H, W)`` greyscale, ``(H, W, 1)``, ``(H, W, 3)`` RGB or
              ``(H, W, 4)`` RGBA, with dtype ``uint8`` (used as is) or floating point with all
              values in ``[0, 1]`` (mapped to ``uint8`` by ``round(x * 255)``).

            Files and PIL images are rotated/flipped according to their EXIF Orientation tag.
            Alpha channels are dropped without compositing (the colour values are kept), as
            Pillow's ``convert("RGB")`` does. 16-bit greyscale files are rescaled to 8 bits.

    Returns:
        ``(H, W, 3)`` ``uint8`` C-contiguous RGB array. A ``uint8`` ``(H, W, 3)`` input array is
        returned without copying when it is already C-contiguous, so it may share memory.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: the file cannot be decoded, the array has an unsupported shape, dtype or
            value range, or the image has no pixels.
        TypeError: ``source`` is none of the supported types.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_image_file(Path(source))
    if isinstance(source, Image.Image):
        return _pil_to_rgb_array(ImageOps.exif_transpose(source), what="PIL image")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise TypeError(
        "image must be a file path, a PIL.Image.Image or a numpy array, "
        f"got {type(source).__name__}"
    )


def image_name(source: ImageSource, index: int) -> str:
    """Short human-readable name for the ``index``-th input image.

    Paths (and PIL images opened from a file) are named after the file stem, e.g.
    ``"IMG_0042"``; arrays and in-memory PIL images get ``"view_0003"`` for ``index == 3``.
    """
    filename: str | os.PathLike[str] | None = None
    if isinstance(source, (str, os.PathLike)):
        filename = source
    elif isinstance(source, Image.Image):
        filename = getattr(source, "filename", None) or None
    if filename is not None:
        stem = Path(filename).stem
        if stem:
            return stem
    return f"view_{index:04d}"


def _load_image_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"cannot read image {path}: not a regular file")
    _register_heif_opener()
    try:
        with Image.open(path) as opened:
            # load() inside the try so truncated or corrupt pixel data is reported here, with
            # the path, rather than later from deep inside a conversion.
            opened.load()
            oriented = ImageOps.exif_transpose(opened)
            return _pil_to_rgb_array(oriented, what=f"image file {path}")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        reason = str(error) or type(error).__name__
        raise ValueError(f"cannot decode image file {path}: {reason}") from error


def _pil_to_rgb_array(image: Image.Image, what: str) -> np.ndarray:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{what} is empty ({width}x{height} pixels)")
    if image.mode in _SIXTEEN_BIT_MODES:
        grey16 = np.asarray(image).astype(np.float64)
        grey8 = np.clip(np.round(grey16 / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            "image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty (shape {array.shape})")

    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        pixels = _unit_float_to_uint8(array)
    else:
        raise ValueError(
            f"image array must have dtype uint8 or be floating point in [0, 1], got {array.dtype}"
        )

    channels = pixels.shape[2]
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif channels == 4:
        pixels = pixels[:, :, :3]
    return np.ascontiguousarray(pixels)


def _unit_float_to_uint8(array: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ValueError("floating-point image array contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            "floating-point image array must have values in [0, 1], "
            f"got range [{low:g}, {high:g}]; pass uint8 for 0-255 data"
        )
    return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
