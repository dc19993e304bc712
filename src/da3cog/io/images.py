"""Decode user images (files, PIL images, numpy arrays) into uint8 RGB arrays.

Every entry point of da3cog funnels its images through :func:`load_image`, so the rest of the
code only ever sees ``(H, W, 3)`` ``uint8`` RGB arrays in display orientation.

Files are decoded only in the formats of :data:`IMAGE_FORMATS`, recognised by their content
(magic bytes), never by their name, and their size is read from the header before any pixel is
decoded: a file that claims more than ``max_pixels`` is refused unread. Pillow is never asked
to guess among all the formats it knows (EPS would run Ghostscript; PSD, FITS and others have
their own parsers to attack).
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray
"""Anything :func:`load_image` accepts: a file path, a PIL image or an image array."""

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "HEIF", "TIFF", "BMP")
"""The file formats :func:`load_image` decodes (Pillow's names; JPEG includes the MPO files
that phones write)."""

DEFAULT_MAX_PIXELS = 178_956_970
"""Pixels one decoded file may have by default (Pillow's own decompression-bomb limit)."""

# Bytes that are read to recognise a format.
HEADER_BYTES = 64
# ISO base-media major brands of HEIF still images (an MP4 or MOV has others).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})

_ORIENTATION = 0x0112
# EXIF orientations 5-8 transpose the stored image for display.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# EXIF orientation -> the transpose that shows the image upright (Pillow's exif_transpose).
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow decodes 16-bit greyscale PNG/TIFF into these modes; a plain convert("RGB") would clip
# every value above 255 to white, so they are rescaled to 8 bits instead.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(ValueError):
    """A file is not an image in an accepted format, is too large, or cannot be decoded."""


def sniff_image_format(head: bytes) -> str | None:
    """The :data:`IMAGE_FORMATS` entry whose signature starts ``head`` (the file's first
    :data:`HEADER_BYTES` bytes), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "HEIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP"
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, before any pixel is decoded.

    Attributes:
        format: the :data:`IMAGE_FORMATS` entry.
        width, height: stored size in pixels (before EXIF orientation).
        mode: Pillow's mode (``RGB``, ``L``, ``I;16``, ``F``...).
        transposed: whether the EXIF orientation swaps width and height for display.
    """

    format: str
    width: int
    height: int
    mode: str
    transposed: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height


@contextmanager
def open_image_file(
    path: str | os.PathLike[str], label: str | None = None
) -> Iterator[Image.Image]:
    """Open an image file lazily (header only) in its sniffed format.

    Args:
        path: the file.
        label: how messages name it (default: the path).

    Raises:
        FileNotFoundError: no such file.
        ImageDecodeError: not a regular file, empty, not one of :data:`IMAGE_FORMATS` by its
            content, or a header Pillow cannot read.
    """
    path = Path(path)
    what = label or str(path)
    try:
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {what}")
        if not path.is_file():
            raise ImageDecodeError(f"cannot read image {what}: not a regular file")
        with path.open("rb") as stream:
            head = stream.read(HEADER_BYTES)
    except FileNotFoundError:
        raise
    except OSError as error:
        # Permissions, a name too long: the input's fault, not the machine's.
        raise ImageDecodeError(f"cannot read image {what}: {error.strerror or error}") from error
    if not head:
        raise ImageDecodeError(f"image {what} is empty (0 bytes)")
    image_format = sniff_image_format(head)
    if image_format is None:
        raise ImageDecodeError(
            f"{what} is not an image in an accepted format ({', '.join(IMAGE_FORMATS)}; "
            "recognised by content, not by name)"
        )
    if image_format == "HEIF" and not _register_heif_opener():
        raise ImageDecodeError(f"cannot decode {what}: HEIC support (pillow-heif) is missing")
    formats = [image_format]
    try:
        opened = Image.open(path, formats=formats)
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(
            f"{what}: larger than the {DEFAULT_MAX_PIXELS / 1e6:.0f} MP any image may have "
            f"({error})"
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as error:
        reason = (str(error) or type(error).__name__).replace(str(path), what)
        raise ImageDecodeError(f"cannot decode {image_format} image {what}: {reason}") from error
    with opened:
        yield opened


def read_image_header(path: str | os.PathLike[str], label: str | None = None) -> ImageHeader:
    """The format, size and mode of an image file, read from its header (see
    :func:`open_image_file` for what is refused)."""
    with open_image_file(path, label) as opened:
        image_format = "JPEG" if opened.format == "MPO" else str(opened.format)
        width, height = stored_size(opened)
        transposed = transposes(header_exif(opened))
        return ImageHeader(image_format, int(width), int(height), opened.mode, transposed)


# TIFF tags of the stored image's width and height.
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257


def stored_size(opened: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened image as stored, before its EXIF orientation: its
    ``size``, except for TIFFs that Pillow reports (and loads) already turned upright."""
    width, height = opened.size
    tags = getattr(opened, "tag_v2", None) if opened.format == "TIFF" else None
    if tags is not None and (tags.get(_TIFF_WIDTH), tags.get(_TIFF_LENGTH)) == (height, width):
        return height, width
    return width, height


def transposes(exif: Image.Exif) -> bool:
    """Whether ``exif``'s orientation (5-8) shows the stored image transposed."""
    return exif.get(_ORIENTATION) in _TRANSPOSING_ORIENTATIONS


def header_exif(opened: Image.Image) -> Image.Exif:
    """The EXIF an opened image's header holds, without decoding pixels (Pillow's
    ``getexif()`` decodes a whole PNG to look for an ``eXIf`` chunk after the pixel data;
    here a PNG's EXIF counts only when it precedes them)."""
    if opened.format != "PNG":
        return opened.getexif()
    exif = Image.Exif()
    raw = opened.info.get("exif")
    if isinstance(raw, bytes):
        exif.load(raw)
    return exif


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


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` into an ``(H, W, 3)`` ``uint8`` RGB array.

    Args:
        source: One of

            * a path (``str`` or ``os.PathLike``) to a file in one of :data:`IMAGE_FORMATS`
              (JPEG, PNG, WebP, HEIC/HEIF, TIFF, BMP), recognised by its content;
            * a ``PIL.Image.Image`` of any mode;
            * a numpy array: ``(H, W)`` greyscale, ``(H, W, 1)``, ``(H, W, 3)`` RGB or
              ``(H, W, 4)`` RGBA, with dtype ``uint8`` (used as is) or floating point with all
              values in ``[0, 1]`` (mapped to ``uint8`` by ``round(x * 255)``).

            Files and PIL images are rotated/flipped according to their EXIF Orientation tag.
            Alpha channels are dropped without compositing (the colour values are kept), as
            Pillow's ``convert("RGB")`` does. 16-bit greyscale files are rescaled to 8 bits;
            32-bit integer files with values up to 255 (65535) are read as 8-bit (16-bit);
            32-bit float files must hold values in [0, 1] (mapped like float arrays).
        max_pixels: a file whose header claims more pixels is refused before decoding
            (None: no limit). Arrays and PIL images are already decoded and are not checked.

    Returns:
        ``(H, W, 3)`` ``uint8`` C-contiguous RGB array. A ``uint8`` ``(H, W, 3)`` input array is
        returned without copying when it is already C-contiguous, so it may share memory.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ImageDecodeError: (a ValueError) the file is empty, not in an accepted format, larger
            than ``max_pixels`` or cannot be decoded.
        ValueError: the array or the decoded image has an unsupported shape, dtype or value
            range, or the image has no pixels.
        TypeError: ``source`` is none of the supported types.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_image_file(Path(source), max_pixels)
    if isinstance(source, Image.Image):
        return pil_to_rgb_array(ImageOps.exif_transpose(source), what="PIL image")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise TypeError(
        "image must be a file path, a PIL.Image.Image or a numpy array, "
        f"got {type(source).__name__}"
    )


def image_name(source: ImageSource, index: int) -> str:
    """Short human-readable name for the ``index``-th input image.

    Paths (and PIL images opened from a file) are named after the file stem, e.g.
    ``"IMG_0042"``, with the bytes of a name that is not UTF-8 as U+FFFD (Python hands them
    over as lone surrogates, which PNG text, strict JSON and glTF readers refuse); arrays and
    in-memory PIL images get ``"view_0003"`` for ``index == 3``.
    """
    filename: str | os.PathLike[str] | None = None
    if isinstance(source, (str, os.PathLike)):
        filename = source
    elif isinstance(source, Image.Image):
        filename = getattr(source, "filename", None) or None
    if filename is not None:
        stem = Path(filename).stem
        if stem:
            return _LONE_SURROGATES.sub("\ufffd", stem)
    return f"view_{index:04d}"


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def source_size(source: ImageSource) -> tuple[int, int] | None:
    """``(width, height)`` of an image as :func:`load_image` would return it (EXIF
    orientation applied), without decoding its pixels: from a file's header, a PIL image's
    size or an array's shape. None when it cannot be told (unreadable file, odd array)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            header = read_image_header(source)
            width, height = header.width, header.height
            return (height, width) if header.transposed else (width, height)
        if isinstance(source, Image.Image):
            transposed = transposes(source.getexif())
            width, height = source.size
            return (height, width) if transposed else (width, height)
        array = np.asarray(source)
        # Only the shapes load_image takes: a channels-first (3, H, W) array is refused there,
        # not measured here as an image 3 pixels tall.
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
            return int(array.shape[1]), int(array.shape[0])
    except (OSError, ValueError):
        return None
    return None


def _load_image_file(path: Path, max_pixels: int | None) -> np.ndarray:
    with open_image_file(path) as opened:
        width, height = opened.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"image file {path} has {width}x{height} = {width * height / 1e6:.1f} MP; "
                f"the limit is {max_pixels / 1e6:.1f} MP"
            )
        try:
            # A PNG turned as its header says, as read_image_header reads it: Pillow's own
            # turn, after load(), counts an EXIF after the pixels (or in XMP) too, so the
            # size checked beforehand and the pixels would differ. Other formats' EXIF is
            # all in the header (TIFFs come out of load() already turned).
            png_turn = (
                _ORIENTATION_TRANSPOSES.get(header_exif(opened).get(_ORIENTATION, 1))
                if opened.format == "PNG"
                else None
            )
            # load() inside the try so truncated or corrupt pixel data is reported here, with
            # the path, rather than later from deep inside a conversion.
            opened.load()
            if opened.format != "PNG":
                oriented = ImageOps.exif_transpose(opened)
            else:
                oriented = opened if png_turn is None else opened.transpose(png_turn)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            reason = str(error) or type(error).__name__
            raise ImageDecodeError(f"cannot decode image file {path}: {reason}") from error
        return pil_to_rgb_array(oriented, what=f"image file {path}")


def pil_to_rgb_array(image: Image.Image, what: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a PIL image as stored: 16-bit and wide-integer greys scaled
    to 8 bits, float greys read in [0, 1] (ValueError naming ``what`` otherwise), alpha
    dropped."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{what} is empty ({width}x{height} pixels)")
    if image.mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(np.asarray(image).astype(np.float64) / 257.0)
    if image.mode == "I":
        return _grey_to_rgb(_wide_integer_to_8_bit(np.asarray(image), what))
    if image.mode == "F":
        return _grey_to_rgb(_unit_float_to_uint8(np.asarray(image), what).astype(np.float64))
    try:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except (ValueError, OSError) as error:
        raise ValueError(f"{what}: cannot convert mode {image.mode} to RGB ({error})") from error


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    grey8 = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))


def _wide_integer_to_8_bit(values: np.ndarray, what: str) -> np.ndarray:
    """32-bit integer greyscale: 8-bit data (max <= 255) as is, 16-bit data rescaled; a wider
    range has no white level we could know, so it is refused."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(
            f"{what} is 32-bit integer greyscale with values in [{low}, {high}]; accepted are "
            "values in [0, 255] or [0, 65535] (save it as an 8- or 16-bit image)"
        )
    if high <= 255:
        return values.astype(np.float64)
    return values.astype(np.float64) / 257.0


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
        pixels = _unit_float_to_uint8(array, "floating-point image array")
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


def _unit_float_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{what} must have values in [0, 1], got range [{low:g}, {high:g}]; "
            "use 8-bit (0-255) data for other ranges"
        )
    return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
