"""Synthetic predictions for the exporter tests (and bench/bench_export.py): a textured room with
a cube on its floor, ray-cast exactly from a few cameras with known poses, so depth, cameras and
colours agree to float precision without running a model."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from da3cog.geometry import project_points
from da3cog.pipeline import Prediction, ViewPrediction

# Room interior (x right, y down, z forward: OpenCV world = first camera) and a cube on its floor.
ROOM = (np.array([-4.0, -2.5, -3.0]), np.array([4.0, 1.5, 7.0]))
CUBE = (np.array([-0.6, 0.3, 2.4]), np.array([0.6, 1.5, 3.6]))


def _rotation_y(degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rotation_x(degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


# Camera centres and orientations (camera-to-world rotations) of up to 8 views.
_CENTRES = [
    (0.0, 0.0, 0.0),
    (1.2, -0.2, 0.3),
    (-1.1, -0.3, 0.5),
    (0.5, -0.6, -0.8),
    (-0.4, 0.2, -1.0),
    (2.0, -0.4, 1.0),
    (-2.0, 0.0, 0.8),
    (0.0, -0.8, 1.2),
]
_ANGLES = [(0, 0), (-14, 4), (12, 6), (-5, 10), (4, -3), (-25, 8), (22, 2), (0, 15)]


def world_to_camera(index: int) -> np.ndarray:
    if index == 0:
        return np.eye(4)
    yaw, pitch = _ANGLES[index % len(_ANGLES)]
    rotation = _rotation_y(yaw) @ _rotation_x(-pitch)  # camera-to-world
    centre = np.array(_CENTRES[index % len(_CENTRES)])
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = rotation.T
    extrinsics[:3, 3] = -rotation.T @ centre
    return extrinsics


def _cast(origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Ray parameter of the first surface hit: the cube if hit, else the room's walls."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / directions
        low = (ROOM[0] - origin) * inverse
        high = (ROOM[1] - origin) * inverse
        exit_room = np.maximum(low, high).min(axis=-1)
        low = (CUBE[0] - origin) * inverse
        high = (CUBE[1] - origin) * inverse
        near = np.minimum(low, high).max(axis=-1)
        far = np.maximum(low, high).min(axis=-1)
    hit_cube = (near <= far) & (near > 1e-6)
    return np.where(hit_cube, near, exit_room)


def _texture(points: np.ndarray) -> np.ndarray:
    """A checkerboard tinted by position, so neighbouring points differ in colour."""
    cells = np.floor(points * 2.0).astype(np.int64).sum(axis=-1) % 2
    tint = (np.sin(points * np.array([1.3, 2.1, 0.7])) * 0.5 + 0.5) * 180
    return np.clip(tint + 60 * cells[..., None], 0, 255).astype(np.uint8)


def make_view(
    index: int,
    height: int,
    width: int,
    *,
    input_size: tuple[int, int] | None = None,
    crop_box: tuple[float, float, float, float] | None = None,
    name: str | None = None,
    holes: bool = False,
    extrinsics: np.ndarray | None = None,
) -> ViewPrediction:
    """View ``index`` of the room at ``height x width`` pixels (from ``extrinsics``,
    world-to-camera ``(4, 4)``, instead of the index's camera when given)."""
    focal = 0.8 * width
    intrinsics = np.array([[focal, 0, width / 2], [0, focal * 1.02, height / 2 - 1.5], [0, 0, 1]])
    extrinsics = world_to_camera(index) if extrinsics is None else extrinsics
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones_like(cols, dtype=float)], axis=-1)
    camera_rays = pixels @ np.linalg.inv(intrinsics).T  # z == 1: ray parameter == z-depth
    rotation_c2w = extrinsics[:3, :3].T
    origin = -rotation_c2w @ extrinsics[:3, 3]
    depth = _cast(origin, camera_rays @ rotation_c2w.T)
    world = origin + depth[..., None] * (camera_rays @ rotation_c2w.T)
    image = _texture(world)
    rng = np.random.default_rng(index)
    confidence = 1.0 + 4.0 * rng.random((height, width)) + 2.0 / depth
    if holes:
        depth[:3, :4] = 0.0
        depth[-2:, -3:] = np.nan
    frozen = []
    for array, dtype in (
        (depth, np.float32),
        (confidence, np.float32),
        (image, np.uint8),
        (extrinsics, np.float32),
        (intrinsics, np.float32),
    ):
        array = np.ascontiguousarray(array, dtype=dtype)
        array.flags.writeable = False
        frozen.append(array)
    size = input_size or (height, width)
    return ViewPrediction(
        name=name or f"view_{index:04d}",
        depth=frozen[0],
        confidence=frozen[1],
        image=frozen[2],
        extrinsics=frozen[3],
        intrinsics=frozen[4],
        input_size=size,
        crop_box=crop_box or (0.0, 0.0, float(size[1]), float(size[0])),
    )


def make_prediction(
    views: int = 3,
    size: tuple[int, int] = (36, 48),
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    output_resolution: str = "input",
    input_sizes: Sequence[tuple[int, int]] | None = None,
    crop_boxes: Sequence[tuple[float, float, float, float]] | None = None,
    names: Sequence[str] | None = None,
    holes: bool = False,
    is_metric: bool = False,
) -> Prediction:
    """A :class:`Prediction` of the synthetic room from ``views`` cameras."""
    sizes = list(sizes) if sizes is not None else [size] * views
    made = tuple(
        make_view(
            index,
            *sizes[index],
            input_size=input_sizes[index] if input_sizes else None,
            crop_box=crop_boxes[index] if crop_boxes else None,
            name=names[index] if names else None,
            holes=holes and index == 0,
        )
        for index in range(len(sizes))
    )
    return Prediction(
        views=made,
        is_metric=is_metric,
        model_id="synthetic/room",
        model_preset="synthetic",
        processing_size=sizes[0],
        output_resolution=output_resolution,
        pose_conditioned=False,
        reference_view=0,
        notes=("synthetic scene",),
    )


