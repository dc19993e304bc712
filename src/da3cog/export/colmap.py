"""A COLMAP sparse model (``cameras``, ``images``, ``points3D``) in text and / or binary.

Layout: ``colmap/sparse/0/{cameras,images,points3D}.{txt,bin}`` and, optionally, the images the
model names in ``colmap/images/`` (``image_0000_<name>.png``).

Cameras are PINHOLE (one per view) at each view's *input* image size: with
``output_resolution="input"`` the views' intrinsics already are at input size (a view cropped
out of its input is offset by its crop box), with ``"processing"`` they are scaled from the
processing size onto the crop box of the input image (and the images written are upsampled from
the processing resolution; the entry's notes say so). Images carry the world-to-camera pose as
COLMAP wants it (``qw qx qy qz``, ``tx ty tz``). Points3D are the fused, confidence-filtered
points (:func:`da3cog.export.points.fuse_points`), each with a one-element track: the view and
pixel it came from, listed as that image's 2D point (pixel centre, COLMAP convention ``+0.5``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from da3cog.export.files import ManifestEntry, all_or_nothing, safe_name
from da3cog.export.points import (
    DEFAULT_CONFIDENCE_PERCENTILE,
    DEFAULT_MAX_POINTS,
    DEFAULT_SEED,
    PointCloud,
    fuse_points,
    require_cameras,
    world_to_camera,
)
from da3cog.geometry import matrix_to_quaternion
from da3cog.pipeline import Prediction, ViewPrediction

COLMAP_FOLDER = "colmap"
MODEL_FOLDER = Path("sparse") / "0"
IMAGES_FOLDER = "images"
COLMAP_FORMATS: tuple[str, ...] = ("text", "binary")
_PINHOLE_MODEL_ID = 1


@dataclass(frozen=True)
class ColmapCamera:
    """One view as a COLMAP camera + image (input-image pixels).

    ``u_input = scale_x * u_view + offset_x`` (same for v) maps the view's continuous pixel
    coordinates onto the COLMAP image.
    """

    width: int
    height: int
    params: tuple[float, float, float, float]  # fx, fy, cx, cy
    qvec: tuple[float, float, float, float]  # qw, qx, qy, qz of world-to-camera
    tvec: tuple[float, float, float]
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    name: str


def colmap_image_name(index: int, name: str) -> str:
    return f"image_{index:04d}_{safe_name(name)}.png"


def colmap_camera(prediction: Prediction, index: int) -> ColmapCamera:
    """The COLMAP camera of view ``index`` at its input image size (see the module docstring)."""
    view = prediction.views[index]
    x0, y0, x1, y1 = view.crop_box
    if prediction.output_resolution == "processing":
        scale_x, scale_y = (x1 - x0) / view.width, (y1 - y0) / view.height
        offset_x, offset_y = float(x0), float(y0)
    else:  # the view's image is input[round(y0):, round(x0):] at the input's pixel size
        scale_x = scale_y = 1.0
        offset_x, offset_y = float(round(x0)), float(round(y0))
    intrinsics = np.asarray(view.intrinsics, dtype=np.float64)
    extrinsics = world_to_camera(view)
    xyzw = matrix_to_quaternion(torch.from_numpy(extrinsics[:3, :3])).numpy()
    xyzw = xyzw / np.linalg.norm(xyzw)
    input_height, input_width = view.input_size
    return ColmapCamera(
        width=int(input_width),
        height=int(input_height),
        params=(
            float(intrinsics[0, 0] * scale_x),
            float(intrinsics[1, 1] * scale_y),
            float(intrinsics[0, 2] * scale_x + offset_x),
            float(intrinsics[1, 2] * scale_y + offset_y),
        ),
        qvec=(float(xyzw[3]), float(xyzw[0]), float(xyzw[1]), float(xyzw[2])),
        tvec=tuple(float(value) for value in extrinsics[:3, 3]),
        scale_x=float(scale_x),
        scale_y=float(scale_y),
        offset_x=offset_x,
        offset_y=offset_y,
        name=colmap_image_name(index, view.name),
    )


def _observations(points: PointCloud, cameras: Sequence[ColmapCamera]) -> tuple[np.ndarray, ...]:
    """Per point: its 2D position in its COLMAP image and its index among that image's 2D points."""
    count = len(cameras)
    scale = np.array([[c.scale_x, c.scale_y] for c in cameras] or np.zeros((0, 2)))
    offset = np.array([[c.offset_x, c.offset_y] for c in cameras] or np.zeros((0, 2)))
    xy = (points.pixel.astype(np.float64) + 0.5) * scale[points.view] + offset[points.view]
    order = np.argsort(points.view, kind="stable")
    per_view = np.bincount(points.view, minlength=count)
    starts = np.concatenate([[0], np.cumsum(per_view)[:-1]])
    rank = np.empty(len(points), dtype=np.int64)
    rank[order] = np.arange(len(points)) - np.repeat(starts, per_view)
    return xy, rank, order, per_view


