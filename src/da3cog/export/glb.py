"""The fused point cloud and the cameras as a glTF 2.0 binary (``.glb``), written with numpy.

glTF is Y up with the camera looking down -Z; the prediction's world uses OpenCV axes (y down,
z forward). This exporter, and only it, converts: ``p_gltf = diag(1, -1, -1) @ p_world``. Nothing
is re-centred or scaled, so glTF coordinates are the world coordinates of ``cameras.json`` with y
and z negated.

Colours: glTF 2.0 defines ``COLOR_0`` as linear RGB, which viewers convert to sRGB for display;
the photos' sRGB bytes are therefore linearised (IEC 61966-2-1) and stored as normalised 16-bit
values (8 bits would band the darks). glTF cameras have no principal point: a view whose
principal point is off-centre is seen through its camera node with the image centre instead,
which shifts the picture (the manifest says so).

Scene content: one ``points`` node (a POINTS primitive with POSITION and COLOR_0, unlit), and
per view an optional ``frustum_0000_<name>`` node (LINES: apex to the image corners and the image
rectangle) and an optional glTF perspective camera node ``camera_0000_<name>`` at the view's pose.
"""

from __future__ import annotations

import colorsys
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from da3cog import __version__
from da3cog.export.files import (
    ManifestEntry,
    all_or_nothing,
    json_number,
    returning_paths,
    safe_name,
)
from da3cog.export.points import (
    DEFAULT_CONFIDENCE_PERCENTILE,
    DEFAULT_MAX_POINTS,
    DEFAULT_SEED,
    PointCloud,
    fuse_points,
    require_cameras,
    skew_note,
    surface_mask,
    world_to_camera,
)
from da3cog.geometry import invert_rigid_np, matrix_to_quaternion
from da3cog.pipeline import Prediction

GLB_NAME = "scene.glb"
# OpenCV -> glTF axes (x right, y up, z back): negate y and z.
OPENCV_TO_GLTF = np.diag([1.0, -1.0, -1.0])

_FLOAT, _UNSIGNED_BYTE, _UNSIGNED_SHORT = 5126, 5121, 5123
_COMPONENT_TYPES = {np.dtype(np.float32): _FLOAT, np.dtype(np.uint8): _UNSIGNED_BYTE}
_COMPONENT_TYPES[np.dtype(np.uint16)] = _UNSIGNED_SHORT
_ARRAY_BUFFER = 34962
_POINTS, _LINES = 0, 1


class _Builder:
    """Accumulates glTF JSON objects and the parts of one binary buffer."""

    def __init__(self) -> None:
        self.doc: dict[str, list[dict[str, Any]]] = {
            key: []
            for key in ("nodes", "meshes", "materials", "cameras", "accessors", "bufferViews")
        }
        self.parts: list[bytes | memoryview] = []
        self.length = 0

    def add(self, key: str, item: dict[str, Any]) -> int:
        self.doc[key].append(item)
        return len(self.doc[key]) - 1

    def _append(self, part: bytes | memoryview) -> None:
        self.parts.append(part)
        self.length += len(part)

    def accessor(self, data: np.ndarray, kind: str, normalized: bool = False) -> int:
        """A tightly packed vertex-attribute accessor (4-byte aligned) for ``(count, k)`` data."""
        data = np.ascontiguousarray(data)
        if self.length % 4:
            self._append(b"\0" * (-self.length % 4))
        view = self.add(
            "bufferViews",
            {
                "buffer": 0,
                "byteOffset": self.length,
                "byteLength": data.nbytes,
                "target": _ARRAY_BUFFER,
            },
        )
        self._append(memoryview(data).cast("B"))
        accessor: dict[str, Any] = {
            "bufferView": view,
            "componentType": _COMPONENT_TYPES[data.dtype],
            "count": len(data),
            "type": kind,
        }
        if normalized:
            accessor["normalized"] = True
        if data.dtype == np.float32:
            columns = np.ascontiguousarray(data.T)  # per-column reductions are much faster
            accessor["min"] = columns.min(axis=1).astype(float).tolist()
            accessor["max"] = columns.max(axis=1).astype(float).tolist()
        return self.add("accessors", accessor)

    def glb(self, scene: dict[str, Any], extras: dict[str, Any]) -> list[bytes | memoryview]:
        """The GLB file as a list of parts to write one after the other."""
        document: dict[str, Any] = {
            "asset": {"version": "2.0", "generator": f"da3cog {__version__}", "extras": extras},
            "extensionsUsed": ["KHR_materials_unlit"],
            "scene": 0,
            "scenes": [scene],
        }
        document.update({key: value for key, value in self.doc.items() if value})
        if self.length:
            document["buffers"] = [{"byteLength": self.length}]
        if not self.doc["materials"]:
            del document["extensionsUsed"]
        json_chunk = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")
        json_chunk += b" " * (-len(json_chunk) % 4)
        padding = b"\0" * (-self.length % 4)
        total = 12 + 8 + len(json_chunk) + (8 + self.length + len(padding) if self.length else 0)
        parts: list[bytes | memoryview] = [
            struct.pack("<III", 0x46546C67, 2, total),
            struct.pack("<II", len(json_chunk), 0x4E4F534A),
            json_chunk,
        ]
        if self.length:
            parts.append(struct.pack("<II", self.length + len(padding), 0x004E4942))
            parts.extend(self.parts)
            parts.append(padding)
        return parts


