"""Cameras a user gives as a JSON file: intrinsics and/or world-to-camera extrinsics.

One reader for the CLI (``--cameras``, ``--intrinsics``) and the cog model (``cameras``).
Accepted documents:

- ``{"intrinsics": ..., "extrinsics": ...}``, either may be missing: intrinsics ``N x 3 x 3``
  (or one ``3 x 3`` shared by all views) in pixels of the input images; extrinsics
  ``N x 3 x 4`` or ``N x 4 x 4`` world-to-camera, OpenCV axes (x right, y down, z forward);
- da3cog's own ``cameras.json`` (``views``, each with ``K``, ``world_to_camera``, ``width``
  and ``height``): its ``K`` describe images of that size, which must be the inputs' (a file
  written at the processing resolution, or from cropped views, describes other pixels).

Which combinations a model can use is the pipeline's rule, not this reader's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from da3cog.geometry import check_extrinsics, check_intrinsics, check_intrinsics_for_images
from da3cog.io.inputs import first_few

# Generous for any number of views (a view's two matrices take well under 1 KiB as JSON).
MAX_CAMERA_FILE_BYTES = 8 * 1024**2


class CameraFileError(ValueError):
    """The camera file cannot be used as given; the message says why."""


@dataclass(frozen=True)
class UserCameras:
    """Cameras from a user's file, one per view.

    Attributes:
        intrinsics: ``(N, 3, 3)`` float64, pixels of the input images (EXIF orientation
            applied), or None.
        extrinsics: ``(N, 4, 4)`` float64, world-to-camera, OpenCV axes, or None.
        image_sizes: ``(width, height)`` of the image each view's intrinsics describe, where
            the file says (da3cog's ``cameras.json``), else None.
    """

    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None
    image_sizes: tuple[tuple[int, int], ...] | None = None

    def for_view(self, index: int) -> UserCameras:
        """The cameras of one view (monocular mode runs views one at a time)."""
        pick = slice(index, index + 1)
        return UserCameras(
            None if self.intrinsics is None else self.intrinsics[pick],
            None if self.extrinsics is None else self.extrinsics[pick],
            None if self.image_sizes is None else self.image_sizes[pick],
        )

    def check_images(self, sizes: Sequence[tuple[int, int] | None], label: str) -> None:
        """The intrinsics fit input images of these upright ``(width, height)`` sizes (None:
        not known before decoding): the size the file gives for a view is its image's, and
        focal lengths and principal points are plausible for it. CameraFileError naming
        ``label`` (how messages name the file)."""
        if self.intrinsics is None:
            return
        if self.image_sizes is not None:
            for index, (given, size) in enumerate(zip(self.image_sizes, sizes, strict=True)):
                if size is not None and tuple(size) != given:
                    raise CameraFileError(
                        f"{label}: view {index}'s K describes a {given[0]}x{given[1]} image, "
                        f"and input {index} is {size[0]}x{size[1]} (a cameras.json written at "
                        "the processing resolution, or from cropped views, describes other "
                        "pixels: write it with output resolution 'input' and a resize method "
                        "that does not crop)"
                    )
        known = [i for i, size in enumerate(sizes) if size is not None]
        try:
            check_intrinsics_for_images(
                self.intrinsics[known], [(sizes[i][1], sizes[i][0]) for i in known]
            )
        except ValueError as error:
            raise CameraFileError(f"{label}: {error}") from error


def _matrices(value: Any, what: str, shapes: tuple[tuple[int, int], ...], label: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise CameraFileError(f"{label}: {what} must be numbers ({error})") from error
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or tuple(array.shape[1:]) not in shapes:
        wanted = " or ".join(f"N x {rows} x {cols}" for rows, cols in shapes)
        raise CameraFileError(f"{label}: {what} must be {wanted}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise CameraFileError(f"{label}: {what} holds NaN or infinite values")
    return array


def read_camera_file(path: Path | str, view_count: int, label: str = "cameras") -> UserCameras:
    """Read a camera file for ``view_count`` views.

    Args:
        path: the JSON file.
        view_count: how many views the cameras are for; one shared intrinsics matrix is
            repeated for all of them.
        label: how error messages name the file (the cog input's name, or the path).

    Raises:
        CameraFileError: not a regular file, empty, larger than
            :data:`MAX_CAMERA_FILE_BYTES`, unreadable or not JSON (or nested too deeply),
            neither intrinsics nor extrinsics, wrong
            shapes, non-finite numbers, or a count that does not match ``view_count``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise CameraFileError(f"{label}: not a regular file")
        if size == 0:
            raise CameraFileError(f"{label}: the file is empty (0 bytes)")
        if size > MAX_CAMERA_FILE_BYTES:
            raise CameraFileError(
                f"{label}: {size} bytes; a camera file may have at most "
                f"{MAX_CAMERA_FILE_BYTES} bytes"
            )
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CameraFileError(f"{label}: not a readable JSON file ({error})") from error
    except RecursionError as error:
        raise CameraFileError(f"{label}: the JSON is nested too deeply") from error
    if not isinstance(document, dict):
        raise CameraFileError(f"{label}: expected a JSON object")
    image_sizes = None
    if "views" in document and not ({"intrinsics", "extrinsics"} & document.keys()):
        views = document["views"]
        if not isinstance(views, list) or not all(isinstance(view, dict) for view in views):
            raise CameraFileError(f"{label}: 'views' must be a list of objects")
        document = {
            "intrinsics": _every_or_none(views, "K", label),
            "extrinsics": _every_or_none(views, "world_to_camera", label),
        }
        image_sizes = _view_sizes(views, label)
    raw_intrinsics, raw_extrinsics = document.get("intrinsics"), document.get("extrinsics")
    if raw_intrinsics is None and raw_extrinsics is None:
        raise CameraFileError(f"{label}: give 'intrinsics' and/or 'extrinsics'")
    intrinsics = extrinsics = None
    if raw_intrinsics is not None:
        intrinsics = _matrices(raw_intrinsics, "intrinsics", ((3, 3),), label)
        if len(intrinsics) == 1 and view_count > 1:
            intrinsics = np.repeat(intrinsics, view_count, axis=0)
        if len(intrinsics) != view_count:
            raise CameraFileError(
                f"{label}: {len(intrinsics)} intrinsics for {view_count} views (give one "
                "3 x 3 matrix for all views, or one per view)"
            )
    if raw_extrinsics is not None:
        extrinsics = _matrices(raw_extrinsics, "extrinsics", ((3, 4), (4, 4)), label)
        if len(extrinsics) != view_count:
            raise CameraFileError(
                f"{label}: {len(extrinsics)} extrinsics for {view_count} views (one per view)"
            )
    # The pipeline's own checks (positive focal lengths, rigid poses; 4 x 4 out), here so that
    # a bad file fails before any model is loaded.
    try:
        if intrinsics is not None:
            intrinsics = check_intrinsics(intrinsics, view_count)
        if extrinsics is not None:
            extrinsics = check_extrinsics(extrinsics, view_count)
    except ValueError as error:
        raise CameraFileError(f"{label}: {error}") from error
    if image_sizes is not None and len(image_sizes) != view_count:
        image_sizes = None  # the counts were checked above where they matter
    return UserCameras(intrinsics, extrinsics, None if intrinsics is None else image_sizes)


def _every_or_none(views: list[dict], key: str, label: str) -> list[Any] | None:
    """Each view's ``key``, or None when no view has one; a file giving it for some views
    only is refused (the others would silently lose theirs)."""
    values = [view.get(key) for view in views]
    missing = [index for index, value in enumerate(values) if value is None]
    if len(missing) == len(values):
        return None
    if missing:
        shown = first_few([str(index) for index in missing], 10)
        raise CameraFileError(
            f"{label}: views {shown} have no {key!r} and the others have one: give it "
            "for every view or for none"
        )
    return values


def _view_sizes(views: list[dict], label: str) -> tuple[tuple[int, int], ...] | None:
    """Each view's ``(width, height)``, or None when the views do not all give both."""
    sizes = []
    for index, view in enumerate(views):
        width, height = view.get("width"), view.get("height")
        if width is None and height is None:
            return None
        if not all(type(v) is int and 0 < v for v in (width, height)):
            raise CameraFileError(
                f"{label}: view {index}'s width and height must be positive whole numbers, got "
                f"{width!r} and {height!r}"
            )
        sizes.append((width, height))
    return tuple(sizes)
