"""All views' depth fused into one coloured point cloud in the world frame, and the camera
checks every geometric exporter shares."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from da3cog.geometry import depth_to_world_points, invert_rigid_np, pixels_to_world_points
from da3cog.pipeline import Prediction, ViewPrediction

DEFAULT_CONFIDENCE_PERCENTILE = 40.0
DEFAULT_MAX_POINTS = 1_000_000
DEFAULT_SEED = 0


# --------------------------------------------------------------------------------------------
# Cameras (single-view models may predict none)
# --------------------------------------------------------------------------------------------


def camera_problem(prediction: Prediction) -> str | None:
    """Why the views cannot be placed in one world frame, or None when they can.

    Every view needs intrinsics; extrinsics may be missing only for a lone view (its camera
    frame is then the world frame)."""
    for index, view in enumerate(prediction.views):
        if view.intrinsics is None:
            return (
                f"view {index} ({view.name}) has no intrinsics: the model estimated no camera "
                "and none were given (pass intrinsics, or use an image with an EXIF focal length)"
            )
    if len(prediction.views) > 1 and any(view.extrinsics is None for view in prediction.views):
        return (
            "the views have no camera poses (this model estimates none), so they are not in one "
            "world frame: export them one prediction at a time, or use an any-view model"
        )
    return None


def skew_note(prediction: Prediction, cameras: str) -> str | None:
    """A note when some view's intrinsics have a skew that ``cameras`` (a format's camera
    model) cannot carry, else None (predicted intrinsics have none; a user's may)."""
    skewed = [
        view.name
        for view in prediction.views
        if view.intrinsics is not None and abs(float(view.intrinsics[0, 1])) > 1e-6
    ]
    if not skewed:
        return None
    return (
        f"intrinsics skew is dropped for {', '.join(skewed)}: {cameras} have none (their points "
        "reproject a little off; cameras.json has the full intrinsics)"
    )


def require_cameras(prediction: Prediction, what: str) -> None:
    """Raise ValueError when :func:`camera_problem` finds one; ``what`` names the export."""
    problem = camera_problem(prediction)
    if problem is not None:
        raise ValueError(f"{what} needs cameras: {problem}")


def world_to_camera(view: ViewPrediction) -> np.ndarray:
    """``(4, 4)`` float64 world-to-camera; the identity for a (lone) view without extrinsics."""
    if view.extrinsics is None:
        return np.eye(4)
    return np.asarray(view.extrinsics, dtype=np.float64)


def sky_mask(view: ViewPrediction) -> np.ndarray | None:
    """The view's sky mask (models with a sky head), or None."""
    sky = getattr(view, "sky", None)
    return None if sky is None else np.asarray(sky, dtype=bool)


def _surface(depth: np.ndarray, sky: np.ndarray | None) -> np.ndarray:
    valid = np.isfinite(depth) & (depth > 0)
    return valid if sky is None else valid & ~sky


def surface_mask(view: ViewPrediction, drop_sky: bool = True) -> np.ndarray:
    """Pixels with a finite positive depth (and, with ``drop_sky``, not sky)."""
    return _surface(np.asarray(view.depth), sky_mask(view) if drop_sky else None)


def surface_depth_at(
    view: ViewPrediction, rows: np.ndarray, cols: np.ndarray, drop_sky: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The view's depth (float64) at these pixels and which of them are surface (the rule of
    :func:`surface_mask`), reading only those pixels (no full-size temporaries)."""
    depth = np.asarray(view.depth)[rows, cols].astype(np.float64)
    sky = sky_mask(view) if drop_sky else None
    return depth, _surface(depth, None if sky is None else sky[rows, cols])


# --------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointCloud:
    """Points in the prediction's world frame (OpenCV axes, depth's unit).

    Attributes:
        xyz: ``(P, 3)`` float32.
        rgb: ``(P, 3)`` uint8 colour of the source pixel.
        confidence: ``(P,)`` float32 confidence of the source pixel, or None when the model
            predicts no confidence (then nothing was filtered by confidence).
        view: ``(P,)`` int32 index of the source view.
        pixel: ``(P, 2)`` int32 ``(col, row)`` of the source pixel in its view (its centre is at
            ``(col + 0.5, row + 0.5)``).
        normals: ``(P, 3)`` float32 unit normals facing the source camera, or None.
        confidence_threshold: the confidence below which pixels were dropped.
    """

    xyz: np.ndarray
    rgb: np.ndarray
    confidence: np.ndarray | None
    view: np.ndarray
    pixel: np.ndarray
    normals: np.ndarray | None
    confidence_threshold: float

    def __len__(self) -> int:
        return len(self.xyz)


def _has_confidence(prediction: Prediction) -> bool:
    return all(view.confidence is not None for view in prediction.views)


def confidence_threshold(prediction: Prediction, percentile: float, drop_sky: bool = True) -> float:
    """Confidence at ``percentile`` of all views' surface pixels (:func:`surface_mask`);
    -inf for percentile 0 or a model without confidence."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"confidence_percentile must be within [0, 100], got {percentile}")
    if percentile == 0.0 or not _has_confidence(prediction):
        return -np.inf
    found = pooled_percentile(
        lambda: (
            np.asarray(view.confidence)[surface_mask(view, drop_sky)] for view in prediction.views
        ),
        percentile,
    )
    return np.inf if found is None else float(found)


