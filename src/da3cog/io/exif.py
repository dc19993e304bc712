"""Focal length from EXIF, in pixels of the image as displayed (after EXIF orientation).

Two routes, in this order:

1. ``FocalLengthIn35mmFilm``: the focal length a 36 x 24 mm frame would need for the same
   field of view, taken (as CIPA DC-008 defines it) over the diagonal:
   ``f_px = f35 x image diagonal in pixels / 43.27 mm``.
2. ``FocalLength`` (mm) with the sensor's pixel density ``FocalPlaneXResolution`` /
   ``FocalPlaneYResolution`` per ``FocalPlaneResolutionUnit`` (inch when absent), which refers
   to the image as captured (``PixelXDimension`` x ``PixelYDimension`` when present), so it is
   rescaled to the stored size: ``f_px = f_mm x pixels per mm x stored width / captured
   width``.

Arrays carry no EXIF; neither do images whose tags are missing or not positive and finite.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from da3cog.geometry import FOCAL_RANGE
from da3cog.io.images import ImageSource, open_image_file, stored_size, transposes

_EXIF_IFD = 0x8769
_FOCAL_LENGTH = 0x920A
_FOCAL_35MM = 0xA405
_PIXEL_X_DIMENSION = 0xA002
_PIXEL_Y_DIMENSION = 0xA003
_FOCAL_PLANE_X_RESOLUTION = 0xA20E
_FOCAL_PLANE_Y_RESOLUTION = 0xA20F
_FOCAL_PLANE_UNIT = 0xA210
# FocalPlaneResolutionUnit -> millimetres: 2 inch (the default), 3 cm; 4 (mm) and 5 (um) are
# outside the standard but written by some cameras.
_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
_FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)


@dataclass(frozen=True)
class ExifFocal:
    """Focal lengths in pixels of the displayed image and the tags they came from."""

    fx: float
    fy: float
    tags: str


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def focal_from_exif(exif: Image.Exif, stored_size: tuple[int, int]) -> ExifFocal | str:
    """The focal length an EXIF block gives an image stored at ``stored_size`` ``(width,
    height)`` pixels, or the reason there is none (also when it is outside the range a
    user's focal length may have, :data:`~da3cog.geometry.FOCAL_RANGE`: a placeholder
    such as ``FocalLengthIn35mmFilm=65535``)."""
    found = _focal_from_exif(exif, stored_size)
    if isinstance(found, str):
        return found
    side = max(stored_size)
    low, high = FOCAL_RANGE[0] * side, FOCAL_RANGE[1] * side
    if not (low <= found.fx <= high and low <= found.fy <= high):
        return (
            f"the EXIF focal length ({found.fx:.4g} x {found.fy:.4g} px from {found.tags}) is "
            f"outside [{low:g}, {high:g}] px, {FOCAL_RANGE[0]:g} to {FOCAL_RANGE[1]:g} x the "
            "image's longer side"
        )
    return found


def _focal_from_exif(exif: Image.Exif, stored_size: tuple[int, int]) -> ExifFocal | str:
    width, height = stored_size
    details = exif.get_ifd(_EXIF_IFD)
    transposed = transposes(exif)

    def oriented(fx: float, fy: float, tags: str) -> ExifFocal:
        return ExifFocal(fx=fy, fy=fx, tags=tags) if transposed else ExifFocal(fx, fy, tags)

    focal_35mm = _positive(details.get(_FOCAL_35MM))
    if focal_35mm is not None:
        focal = focal_35mm * math.hypot(width, height) / _FULL_FRAME_DIAGONAL_MM
        return oriented(focal, focal, "FocalLengthIn35mmFilm")

    focal_mm = _positive(details.get(_FOCAL_LENGTH))
    if focal_mm is None:
        return "no usable FocalLengthIn35mmFilm or FocalLength tag"
    density_x = _positive(details.get(_FOCAL_PLANE_X_RESOLUTION))
    density_y = _positive(details.get(_FOCAL_PLANE_Y_RESOLUTION))
    unit = details.get(_FOCAL_PLANE_UNIT, 2)
    if density_x is None or density_y is None or unit not in _UNIT_MM:
        return "FocalLength without a usable sensor size (FocalPlane*Resolution tags)"
    captured_width = _positive(details.get(_PIXEL_X_DIMENSION)) or width
    captured_height = _positive(details.get(_PIXEL_Y_DIMENSION)) or height
    if (captured_width > captured_height) != (width > height) and width != height:
        # The captured size of the sensor's frame, the image stored turned upright (HEIC
        # writers turn it and drop the orientation tag): the same frame, turned.
        captured_width, captured_height = captured_height, captured_width
    millimetre = _UNIT_MM[unit]
    fx = focal_mm * density_x / millimetre * width / captured_width
    fy = focal_mm * density_y / millimetre * height / captured_height
    return oriented(fx, fy, "FocalLength + FocalPlaneResolution")


def exif_focal(source: ImageSource) -> ExifFocal | str:
    """The EXIF focal length of a file or PIL image, or the reason there is none (arrays,
    files without EXIF, missing or unusable tags)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            with open_image_file(Path(source)) as image:
                return focal_from_exif(image.getexif(), stored_size(image))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            return f"unreadable EXIF ({error})"
    if isinstance(source, Image.Image):
        return focal_from_exif(source.getexif(), source.size)
    return "an array carries no EXIF"
