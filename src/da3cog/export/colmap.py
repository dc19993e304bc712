"""A COLMAP sparse model (``cameras``, ``images``, ``points3D``) in text and / or binary.

Layout: ``colmap/sparse/0/{cameras,images,points3D}.{txt,bin}`` and, optionally, the images the
model names in ``colmap/images/`` (``image_0000_<name>.png``).

Cameras are PINHOLE (one per view) describing exactly the image written for the view: the
part of the input the view covers (its crop box; the whole input unless a crop was asked for),
at the input's pixel size. With ``output_resolution="input"`` that is the view's own image and
intrinsics; with ``"processing"`` the intrinsics are scaled from the processing size onto it
and the image written is upsampled (the entry's notes say so). Images carry the world-to-camera
pose as COLMAP wants it (``qw qx qy qz``, ``tx ty tz``).

Points3D are the fused, confidence-filtered points (:func:`da3cog.export.points.fuse_points`)
with multi-view tracks built from the predicted geometry (:func:`build_tracks`): a point is
observed in its source view at its pixel's centre and in the other views where it projects
inside the image onto a pixel whose depth agrees with the point's depth in that camera within
``track_depth_tolerance`` (relative); a farther point is occluded there and not observed. The
views nearest the source view come first, and a track holds at most ``MAX_TRACK_LENGTH``
views, so the tracks' memory grows with the points, not points x views; a point not seen
in ``MAX_TRACK_MISSES`` of the views it is looked for in is not looked for further, so their
time grows with the views, not views x views. 2D
points are at the exact projections (COLMAP convention, pixel centres at ``+0.5``). With two or
more views only points seen by at least two keep their place (bundle adjustment needs tracks of
two or more; ``min_track_length`` changes that).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from da3cog.export.files import ManifestEntry, all_or_nothing, returning_paths, safe_name
from da3cog.export.points import (
    DEFAULT_CONFIDENCE_PERCENTILE,
    DEFAULT_MAX_POINTS,
    DEFAULT_SEED,
    PointCloud,
    fuse_points,
    require_cameras,
    skew_note,
    surface_depth_at,
    world_to_camera,
)
from da3cog.geometry import matrix_to_quaternion, project_points
from da3cog.pipeline import Prediction, ViewPrediction

COLMAP_FOLDER = "colmap"
MODEL_FOLDER = Path("sparse") / "0"
IMAGES_FOLDER = "images"
COLMAP_FORMATS: tuple[str, ...] = ("text", "binary")
_PINHOLE_MODEL_ID = 1


@dataclass(frozen=True)
class ColmapCamera:
    """One view as a COLMAP camera + image (input-image pixels).

    ``u_colmap = scale_x * u_view`` (same for v) maps the view's continuous pixel coordinates
    onto the COLMAP image, which is the part of the input the view covers.
    """

    width: int
    height: int
    params: tuple[float, float, float, float]  # fx, fy, cx, cy
    qvec: tuple[float, float, float, float]  # qw, qx, qy, qz of world-to-camera
    tvec: tuple[float, float, float]
    scale_x: float
    scale_y: float
    name: str


def colmap_image_name(index: int, name: str) -> str:
    return f"image_{index:04d}_{safe_name(name)}.png"


def colmap_camera(prediction: Prediction, index: int) -> ColmapCamera:
    """The COLMAP camera of view ``index`` (see the module docstring)."""
    view = prediction.views[index]
    x0, y0, x1, y1 = view.crop_box
    if prediction.output_resolution == "processing":
        width = max(1, round(x1 - x0))
        height = max(1, round(y1 - y0))
        scale_x, scale_y = width / view.width, height / view.height
    else:  # the view's image is the covered part of the input at the input's pixel size
        width, height = view.width, view.height
        scale_x = scale_y = 1.0
    intrinsics = np.asarray(view.intrinsics, dtype=np.float64)
    extrinsics = world_to_camera(view)
    xyzw = matrix_to_quaternion(torch.from_numpy(extrinsics[:3, :3])).numpy()
    xyzw = xyzw / np.linalg.norm(xyzw)
    return ColmapCamera(
        width=int(width),
        height=int(height),
        params=(
            float(intrinsics[0, 0] * scale_x),
            float(intrinsics[1, 1] * scale_y),
            float(intrinsics[0, 2] * scale_x),
            float(intrinsics[1, 2] * scale_y),
        ),
        qvec=(float(xyzw[3]), float(xyzw[0]), float(xyzw[1]), float(xyzw[2])),
        tvec=tuple(float(value) for value in extrinsics[:3, 3]),
        scale_x=float(scale_x),
        scale_y=float(scale_y),
        name=colmap_image_name(index, view.name),
    )


DEFAULT_TRACK_DEPTH_TOLERANCE = 0.02
# Views a point is observed in at most (bundle adjustment needs two; COLMAP's own tracks of a
# video are rarely longer): tracks then grow with the points, not points x views (a point seen
# by all of 80 views cost some 90 bytes an observation, 1.5 GiB for 200,000 points).
MAX_TRACK_LENGTH = 16
# Views a point is looked for in and not seen before it is given up: a point near an image's
# edge never fills its track, and looking for it in every view made the tracks take views x
# views projections (33 s for 400 views of 12x16 pixels).
MAX_TRACK_MISSES = 2 * MAX_TRACK_LENGTH


@dataclass(frozen=True)
class Tracks:
    """The points of a COLMAP model and where each is seen.

    Attributes:
        points: indices into the fused cloud of the points kept.
        point: ``(K,)`` for each observation, its point's position in ``points``.
        view: ``(K,)`` the view it is seen in.
        xy: ``(K, 2)`` where, in that view's COLMAP image pixels (pixel centres at +0.5).
        Observations are sorted by point, then view; each point's source view comes first.
    """

    points: np.ndarray
    point: np.ndarray
    view: np.ndarray
    xy: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Track length of each kept point."""
        return np.bincount(self.point, minlength=len(self.points))