def _text_files(points: PointCloud, cameras: Sequence[ColmapCamera]) -> dict[str, str]:
    xy, rank, order, per_view = _observations(points, cameras)
    camera_lines = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        f"# Number of cameras: {len(cameras)}",
    ]
    for camera_id, camera in enumerate(cameras, start=1):
        params = " ".join(repr(value) for value in camera.params)
        camera_lines.append(f"{camera_id} PINHOLE {camera.width} {camera.height} {params}")

    mean = len(points) / max(len(cameras), 1)
    image_lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {len(cameras)}, mean observations per image: {mean!r}",
    ]
    point_ids = np.arange(1, len(points) + 1)
    start = 0
    for image_id, camera in enumerate(cameras, start=1):
        pose = " ".join(repr(value) for value in (*camera.qvec, *camera.tvec))
        image_lines.append(f"{image_id} {pose} {image_id} {camera.name}")
        chosen = order[start : start + per_view[image_id - 1]]
        start += per_view[image_id - 1]
        image_lines.append(
            " ".join(
                f"{x:.6f} {y:.6f} {pid}"
                for x, y, pid in zip(
                    xy[chosen, 0].tolist(),
                    xy[chosen, 1].tolist(),
                    point_ids[chosen].tolist(),
                    strict=True,
                )
            )
        )

    point_lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {len(points)}, mean track length: 1",
    ]
    rows = zip(
        point_ids.tolist(),
        points.xyz.tolist(),
        points.rgb.tolist(),
        (points.view + 1).tolist(),
        rank.tolist(),
        strict=True,
    )
    point_lines.extend(
        f"{pid} {x:.9g} {y:.9g} {z:.9g} {r} {g} {b} 0 {image} {index}"
        for pid, (x, y, z), (r, g, b), image, index in rows
    )
    return {
        "cameras.txt": "\n".join(camera_lines) + "\n",
        "images.txt": "\n".join(image_lines) + "\n",
        "points3D.txt": "\n".join(point_lines) + "\n",
    }


def _binary_files(points: PointCloud, cameras: Sequence[ColmapCamera]) -> dict[str, bytes]:
    xy, rank, order, per_view = _observations(points, cameras)
    camera_bytes = bytearray(struct.pack("<Q", len(cameras)))
    for camera_id, camera in enumerate(cameras, start=1):
        camera_bytes += struct.pack(
            "<iiQQ4d", camera_id, _PINHOLE_MODEL_ID, camera.width, camera.height, *camera.params
        )

    observation = np.dtype([("x", "<f8"), ("y", "<f8"), ("point3D_id", "<i8")])
    image_bytes = bytearray(struct.pack("<Q", len(cameras)))
    start = 0
    for image_id, camera in enumerate(cameras, start=1):
        chosen = order[start : start + per_view[image_id - 1]]
        start += per_view[image_id - 1]
        image_bytes += struct.pack("<i4d3di", image_id, *camera.qvec, *camera.tvec, image_id)
        image_bytes += camera.name.encode("utf-8") + b"\0"
        records = np.empty(len(chosen), dtype=observation)
        records["x"], records["y"] = xy[chosen, 0], xy[chosen, 1]
        records["point3D_id"] = chosen + 1
        image_bytes += struct.pack("<Q", len(chosen)) + records.tobytes()

    point = np.dtype(
        [
            ("id", "<u8"),
            ("xyz", "<f8", (3,)),
            ("rgb", "u1", (3,)),
            ("error", "<f8"),
            ("track_length", "<u8"),
            ("image_id", "<i4"),
            ("point2D_idx", "<i4"),
        ]
    )
    records = np.empty(len(points), dtype=point)
    records["id"] = np.arange(1, len(points) + 1)
    records["xyz"] = points.xyz
    records["rgb"] = points.rgb
    records["error"] = 0.0
    records["track_length"] = 1
    records["image_id"] = points.view + 1
    records["point2D_idx"] = rank
    return {
        "cameras.bin": bytes(camera_bytes),
        "images.bin": bytes(image_bytes),
        "points3D.bin": struct.pack("<Q", len(points)) + records.tobytes(),
    }