def to_gltf(points: np.ndarray) -> np.ndarray:
    """World points ``(..., 3)`` in OpenCV axes -> glTF axes (same dtype)."""
    return points * np.diagonal(OPENCV_TO_GLTF).astype(points.dtype)


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded ``(..., 3)`` uint8 -> linear RGB in [0, 1] (float64), IEC 61966-2-1."""
    values = np.asarray(rgb, dtype=np.float64) / 255.0
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


# Every sRGB byte's linear uint16: a lookup instead of a power per channel of every point.
_LINEAR_UINT16 = np.round(srgb_to_linear(np.arange(256, dtype=np.uint8)) * 65535.0).astype(
    np.uint16
)


def linear_colours(rgb: np.ndarray) -> np.ndarray:
    """sRGB bytes ``(N, 3)`` -> ``(N, 4)`` normalised uint16 linear RGBA (opaque): COLOR_0."""
    rgba = np.full((len(rgb), 4), 65535, np.uint16)
    rgba[:, :3] = _LINEAR_UINT16[np.asarray(rgb, dtype=np.uint8)]
    return rgba


def _view_colour(index: int, count: int) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb((index + 0.5) / max(count, 1), 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def scene_extent(prediction: Prediction, points: PointCloud) -> float:
    """A size for the scene: the diagonal of the 5th-95th percentile box of the points and the
    camera centres, else the median valid depth, else 1."""
    centres = np.stack([invert_rigid_np(world_to_camera(v))[:3, 3] for v in prediction.views])
    stride = max(1, len(points) // 200_000)  # percentiles of an even subsample are plenty
    everything = np.concatenate([points.xyz[::stride].astype(np.float64), centres])
    low, high = np.percentile(np.ascontiguousarray(everything.T), (5.0, 95.0), axis=1)
    diagonal = float(np.linalg.norm(high - low))
    if np.isfinite(diagonal) and diagonal > 0:
        return diagonal
    depths = np.concatenate([v.depth[surface_mask(v)] for v in prediction.views])
    median = float(np.median(depths)) if depths.size else 0.0
    return median if np.isfinite(median) and median > 0 else 1.0


def frustum_segments(
    intrinsics: np.ndarray, extrinsics: np.ndarray, width: int, height: int, depth: float
) -> np.ndarray:
    """``(8, 2, 3)`` world-frame line segments of a camera's frustum cut at ``depth``: apex to
    the four image corners, then the image rectangle."""
    corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], float)
    camera_points = (np.linalg.inv(np.asarray(intrinsics, float)) @ corners.T).T * depth
    camera_to_world = invert_rigid_np(np.asarray(extrinsics, float))
    world = camera_points @ camera_to_world[:3, :3].T + camera_to_world[:3, 3]
    apex = camera_to_world[:3, 3]
    spokes = [(apex, corner) for corner in world]
    rim = [(world[k], world[(k + 1) % 4]) for k in range(4)]
    return np.array(spokes + rim)


def glb_bytes(
    prediction: Prediction,
    points: PointCloud,
    *,
    frustums: bool = True,
    frustum_size: float = 0.03,
    gltf_cameras: bool = True,
) -> bytes:
    """The GLB document (see the module docstring). ``frustum_size`` is the frustum depth as a
    fraction of :func:`scene_extent`."""
    return b"".join(
        glb_parts(
            prediction,
            points,
            frustums=frustums,
            frustum_size=frustum_size,
            gltf_cameras=gltf_cameras,
        )
    )


def glb_parts(
    prediction: Prediction,
    points: PointCloud,
    *,
    frustums: bool = True,
    frustum_size: float = 0.03,
    gltf_cameras: bool = True,
) -> list[bytes | memoryview]:
    """:func:`glb_bytes` as consecutive parts (no copy of the vertex data)."""
    builder = _Builder()
    nodes: list[int] = []
    if len(points):
        material = builder.add(
            "materials",
            {
                "name": "vertex_colours_unlit",
                "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 1.0},
                "extensions": {"KHR_materials_unlit": {}},
            },
        )
        primitive = {
            "attributes": {
                "POSITION": builder.accessor(to_gltf(points.xyz).astype(np.float32), "VEC3"),
                "COLOR_0": builder.accessor(linear_colours(points.rgb), "VEC4", normalized=True),
            },
            "mode": _POINTS,
            "material": material,
        }
        mesh = builder.add("meshes", {"name": "points", "primitives": [primitive]})
        nodes.append(builder.add("nodes", {"name": "points", "mesh": mesh}))

    depth = frustum_size * scene_extent(prediction, points)
    count = len(prediction.views)
    for index, view in enumerate(prediction.views):
        label = f"{index:04d}_{safe_name(view.name)}"
        if frustums:
            segments = frustum_segments(
                view.intrinsics, world_to_camera(view), view.width, view.height, depth
            )
            vertices = to_gltf(segments.reshape(-1, 3)).astype(np.float32)
            colour = np.tile(np.array(_view_colour(index, count), np.uint8), (len(vertices), 1))
            primitive = {
                "attributes": {
                    "POSITION": builder.accessor(vertices, "VEC3"),
                    "COLOR_0": builder.accessor(linear_colours(colour), "VEC4", normalized=True),
                },
                "mode": _LINES,
            }
            mesh = builder.add("meshes", {"name": f"frustum_{label}", "primitives": [primitive]})
            nodes.append(builder.add("nodes", {"name": f"frustum_{label}", "mesh": mesh}))
        if gltf_cameras:
            nodes.append(_camera_node(builder, view, label, near=max(depth * 1e-2, 1e-6)))

    scene: dict[str, Any] = {"name": "da3cog"}
    if nodes:
        scene["nodes"] = nodes
    extras = {
        "frame": "world of cameras.json with y and z negated (OpenCV -> glTF axes)",
        "units": "metres" if prediction.is_metric else "relative",
        "model": prediction.model_id,
        "views": [view.name for view in prediction.views],
        "points": len(points),
        "confidence_threshold": json_number(points.confidence_threshold),
    }
    return builder.glb(scene, extras)


def _camera_node(builder: _Builder, view: Any, label: str, near: float) -> int:
    """A glTF perspective camera at the view's pose (glTF cameras have no principal point or
    pixel aspect: the field of view is taken from fy and the aspect from the image)."""
    fx, fy = float(view.intrinsics[0, 0]), float(view.intrinsics[1, 1])
    camera = builder.add(
        "cameras",
        {
            "name": f"camera_{label}",
            "type": "perspective",
            "perspective": {
                "yfov": 2.0 * math.atan(view.height / (2.0 * fy)),
                "aspectRatio": (view.width / fx) / (view.height / fy),
                "znear": near,
            },
        },
    )
    camera_to_world = invert_rigid_np(world_to_camera(view))
    rotation = OPENCV_TO_GLTF @ camera_to_world[:3, :3] @ OPENCV_TO_GLTF
    quaternion = matrix_to_quaternion(torch.from_numpy(rotation)).numpy()
    quaternion = quaternion / np.linalg.norm(quaternion)
    return builder.add(
        "nodes",
        {
            "name": f"camera_{label}",
            "camera": camera,
            "rotation": quaternion.tolist(),
            "translation": (OPENCV_TO_GLTF @ camera_to_world[:3, 3]).tolist(),
        },
    )


def _off_centre(view: Any, tolerance: float = 0.01) -> bool:
    """Whether the principal point is off the image centre by more than ``tolerance`` of the
    image size (a pixel or two of rounding is not worth a note)."""
    cx, cy = float(view.intrinsics[0, 2]), float(view.intrinsics[1, 2])
    return (
        abs(cx - view.width / 2) > tolerance * view.width
        or abs(cy - view.height / 2) > tolerance * view.height
    )


def glb_files(
    prediction: Prediction,
    folder: Path,
    *,
    confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE,
    max_points: int | None = DEFAULT_MAX_POINTS,
    seed: int = DEFAULT_SEED,
    frustums: bool = True,
    frustum_size: float = 0.03,
    gltf_cameras: bool = True,
    drop_sky: bool = True,
    points: PointCloud | None = None,
) -> list[ManifestEntry]:
    """Write ``scene.glb`` (see the module docstring; ``points`` reuses a fused cloud)."""
    require_cameras(prediction, "a GLB scene")
    if points is None:
        points = fuse_points(
            prediction,
            confidence_percentile=confidence_percentile,
            max_points=max_points,
            seed=seed,
            drop_sky=drop_sky,
        )
    parts = glb_parts(
        prediction, points, frustums=frustums, frustum_size=frustum_size, gltf_cameras=gltf_cameras
    )

    def write(target: Path) -> None:
        with target.open("wb") as handle:
            handle.writelines(parts)

    notes = []
    off_centre = [view.name for view in prediction.views if _off_centre(view)]
    if gltf_cameras and off_centre:
        notes.append(
            "glTF cameras have no principal point: the camera nodes of "
            f"{', '.join(off_centre)} look through the image centre instead of their "
            "off-centre principal point, so their view is shifted (the frustums and points are "
            "exact; cameras.json has the full intrinsics)"
        )
    skew = skew_note(prediction, "glTF cameras") if gltf_cameras else None
    if skew is not None:
        notes.append(skew)
    with all_or_nothing() as batch:
        batch.write(
            folder / GLB_NAME,
            write,
            "glb_scene",
            points=len(points),
            frustums=frustums,
            gltf_cameras=gltf_cameras,
            frame="glTF axes: world x, -y, -z",
            colours="COLOR_0: linear RGB (sRGB pixels linearised), normalised 16-bit",
            **({"notes": notes} if notes else {}),
        )
    return batch.entries


export_glb = returning_paths(glb_files, "export_glb")