def build_tracks(
    prediction: Prediction,
    points: PointCloud,
    cameras: Sequence[ColmapCamera],
    *,
    depth_tolerance: float = DEFAULT_TRACK_DEPTH_TOLERANCE,
    min_track_length: int | None = None,
    max_track_length: int = MAX_TRACK_LENGTH,
    drop_sky: bool = True,
) -> Tracks:
    """Multi-view tracks from the predicted geometry (see the module docstring).
    ``min_track_length``: points seen by fewer views are left out (default: 2 with two or more
    views, else 1). ``max_track_length``: a point is looked for in the views nearest its
    source view in the sequence first (1 after, 1 before, 2 after...) and observed in at most
    this many, so the tracks take memory in proportion to the points, not points x views;
    it is looked for in at most ``MAX_TRACK_MISSES`` views that do not see it, so they take
    time in proportion to the views, not views x views."""
    count = len(prediction.views)
    if min_track_length is None:
        min_track_length = 2 if count > 1 else 1
    if max_track_length < max(min_track_length, 1):
        raise ValueError(
            f"max_track_length must be at least min_track_length ({min_track_length}), "
            f"got {max_track_length}"
        )
    scale = np.array([[c.scale_x, c.scale_y] for c in cameras], dtype=np.float64)
    source_xy = (points.pixel.astype(np.float64) + 0.5) * scale[points.view]
    observed_point = [np.arange(len(points), dtype=np.int32)]
    observed_view = [points.view.astype(np.int32)]
    observed_xy = [source_xy]
    length = np.ones(len(points), dtype=np.int32)
    missed = np.zeros(len(points), dtype=np.int32)
    by_view = [np.flatnonzero(points.view == index) for index in range(count)]
    xyz = torch.from_numpy(points.xyz.astype(np.float64))
    offsets = [sign * step for step in range(1, count) for sign in (1, -1)]
    for offset in offsets:
        looking = (length < max_track_length) & (missed < MAX_TRACK_MISSES)
        if not looking.any():
            break
        for source in range(max(0, -offset), min(count, count - offset)):
            target = source + offset
            candidates = by_view[source][looking[by_view[source]]]
            if not len(candidates):
                continue
            missed[candidates] += 1  # until it turns out to be seen, below
            view = prediction.views[target]
            uv, z = (
                values.numpy()
                for values in project_points(
                    xyz[candidates],
                    torch.from_numpy(np.asarray(view.intrinsics, dtype=np.float64)),
                    torch.from_numpy(world_to_camera(view)),
                )
            )
            u, v = uv[:, 0], uv[:, 1]
            seen = (z > 1e-9) & (u >= 0) & (u < view.width) & (v >= 0) & (v < view.height)
            candidates, z, u, v = candidates[seen], z[seen], u[seen], v[seen]
            cols, rows = u.astype(np.int64), v.astype(np.int64)
            # At the projected pixels only: whole maps for each pair of views would cost
            # views x views full-size temporaries.
            depth, usable = surface_depth_at(view, rows, cols, drop_sky)
            agrees = usable & (np.abs(z - depth) <= depth_tolerance * depth)
            observed_point.append(candidates[agrees].astype(np.int32))
            observed_view.append(np.full(int(agrees.sum()), target, dtype=np.int32))
            observed_xy.append(np.stack([u[agrees], v[agrees]], axis=1) * scale[target])
            length[candidates[agrees]] += 1
            missed[candidates[agrees]] -= 1
    point = np.concatenate(observed_point)
    view_index = np.concatenate(observed_view)
    xy = np.concatenate(observed_xy)
    source = np.zeros(len(point), dtype=bool)
    source[: len(points)] = True
    kept = np.flatnonzero(length >= min_track_length)
    renumber = np.full(len(points), -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    keep = renumber[point] >= 0
    point, view_index, xy, source = renumber[point[keep]], view_index[keep], xy[keep], source[keep]
    # By point, its source observation first, then by view.
    order = np.lexsort((view_index, ~source, point))
    return Tracks(kept, point[order], view_index[order].astype(np.int64), xy[order])


def _image_order(tracks: Tracks, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations grouped by image (``order``), each image's count (``per_view``), and each
    observation's index among its image's 2D points (``rank``: COLMAP's POINT2D_IDX)."""
    order = np.argsort(tracks.view, kind="stable")
    per_view = np.bincount(tracks.view, minlength=count)
    starts = np.concatenate([[0], np.cumsum(per_view)[:-1]])
    rank = np.empty(len(tracks.view), dtype=np.int64)
    rank[order] = np.arange(len(tracks.view)) - np.repeat(starts, per_view)
    return order, per_view, rank


def _text_files(
    points: PointCloud, tracks: Tracks, cameras: Sequence[ColmapCamera]
) -> dict[str, str]:
    order, per_view, rank = _image_order(tracks, len(cameras))
    camera_lines = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        f"# Number of cameras: {len(cameras)}",
    ]
    for camera_id, camera in enumerate(cameras, start=1):
        params = " ".join(repr(value) for value in camera.params)
        camera_lines.append(f"{camera_id} PINHOLE {camera.width} {camera.height} {params}")

    mean = len(tracks.view) / max(len(cameras), 1)
    image_lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {len(cameras)}, mean observations per image: {mean!r}",
    ]
    point_ids = tracks.point + 1
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
                    tracks.xy[chosen, 0].tolist(),
                    tracks.xy[chosen, 1].tolist(),
                    point_ids[chosen].tolist(),
                    strict=True,
                )
            )
        )

    lengths = tracks.lengths
    mean_track = float(lengths.mean()) if len(lengths) else 0.0
    point_lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {len(tracks.points)}, mean track length: {mean_track!r}",
    ]
    pairs = [f"{image} {index}" for image, index in zip(
        (tracks.view + 1).tolist(), rank.tolist(), strict=True
    )]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    xyz = points.xyz[tracks.points].tolist()
    rgb = points.rgb[tracks.points].tolist()
    point_lines.extend(
        f"{pid + 1} {x:.9g} {y:.9g} {z:.9g} {r} {g} {b} 0 "
        + " ".join(pairs[bounds[pid] : bounds[pid + 1]])
        for pid, ((x, y, z), (r, g, b)) in enumerate(zip(xyz, rgb, strict=True))
    )
    return {
        "cameras.txt": "\n".join(camera_lines) + "\n",
        "images.txt": "\n".join(image_lines) + "\n",
        "points3D.txt": "\n".join(point_lines) + "\n",
    }