def _colmap_image(view: ViewPrediction, camera: ColmapCamera) -> tuple[np.ndarray, str | None]:
    """The view's image on its COLMAP camera's canvas, and a note when it is not exact."""
    image = np.asarray(view.image, dtype=np.uint8)
    identity = camera.scale_x == camera.scale_y == 1.0 and camera.offset_x == camera.offset_y == 0
    if identity and image.shape[:2] == (camera.height, camera.width):
        return image, None
    import cv2

    left, top = round(camera.offset_x), round(camera.offset_y)
    width = round(view.width * camera.scale_x)
    height = round(view.height * camera.scale_y)
    if (width, height) != (view.width, view.height):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    canvas = np.zeros((camera.height, camera.width, 3), dtype=np.uint8)
    box_top, box_left = max(top, 0), max(left, 0)
    box_bottom = min(top + height, camera.height)
    box_right = min(left + width, camera.width)
    canvas[box_top:box_bottom, box_left:box_right] = image[
        box_top - top : box_bottom - top, box_left - left : box_right - left
    ]
    parts = []
    if (width, height) != (view.width, view.height):
        parts.append(f"upsampled from {view.width}x{view.height}")
    if (left, top, width, height) != (0, 0, camera.width, camera.height):
        parts.append(f"covers only x {left}..{left + width}, y {top}..{top + height} (rest black)")
    # Named by its path in the export folder, as the manifest's file list names it.
    return canvas, f"{COLMAP_FOLDER}/{IMAGES_FOLDER}/{camera.name}: " + ", ".join(parts)


def colmap_files(
    prediction: Prediction,
    folder: Path,
    *,
    colmap_formats: Sequence[str] = COLMAP_FORMATS,
    colmap_images: bool = True,
    confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE,
    max_points: int | None = DEFAULT_MAX_POINTS,
    seed: int = DEFAULT_SEED,
    drop_sky: bool = True,
    points: PointCloud | None = None,
) -> list[ManifestEntry]:
    """Write the COLMAP model in ``colmap_formats`` (``text``, ``binary``) and, with
    ``colmap_images``, the images (see the module docstring)."""
    unknown = sorted(set(colmap_formats) - set(COLMAP_FORMATS))
    if unknown or not colmap_formats:
        raise ValueError(
            f"colmap_formats must be a non-empty subset of {', '.join(COLMAP_FORMATS)}, "
            f"got {list(colmap_formats)}"
        )
    require_cameras(prediction, "a COLMAP model")
    if points is None:
        points = fuse_points(
            prediction,
            confidence_percentile=confidence_percentile,
            max_points=max_points,
            seed=seed,
            drop_sky=drop_sky,
        )
    cameras = [colmap_camera(prediction, index) for index in range(len(prediction))]
    notes = []
    if prediction.output_resolution == "processing":
        notes.append(
            "the prediction is at processing resolution: cameras and 2D points are scaled to "
            "each view's input size through its crop box"
        )
    if any(abs(float(view.intrinsics[0, 1])) > 1e-6 for view in prediction.views):
        notes.append("intrinsics skew is dropped: COLMAP PINHOLE cameras have none")
    model = folder / COLMAP_FOLDER / MODEL_FOLDER
    details: dict = {"points": len(points), "camera_model": "PINHOLE"}
    if notes:
        details["notes"] = notes
    with all_or_nothing() as batch:
        if "text" in colmap_formats:
            for name, text in _text_files(points, cameras).items():
                batch.write(
                    model / name,
                    lambda target, text=text: target.write_text(text, encoding="utf-8"),
                    "colmap_text",
                    **details,
                )
        if "binary" in colmap_formats:
            for name, payload in _binary_files(points, cameras).items():
                batch.write(
                    model / name,
                    lambda target, payload=payload: target.write_bytes(payload),
                    "colmap_binary",
                    **details,
                )
        if colmap_images:
            from PIL import Image

            for index, (view, camera) in enumerate(zip(prediction.views, cameras, strict=True)):
                picture, note = _colmap_image(view, camera)

                def save(target: Path, picture: np.ndarray = picture) -> None:
                    Image.fromarray(picture).save(target, format="PNG", compress_level=1)

                extra = {"notes": [note]} if note else {}
                batch.write(
                    folder / COLMAP_FOLDER / IMAGES_FOLDER / camera.name,
                    save,
                    "colmap_image",
                    index,
                    **extra,
                )
    return batch.entries


def export_colmap(
    prediction: Prediction,
    folder: Path,
    *,
    colmap_formats: Sequence[str] = COLMAP_FORMATS,
    colmap_images: bool = True,
    confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE,
    max_points: int | None = DEFAULT_MAX_POINTS,
    seed: int = DEFAULT_SEED,
    drop_sky: bool = True,
    points: PointCloud | None = None,
) -> list[Path]:
    """Write a COLMAP sparse model (see :func:`colmap_files`)."""
    entries = colmap_files(
        prediction,
        folder,
        colmap_formats=colmap_formats,
        colmap_images=colmap_images,
        confidence_percentile=confidence_percentile,
        max_points=max_points,
        seed=seed,
        drop_sky=drop_sky,
        points=points,
    )
    return [entry.path for entry in entries]
