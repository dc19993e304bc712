"""Cameras as JSON: ``cameras.json`` (per view the image name, size, K, world-to-camera and
camera-to-world, OpenCV axes) and a nerfstudio-style ``transforms.json`` with the images it
points at."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from da3cog.export.files import (
    ManifestEntry,
    all_or_nothing,
    json_number,
    returning_paths,
    view_file_name,
)
from da3cog.export.points import require_cameras, skew_note, world_to_camera
from da3cog.geometry import camera_centres, invert_rigid_np
from da3cog.pipeline import Prediction, ViewPrediction

# How the prediction's cameras and unit were made (Prediction attributes), in cameras.json,
# manifest.json and the NPZ bundle alike.
PREDICTION_FLAGS = ("cameras_estimated", "intrinsics_source", "focal_source", "metric_scale")

CONVENTIONS = {
    "axes": "OpenCV: x right, y down, z forward",
    "extrinsics": "world_to_camera 4x4; camera_to_world is its inverse",
    "intrinsics": "pixels of the view's width x height, pixel centres at +0.5",
    "depth": "z along the optical axis",
}
CAMERAS_SCHEMA_FILE = "cameras.schema.json"
# OpenCV camera axes -> OpenGL / nerfstudio camera axes (x right, y up, z back).
OPENCV_TO_OPENGL_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])


def _matrix(array: np.ndarray | None) -> list | None:
    return None if array is None else np.asarray(array, dtype=float).tolist()


def prediction_flags(prediction: Prediction) -> dict[str, Any]:
    """The prediction's :data:`PREDICTION_FLAGS` by name."""
    return {key: getattr(prediction, key) for key in PREDICTION_FLAGS if hasattr(prediction, key)}


def chunk_record(view: ViewPrediction) -> dict[str, Any]:
    """Which chunk predicted the view and how well that chunk aligned, for chunked
    predictions (empty for a single pass)."""
    if view.chunk is None:
        return {}
    residual = view.alignment_residual
    return {
        "chunk": int(view.chunk),
        "alignment_residual": None if residual is None else json_number(round(residual, 6)),
    }


def cameras_document(prediction: Prediction) -> dict:
    """The cameras JSON document as a dict. ``K`` / ``world_to_camera`` / ``camera_to_world``
    are null for views without intrinsics / poses (single-view models estimate none)."""
    if prediction.pose_conditioned:
        world = "the user's input frame"
    elif all(view.extrinsics is None for view in prediction.views):
        world = "none: no camera poses were estimated (each view is in its own camera frame)"
    else:
        world = "camera of the first view"
    optional = prediction_flags(prediction)
    return {
        "model": {"id": prediction.model_id, "preset": prediction.model_preset},
        "conventions": {
            **CONVENTIONS,
            "world_frame": world,
            "units": "metres" if prediction.is_metric else "relative (scale shared by all views)",
        },
        "is_metric": prediction.is_metric,
        "output_resolution": prediction.output_resolution,
        "processing_size": {
            "height": prediction.processing_size[0],
            "width": prediction.processing_size[1],
        },
        "notes": list(prediction.notes),
        **optional,
        "views": [
            {
                "index": index,
                "name": view.name,
                "width": view.width,
                "height": view.height,
                # null where the model estimated no camera (single-view models) and none was
                # given or read from EXIF: see Prediction.cameras_estimated.
                "K": _matrix(view.intrinsics),
                "world_to_camera": _matrix(view.extrinsics),
                "camera_to_world": (
                    None
                    if view.extrinsics is None
                    else invert_rigid_np(np.asarray(view.extrinsics, dtype=float)).tolist()
                ),
                **chunk_record(view),
            }
            for index, view in enumerate(prediction.views)
        ],
    }


@functools.cache
def cameras_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of ``cameras.json``, shipped beside this module."""
    return json.loads(Path(__file__).with_name(CAMERAS_SCHEMA_FILE).read_text(encoding="utf-8"))


def cameras_json_files(prediction: Prediction, folder: Path) -> list[ManifestEntry]:
    """Write ``cameras.json``."""
    text = json.dumps(cameras_document(prediction), indent=2, allow_nan=False)
    with all_or_nothing() as batch:
        batch.write(
            folder / "cameras.json",
            lambda target: target.write_text(text, encoding="utf-8"),
            "cameras_json",
            schema=CAMERAS_SCHEMA_FILE,
        )
    return batch.entries


def export_cameras_json(prediction: Prediction, folder: Path) -> Path:
    """Write ``cameras.json``."""
    return cameras_json_files(prediction, folder)[0].path


def image_file_name(index: int, name: str) -> str:
    """``image_0000_<name>.png``: the view's image as written next to ``transforms.json``."""
    return view_file_name("image", index, name, ".png")