def _binary_files(
    points: PointCloud, tracks: Tracks, cameras: Sequence[ColmapCamera]
) -> dict[str, bytes]:
    order, per_view, rank = _image_order(tracks, len(cameras))
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
        records["x"], records["y"] = tracks.xy[chosen, 0], tracks.xy[chosen, 1]
        records["point3D_id"] = tracks.point[chosen] + 1
        image_bytes += struct.pack("<Q", len(chosen)) + records.tobytes()

    # Each point: a fixed header, then its variable-length track; headers and track entries
    # are laid out with numpy and interleaved by slicing.
    header = np.dtype(
        [
            ("id", "<u8"),
            ("xyz", "<f8", (3,)),
            ("rgb", "u1", (3,)),
            ("error", "<f8"),
            ("track_length", "<u8"),
        ]
    )
    lengths = tracks.lengths
    headers = np.empty(len(tracks.points), dtype=header)
    headers["id"] = np.arange(1, len(tracks.points) + 1)
    headers["xyz"] = points.xyz[tracks.points]
    headers["rgb"] = points.rgb[tracks.points]
    headers["error"] = 0.0
    headers["track_length"] = lengths
    entry = np.dtype([("image_id", "<i4"), ("point2D_idx", "<i4")])
    entries = np.empty(len(tracks.point), dtype=entry)
    entries["image_id"] = tracks.view + 1
    entries["point2D_idx"] = rank
    header_bytes = memoryview(headers.tobytes())
    entry_bytes = memoryview(entries.tobytes())
    size, bounds = header.itemsize, np.concatenate([[0], np.cumsum(lengths)]) * entry.itemsize
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(tracks.points))]
    for pid in range(len(tracks.points)):
        parts.append(header_bytes[pid * size : (pid + 1) * size])
        parts.append(entry_bytes[bounds[pid] : bounds[pid + 1]])
    return {
        "cameras.bin": bytes(camera_bytes),
        "images.bin": bytes(image_bytes),
        "points3D.bin": b"".join(parts),
    }