def snapshot(prediction: Prediction) -> Prediction:
    """A deep copy to compare against after an exporter ran."""
    return copy.deepcopy(prediction)


def assert_unchanged(prediction: Prediction, before: Prediction) -> None:
    """Every field and array of ``prediction`` equals ``before`` (NaN equal to NaN)."""
    assert len(prediction.views) == len(before.views)
    for field in ("is_metric", "model_id", "model_preset", "processing_size", "notes"):
        assert getattr(prediction, field) == getattr(before, field)
    for view, old in zip(prediction.views, before.views, strict=True):
        assert (view.name, view.input_size, view.crop_box) == (
            old.name,
            old.input_size,
            old.crop_box,
        )
        for key in ("depth", "confidence", "image", "extrinsics", "intrinsics", "sky"):
            new_array, old_array = getattr(view, key, None), getattr(old, key, None)
            assert (new_array is None) == (old_array is None), key
            if new_array is None:
                continue
            assert new_array.dtype == old_array.dtype and not new_array.flags.writeable
            np.testing.assert_array_equal(new_array, old_array)
    flags = ("cameras_estimated", "intrinsics_source", "focal_source", "metric_scale")
    for flag in (*flags, "model_revision", "precision"):
        assert getattr(prediction, flag, None) == getattr(before, flag, None), flag
    gaussians = getattr(prediction, "gaussians", None)
    old_gaussians = getattr(before, "gaussians", None)
    assert (gaussians is None) == (old_gaussians is None)
    if gaussians is not None:
        assert gaussians.grid == old_gaussians.grid
        for key in ("means", "scales", "rotations", "harmonics", "opacities"):
            new_array, old_array = getattr(gaussians, key), getattr(old_gaussians, key)
            assert new_array.dtype == old_array.dtype and not new_array.flags.writeable, key
            np.testing.assert_array_equal(new_array, old_array)


def surface_points(view: ViewPrediction, dtype: type = np.float32) -> np.ndarray:
    """``(H * W, 3)`` world points of a view's pixel centres at their depth, computed in
    ``dtype``."""
    from da3cog.geometry import depth_to_world_points

    return (
        depth_to_world_points(
            torch.from_numpy(np.array(view.depth, dtype=dtype)),
            torch.from_numpy(np.array(view.intrinsics, dtype=dtype)),
            torch.from_numpy(np.array(view.extrinsics, dtype=dtype)),
        )
        .numpy()
        .reshape(-1, 3)
    )


def add_gaussians(prediction: Prediction, seed: int = 0) -> Prediction:
    """``prediction`` with one synthetic Gaussian per pixel of every view (all views must share
    one size, the processing grid): centred on the pixel's surface point, random positive
    scales, unit quaternions, SH degree 2 coefficients and opacities in (0, 1)."""
    from da3cog.pipeline import Gaussians

    height, width = prediction.views[0].depth.shape
    rng = np.random.default_rng(seed)
    means = np.concatenate([surface_points(view) for view in prediction.views])
    count = len(means)
    rotations = rng.normal(size=(count, 4))
    rotations /= np.linalg.norm(rotations, axis=1, keepdims=True)
    arrays = {
        "means": means,
        "scales": np.exp(rng.uniform(-6.0, -1.0, (count, 3))),
        "rotations": rotations,
        "harmonics": rng.normal(0.0, 0.5, (count, 3, 9)),
        "opacities": rng.uniform(0.02, 0.98, count),
    }
    frozen = {}
    for key, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        array.flags.writeable = False
        frozen[key] = array
    gaussians = Gaussians(**frozen, grid=(len(prediction.views), height, width))
    return dataclasses.replace(prediction, gaussians=gaussians)


# ---------------------------------------------------------------------------------------------
# The synthetic scene itself is consistent (what the exporter tests rely on).
# ---------------------------------------------------------------------------------------------


def test_views_see_the_same_surfaces() -> None:
    prediction = make_prediction(views=2, size=(30, 40))
    first, second = prediction.views
    rows, cols = np.mgrid[0:30, 0:40]
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones_like(cols, float)], -1).reshape(-1, 3)
    camera = pixels @ np.linalg.inv(first.intrinsics.astype(float)).T * first.depth.reshape(-1, 1)
    uv, z = project_points(
        torch.from_numpy(camera),
        torch.from_numpy(second.intrinsics.astype(float)),
        torch.from_numpy(second.extrinsics.astype(float)),
    )
    uv, z = uv.numpy(), z.numpy()
    inside = (uv[:, 0] > 1) & (uv[:, 0] < 39) & (uv[:, 1] > 1) & (uv[:, 1] < 29)
    col, row = np.floor(uv[inside]).astype(int).T
    seen = second.depth[row, col]
    # Most reprojected points land on a pixel whose depth agrees (away from occlusion edges).
    agree = np.abs(seen - z[inside]) < 0.05 * z[inside]
    assert inside.sum() > 300 and agree.mean() > 0.8


def require(module: str) -> Any:
    """Import an independent reader used by the export tests. scripts/test.sh installs them all
    and sets DA3COG_REQUIRE_EXPORT_TOOLS=1, so there a missing reader fails instead of skipping."""
    if os.environ.get("DA3COG_REQUIRE_EXPORT_TOOLS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is installed by scripts/test.sh")
