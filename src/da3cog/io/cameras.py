"""Cameras a user gives as a JSON file: intrinsics and/or world-to-camera extrinsics.

One reader for the CLI (``--cameras``, ``--intrinsics``) and the cog model (``cameras``).
Accepted documents:

- ``{"intrinsics": ..., "extrinsics": ...}``, either may be missing: intrinsics ``N x 3 x 3``
  (or one ``3 x 3`` shared by all views) in pixels of the input images; extrinsics
  ``N x 3 x 4`` or ``N x 4 x 4`` world-to-camera, OpenCV axes (x right, y down, z forward);
- da3cog's own ``cameras.json`` (``views``, each with ``K`` and ``world_to_camera``).

Which combinations a model can use is the pipeline's rule, not this reader's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from da3cog.geometry import check_extrinsics, check_intrinsics

# Generous for any number of views (a view's two matrices take well under 1 KiB as JSON).
MAX_CAMERA_FILE_BYTES = 8 * 1024**2


class CameraFileError(ValueError):
    """The camera file cannot be used as given; the message says why."""


@dataclass(frozen=True)
class UserCameras:
    """Cameras from a user's file, one per view.

    Attributes:
        intrinsics: ``(N, 3, 3)`` float64, pixels of the input images, or None.
        extrinsics: ``(N, 4, 4)`` float64, world-to-camera, OpenCV axes, or None.
    """

    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None

    def for_view(self, index: int) -> UserCameras:
        """The cameras of one view (monocular mode runs views one at a time)."""
        pick = slice(index, index + 1)
        return UserCameras(
            None if self.intrinsics is None else self.intrinsics[pick],
            None if self.extrinsics is None else self.extrinsics[pick],
        )


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
    if "views" in document and not ({"intrinsics", "extrinsics"} & document.keys()):
        views = document["views"]
        if not isinstance(views, list) or not all(isinstance(view, dict) for view in views):
            raise CameraFileError(f"{label}: 'views' must be a list of objects")
        intrinsics_list = [view.get("K") for view in views]
        extrinsics_list = [view.get("world_to_camera") for view in views]
        document = {
            "intrinsics": None if None in intrinsics_list else intrinsics_list,
            "extrinsics": None if None in extrinsics_list else extrinsics_list,
        }
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
    return UserCameras(intrinsics, extrinsics)