# nerfstudio's applied_transform maps the data's original frame to the file's: ours is the
# same frame. Without it, nerfstudio assumes a COLMAP-derived scene whenever colmap/sparse/0 is
# beside the file and swaps the axes of those points (they end up behind the cameras).
IDENTITY_APPLIED_TRANSFORM = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


def transforms_document(prediction: Prediction, ply_file_path: str | None = None) -> dict:
    """nerfstudio's ``transforms.json``: per frame ``file_path``, ``transform_matrix``
    (camera-to-world, OpenGL camera axes: x right, y up, z back), ``fl_x fl_y cx cy w h``
    (pixels, pixel centres at +0.5 as in COLMAP and nerfstudio); an identity
    ``applied_transform`` (the frame is the world of cameras.json as it is) and, when given,
    ``ply_file_path``: the fused point cloud in the same frame, which splatfacto starts from."""
    require_cameras(prediction, "transforms.json")
    frames = []
    for index, view in enumerate(prediction.views):
        camera_to_world = invert_rigid_np(world_to_camera(view))
        intrinsics = np.asarray(view.intrinsics, dtype=np.float64)
        frames.append(
            {
                "file_path": image_file_name(index, view.name),
                "transform_matrix": (camera_to_world @ OPENCV_TO_OPENGL_CAMERA).tolist(),
                "fl_x": float(intrinsics[0, 0]),
                "fl_y": float(intrinsics[1, 1]),
                "cx": float(intrinsics[0, 2]),
                "cy": float(intrinsics[1, 2]),
                "w": view.width,
                "h": view.height,
                "colmap_im_id": index + 1,
            }
        )
    document: dict[str, Any] = {
        "camera_model": "OPENCV",
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "applied_transform": IDENTITY_APPLIED_TRANSFORM,
        **({"ply_file_path": ply_file_path} if ply_file_path is not None else {}),
        "frames": frames,
        "da3cog": {
            "world_frame": "world of cameras.json (OpenCV axes); camera axes converted to OpenGL",
            "units": "metres" if prediction.is_metric else "relative",
            "model": prediction.model_id,
        },
    }
    return document


def transforms_json_files(
    prediction: Prediction, folder: Path, *, ply_file_path: str | None = None
) -> list[ManifestEntry]:
    """Write ``transforms.json`` and the ``image_0000_<name>.png`` files it points at (needs
    cameras: see :func:`da3cog.export.points.camera_problem`). ``ply_file_path``: the point
    cloud written beside it, relative to ``folder`` (:func:`~da3cog.export.manifest.export_all`
    sets it when it writes the PLY too)."""
    from PIL import Image

    text = json.dumps(transforms_document(prediction, ply_file_path), indent=2, allow_nan=False)
    with all_or_nothing(parallel=True) as batch:
        for index, view in enumerate(prediction.views):

            def save(target: Path, image: np.ndarray = view.image) -> None:
                Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
                    target, format="PNG", compress_level=1
                )

            batch.write(folder / image_file_name(index, view.name), save, "image", index)
        notes = [skew_note(prediction, "nerfstudio's cameras"), _one_centre_note(prediction)]
        notes = [note for note in notes if note]
        batch.write(
            folder / "transforms.json",
            lambda target: target.write_text(text, encoding="utf-8"),
            "transforms_json",
            convention="nerfstudio: camera_to_world, OpenGL camera axes",
            **({"notes": notes} if notes else {}),
        )
    return batch.entries


def _one_centre_note(prediction: Prediction) -> str | None:
    """A note when every camera sits at one centre (one view, a tripod): nerfstudio's parser
    scales the poses by their largest translation, which is then 0 (a division by zero)."""
    centres = camera_centres(np.stack([world_to_camera(view) for view in prediction.views]))
    spread = float(np.abs(centres - centres[0]).max())
    # One centre up to float32 rounding (the poses' precision).
    if spread > 1e-6 * max(1.0, float(np.abs(centres).max())):
        return None
    return (
        "every camera sits at one centre: nerfstudio's parser divides by the cameras' largest "
        "translation, here 0, unless run with "
        "--pipeline.datamanager.dataparser.auto-scale-poses False"
    )


export_transforms_json = returning_paths(transforms_json_files, "export_transforms_json")