def _colmap_image(view: ViewPrediction, camera: ColmapCamera) -> np.ndarray:
    """The image the view's COLMAP camera describes (see :func:`_resampled_note`)."""
    image = np.asarray(view.image, dtype=np.uint8)
    if image.shape[:2] == (camera.height, camera.width):
        return image
    import cv2

    return cv2.resize(image, (camera.width, camera.height), interpolation=cv2.INTER_CUBIC)


def _resampled_note(view: ViewPrediction, camera: ColmapCamera) -> str | None:
    """A note when the view's image is resampled to its COLMAP camera's size."""
    if np.shape(view.image)[:2] == (camera.height, camera.width):
        return None
    # Named by its path in the export folder, as the manifest's file list names it.
    return (
        f"{COLMAP_FOLDER}/{IMAGES_FOLDER}/{camera.name}: upsampled from "
        f"{view.width}x{view.height} to {camera.width}x{camera.height}"
    )


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
    track_depth_tolerance: float = DEFAULT_TRACK_DEPTH_TOLERANCE,
    min_track_length: int | None = None,
    points: PointCloud | None = None,
) -> list[ManifestEntry]:
    """Write the COLMAP model in ``colmap_formats`` (``text``, ``binary``) and, with
    ``colmap_images``, the images (see the module docstring and :func:`build_tracks` for
    ``track_depth_tolerance`` and ``min_track_length``)."""
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
    tracks = build_tracks(
        prediction,
        points,
        cameras,
        depth_tolerance=track_depth_tolerance,
        min_track_length=min_track_length,
        drop_sky=drop_sky,
    )
    lengths = tracks.lengths
    notes = []
    if prediction.output_resolution == "processing":
        notes.append(
            "the prediction is at processing resolution: cameras and 2D points are scaled to "
            "the input pixels of each view's crop box"
        )
    skew = skew_note(prediction, "COLMAP PINHOLE cameras")
    if skew is not None:
        notes.append(skew)
    left_out = len(points) - len(tracks.points)
    if left_out:
        notes.append(
            f"{left_out} of {len(points)} fused points are seen by fewer than "
            f"{min_track_length or 2} views and are left out of the COLMAP model (bundle "
            "adjustment needs tracks of two or more); the PLY and GLB keep them"
        )
    model = folder / COLMAP_FOLDER / MODEL_FOLDER
    details: dict = {
        "points": len(tracks.points),
        "camera_model": "PINHOLE",
        "mean_track_length": round(float(lengths.mean()), 4) if len(lengths) else 0.0,
        "track_depth_tolerance": track_depth_tolerance,
    }
    if notes:
        details["notes"] = notes
    with all_or_nothing(parallel=True) as batch:
        if "text" in colmap_formats:
            for name, text in _text_files(points, tracks, cameras).items():
                batch.write(
                    model / name,
                    lambda target, text=text: target.write_text(text, encoding="utf-8"),
                    "colmap_text",
                    **details,
                )
        if "binary" in colmap_formats:
            for name, payload in _binary_files(points, tracks, cameras).items():
                batch.write(
                    model / name,
                    lambda target, payload=payload: target.write_bytes(payload),
                    "colmap_binary",
                    **details,
                )
        if colmap_images:
            from PIL import Image

            for index, (view, camera) in enumerate(zip(prediction.views, cameras, strict=True)):

                def save(target: Path, view=view, camera=camera) -> None:
                    picture = _colmap_image(view, camera)
                    Image.fromarray(picture).save(target, format="PNG", compress_level=1)

                note = _resampled_note(view, camera)
                extra = {"notes": [note]} if note else {}
                batch.write(
                    folder / COLMAP_FOLDER / IMAGES_FOLDER / camera.name,
                    save,
                    "colmap_image",
                    index,
                    **extra,
                )
    return batch.entries


export_colmap = returning_paths(colmap_files, "export_colmap")