# Values a percentile over every view's pixels is taken of at most: past that, of an even
# sample of them (every k-th), so that memory stays bounded however many views there are
# (a long chunked run's outputs spilled to disk would otherwise come back whole).
PERCENTILE_SAMPLE = 1 << 24


def pooled_percentile(
    parts: Callable[[], Iterable[np.ndarray]], q: float | Sequence[float]
) -> Any:
    """``np.percentile(..., q)`` of the finite values of every array ``parts()`` yields, as
    if concatenated: exact up to :data:`PERCENTILE_SAMPLE` values, past that of every k-th
    (in order) so that at most that many are held. ``parts`` is called twice (counted, then
    gathered). None when there is no finite value."""
    total = sum(int(np.count_nonzero(np.isfinite(part))) for part in parts())
    if not total:
        return None
    stride = -(-total // PERCENTILE_SAMPLE)
    gathered, seen = [], 0
    for part in parts():
        values = np.ravel(part)
        values = values[np.isfinite(values)]
        # A copy: a slice would keep the whole part alive.
        gathered.append(values[(-seen) % stride :: stride].copy())
        seen += len(values)
    pooled = np.concatenate(gathered)
    # The pooled copy is ours to reorder: no second copy of the values.
    return np.percentile(pooled, q, overwrite_input=True)


def _normals(world: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Unit normals of a ``(H, W, 3)`` grid of points from central differences, turned to face
    ``centre``; zero where undetermined."""
    if min(world.shape[:2]) < 2:
        return np.zeros_like(world)
    d_row, d_col = np.gradient(world, axis=(0, 1))
    normals = np.cross(d_col, d_row)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    normals = np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)
    facing = np.sum(normals * (centre - world), axis=-1, keepdims=True)
    return np.where(facing < 0, -normals, normals).astype(np.float32)


def _chosen_pixels(
    views: Sequence[ViewPrediction],
    keep_of: Callable[[ViewPrediction], np.ndarray],
    max_points: int | None,
    seed: int,
) -> Iterator[np.ndarray]:
    """Per view, the flat (row-major) indices of its kept pixels (``keep_of(view)``) that make
    the cloud: all of them, or a uniform subsample of ``max_points`` over every view's kept
    pixels in view, then pixel order (seeded by ``seed``). Computed one view at a time, when
    the caller gets there (the masks are counted first, then made again: not all held)."""
    counts = np.array([np.count_nonzero(keep_of(view)) for view in views], dtype=np.int64)
    total = int(counts.sum())
    subsets: list[np.ndarray | None] = [None] * len(views)
    if max_points is not None and total > max_points:
        chosen = np.sort(np.random.default_rng(seed).choice(total, max_points, replace=False))
        ends = np.cumsum(counts)
        pieces = np.split(chosen, np.searchsorted(chosen, ends[:-1]))
        subsets = [piece - start for piece, start in zip(pieces, ends - counts, strict=True)]
    for view, subset in zip(views, subsets, strict=True):
        flat = np.flatnonzero(keep_of(view))
        yield flat if subset is None else flat[subset]


def fuse_points(
    prediction: Prediction,
    *,
    confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE,
    max_points: int | None = DEFAULT_MAX_POINTS,
    seed: int = DEFAULT_SEED,
    normals: bool = False,
    drop_sky: bool = True,
) -> PointCloud:
    """Back-project every view (:func:`da3cog.geometry.depth_to_world_points`) and keep the
    pixels with valid depth, not sky (with ``drop_sky``, for models with a sky mask) and with
    confidence at or above the ``confidence_percentile`` of those pixels over all views
    (default: drop the lowest 40%; no confidence filter for models without confidence). When
    more than ``max_points`` remain, a uniform subsample seeded by ``seed`` is kept (in view,
    then row-major pixel order). Raises ValueError when the views have no shared cameras
    (:func:`camera_problem`).

    Only the pixels kept are back-projected (a capped cloud of large views computes a fraction
    of their points); normals need each view's whole grid of points."""
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be at least 1 (or None for no cap), got {max_points}")
    require_cameras(prediction, "a point cloud")
    threshold = confidence_threshold(prediction, confidence_percentile, drop_sky)
    with_confidence = _has_confidence(prediction)

    def keep_of(view: ViewPrediction) -> np.ndarray:
        keep = surface_mask(view, drop_sky)
        if with_confidence:
            keep &= np.asarray(view.confidence) >= threshold
        return keep

    chosen = _chosen_pixels(prediction.views, keep_of, max_points, seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("xyz", "rgb", "conf", "view", "pix")}
    normal_parts: list[np.ndarray] = []
    for index, (view, flat) in enumerate(zip(prediction.views, chosen, strict=True)):
        if not len(flat):
            continue
        rows, cols = np.divmod(flat, view.depth.shape[1])
        extrinsics = world_to_camera(view)
        intrinsics = torch.from_numpy(np.array(view.intrinsics, dtype=np.float32))
        extrinsics_f32 = torch.from_numpy(extrinsics.astype(np.float32))
        depth = np.asarray(view.depth, dtype=np.float32)
        parts["xyz"].append(
            pixels_to_world_points(
                torch.from_numpy(depth.reshape(-1)[flat]),
                torch.from_numpy(rows),
                torch.from_numpy(cols),
                intrinsics,
                extrinsics_f32,
            ).numpy()
        )
        parts["rgb"].append(view.image.reshape(-1, 3)[flat])
        if with_confidence:
            parts["conf"].append(np.asarray(view.confidence).reshape(-1)[flat])
        parts["view"].append(np.full(len(flat), index, dtype=np.int32))
        parts["pix"].append(np.stack([cols, rows], axis=-1).astype(np.int32))
        if normals:
            world = depth_to_world_points(
                torch.from_numpy(np.array(depth)), intrinsics, extrinsics_f32
            ).numpy()
            centre = invert_rigid_np(extrinsics)[:3, 3]
            grid = np.where(surface_mask(view, drop_sky=False)[..., None], world, np.nan)
            normal_grid = np.nan_to_num(_normals(grid, centre.astype(np.float32)), nan=0.0)
            normal_parts.append(normal_grid.reshape(-1, 3)[flat])

    def joined(key: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        if not parts[key]:
            return np.zeros(shape, dtype=dtype)
        return np.concatenate(parts[key]).astype(dtype, copy=False)

    xyz = joined("xyz", (0, 3), np.float32)
    rgb = joined("rgb", (0, 3), np.uint8)
    conf = joined("conf", (0,), np.float32) if with_confidence else None
    view_index = joined("view", (0,), np.int32)
    pixel = joined("pix", (0, 2), np.int32)
    normal = None
    if normals:
        normal = np.concatenate(normal_parts) if normal_parts else np.zeros((0, 3), np.float32)
    return PointCloud(
        xyz=xyz,
        rgb=rgb,
        confidence=conf,
        view=view_index,
        pixel=pixel,
        normals=normal,
        confidence_threshold=threshold,
    )
