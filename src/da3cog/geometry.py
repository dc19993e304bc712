"""Camera geometry: pure torch / numpy functions, no I/O and no modules.

Conventions used throughout da3cog:

* Extrinsics are world-to-camera rigid transforms in OpenCV axes (x right, y down, z forward),
  as ``(..., 3, 4)`` or ``(..., 4, 4)`` float32 matrices.
* Intrinsics are ``(..., 3, 3)`` matrices in pixels of the image they describe. Continuous pixel
  coordinates put the centre of pixel ``(col, row)`` at ``(col + 0.5, row + 0.5)`` (COLMAP's
  convention), so an intrinsics matrix follows a resize by plain scaling of its first two rows.
* Depth is the z coordinate in the camera frame (along the optical axis), not the ray length.
* Quaternions are scalar-last ``(x, y, z, w)`` with ``w >= 0``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Rigid transforms
# --------------------------------------------------------------------------------------------


def as_homogeneous(transform: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 4)`` or ``(..., 4, 4)`` -> ``(..., 4, 4)`` with a ``[0, 0, 0, 1]`` last row."""
    if transform.shape[-2:] == (4, 4):
        return transform
    if transform.shape[-2:] != (3, 4):
        raise ValueError(
            f"expected (..., 3, 4) or (..., 4, 4) matrices, got {tuple(transform.shape)}"
        )
    bottom = torch.zeros_like(transform[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([transform, bottom], dim=-2)


def invert_rigid(transform: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``[R | t]``: ``[R^T | -R^T t]``.

    Accepts ``(..., 3, 4)`` (returns ``(..., 3, 4)``) or ``(..., 4, 4)`` (returns ``(..., 4, 4)``).
    """
    rotation = transform[..., :3, :3]
    translation = transform[..., :3, 3:]
    rotation_t = rotation.mT
    top = torch.cat([rotation_t, -rotation_t @ translation], dim=-1)
    return torch.cat([top, transform[..., 3:, :]], dim=-2)


def invert_rigid_np(transform: np.ndarray) -> np.ndarray:
    """Numpy twin of :func:`invert_rigid`."""
    rotation_t = np.swapaxes(transform[..., :3, :3], -1, -2)
    top = np.concatenate([rotation_t, -rotation_t @ transform[..., :3, 3:]], axis=-1)
    return np.concatenate([top, transform[..., 3:, :]], axis=-2)


def anchor_to_first_view(extrinsics: torch.Tensor) -> torch.Tensor:
    """Re-express world-to-camera extrinsics ``(N, 3|4, 4)`` so view 0 is the world frame.

    Returns ``(N, 4, 4)`` with ``E'_i = E_i @ E_0^-1``; ``E'_0`` is the identity.
    """
    homogeneous = as_homogeneous(extrinsics)
    anchored = homogeneous @ invert_rigid(homogeneous[:1])
    # Exactly the identity, not identity up to rounding.
    anchored[0] = torch.eye(4, dtype=anchored.dtype, device=anchored.device)
    return anchored


# --------------------------------------------------------------------------------------------
# Rotations and quaternions (scalar-last)
# --------------------------------------------------------------------------------------------


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` quaternions ``(x, y, z, w)`` (any norm) -> ``(..., 3, 3)`` rotations."""
    i, j, k, r = torch.unbind(quaternions, -1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1)
    entries = (
        1 - two_s * (j * j + k * k),
        two_s * (i * j - k * r),
        two_s * (i * k + j * r),
        two_s * (i * j + k * r),
        1 - two_s * (i * i + k * k),
        two_s * (j * k - i * r),
        two_s * (i * k - j * r),
        two_s * (j * k + i * r),
        1 - two_s * (i * i + j * j),
    )
    return torch.stack(entries, -1).reshape((*quaternions.shape[:-1], 3, 3))


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` rotations -> ``(..., 4)`` unit quaternions ``(x, y, z, w)``, ``w >= 0``.

    Picks the best-conditioned of the four closed-form candidates (Shepperd's method), as the
    DA3 camera encoder was trained with.
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"expected (..., 3, 3) rotation matrices, got {tuple(matrix.shape)}")
    batch_shape = matrix.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(
        matrix.reshape((*batch_shape, 9)), dim=-1
    )
    squared = torch.stack(
        [
            1.0 + m00 + m11 + m22,
            1.0 + m00 - m11 - m22,
            1.0 - m00 + m11 - m22,
            1.0 - m00 - m11 + m22,
        ],
        dim=-1,
    )
    magnitudes = torch.where(squared > 0, torch.sqrt(squared), torch.zeros_like(squared))
    # Row c holds the quaternion (w, x, y, z) multiplied by 2 * magnitudes[c].
    scaled_candidates = torch.stack(
        [
            torch.stack([magnitudes[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, magnitudes[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, magnitudes[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, magnitudes[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    floor = torch.tensor(0.1, dtype=magnitudes.dtype, device=magnitudes.device)
    candidates = scaled_candidates / (2.0 * magnitudes[..., None].max(floor))
    best = torch.nn.functional.one_hot(magnitudes.argmax(dim=-1), num_classes=4) > 0.5
    wxyz = candidates[best, :].reshape((*batch_shape, 4))
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


# --------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------


def scale_intrinsics(
    intrinsics: torch.Tensor | np.ndarray,
    from_hw: tuple[int, int],
    to_hw: tuple[int, int],
) -> torch.Tensor | np.ndarray:
    """Intrinsics ``(..., 3, 3)`` of an image of size ``from_hw`` for the same image resized to
    ``to_hw`` (heights and widths in pixels). fx, cx scale with the width ratio, fy, cy with the
    height ratio; exact under the pixel-centre-at-+0.5 convention."""
    scaled = intrinsics.clone() if isinstance(intrinsics, torch.Tensor) else intrinsics.copy()
    scaled[..., 0, :] *= to_hw[1] / from_hw[1]
    scaled[..., 1, :] *= to_hw[0] / from_hw[0]
    return scaled


def field_of_view_intrinsics(
    height: int, width: int, fov_y: torch.Tensor, fov_x: torch.Tensor
) -> torch.Tensor:
    """Pinhole intrinsics ``(..., 3, 3)`` from vertical / horizontal fields of view (radians),
    principal point at the image centre."""
    fy = (height / 2.0) / torch.clamp(torch.tan(fov_y / 2.0), 1e-6)
    fx = (width / 2.0) / torch.clamp(torch.tan(fov_x / 2.0), 1e-6)
    intrinsics = torch.zeros((*fov_y.shape, 3, 3), dtype=fov_y.dtype, device=fov_y.device)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return intrinsics


# --------------------------------------------------------------------------------------------
# Depth <-> points
# --------------------------------------------------------------------------------------------


def _camera_points(
    depth: torch.Tensor, u: torch.Tensor, v: torch.Tensor, intrinsics: torch.Tensor, pixel_dims: int
) -> torch.Tensor:
    """Camera-frame points ``(..., *pixels, 3)`` of depth ``(..., *pixels)`` at pixel coordinates
    ``u`` (columns) and ``v`` (rows) broadcasting against the ``pixel_dims`` trailing dims."""
    pixels = (None,) * pixel_dims

    def entry(row: int, col: int) -> torch.Tensor:
        return intrinsics[(..., row, col, *pixels)]

    y = (v - entry(1, 2)) / entry(1, 1)
    x = (u - entry(0, 2) - entry(0, 1) * y) / entry(0, 0)
    return torch.stack([x * depth, y * depth, depth], dim=-1)


def _camera_to_world(
    camera_points: torch.Tensor, extrinsics: torch.Tensor, pixel_dims: int
) -> torch.Tensor:
    camera_to_world = invert_rigid(as_homogeneous(extrinsics))
    pixels = (None,) * pixel_dims
    rotation = camera_to_world[(..., *pixels, slice(0, 3), slice(0, 3))]
    translation = camera_to_world[(..., *pixels, slice(0, 3), 3)]
    return (rotation @ camera_points[..., None])[..., 0] + translation


def depth_to_camera_points(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Back-project depth maps ``(..., H, W)`` through intrinsics ``(..., 3, 3)`` to camera-frame
    points ``(..., H, W, 3)``, sampling each pixel at its centre ``(col + 0.5, row + 0.5)``."""
    height, width = depth.shape[-2:]
    rows = torch.arange(height, dtype=depth.dtype, device=depth.device) + 0.5
    cols = torch.arange(width, dtype=depth.dtype, device=depth.device) + 0.5
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    return _camera_points(depth, u, v, intrinsics, pixel_dims=2)


def depth_to_world_points(
    depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor
) -> torch.Tensor:
    """Depth ``(..., H, W)`` -> world points ``(..., H, W, 3)`` using world-to-camera
    extrinsics ``(..., 3|4, 4)``."""
    camera_points = depth_to_camera_points(depth, intrinsics)
    return _camera_to_world(camera_points, extrinsics, pixel_dims=2)


def pixels_to_world_points(
    depth: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    intrinsics: torch.Tensor,
    extrinsics: torch.Tensor,
) -> torch.Tensor:
    """:func:`depth_to_world_points` for some pixels only: depth ``(..., P)`` at integer pixel
    ``rows`` and ``cols`` ``(P,)`` (sampled at their centres) -> world points ``(..., P, 3)``,
    the same values the whole grid gives at those pixels."""
    v = rows.to(depth.dtype) + 0.5
    u = cols.to(depth.dtype) + 0.5
    camera_points = _camera_points(depth, u, v, intrinsics, pixel_dims=1)
    return _camera_to_world(camera_points, extrinsics, pixel_dims=1)


def project_points(
    world_points: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``(..., P, 3)`` -> continuous pixel coordinates ``(..., P, 2)`` and depth
    ``(..., P)`` in one camera (intrinsics ``(..., 3, 3)``, world-to-camera ``(..., 3|4, 4)``)."""
    rotation = extrinsics[..., None, :3, :3]
    translation = extrinsics[..., None, :3, 3]
    camera_points = (rotation @ world_points[..., None])[..., 0] + translation
    homogeneous = (intrinsics[..., None, :, :] @ camera_points[..., None])[..., 0]
    depth = homogeneous[..., 2]
    return homogeneous[..., :2] / depth[..., None], depth


# --------------------------------------------------------------------------------------------
# Camera pose from per-pixel rays (DA3's ray head)
# --------------------------------------------------------------------------------------------

_RAY_RANSAC_ITERATIONS = 100
_RAY_RANSAC_SAMPLE_SIZE = 8
_RAY_RANSAC_CANDIDATE_RATIO = 0.3
_RAY_RANSAC_INLIER_THRESHOLD = 0.2
_RAY_MAX_REFIT_POINTS = 8000
_RAY_MIN_Z = 1e-4
# Views are fitted two at a time to bound the (views, iterations, points) working set.
_RAY_VIEWS_PER_CHUNK = 2


def _weighted_homography(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted DLT homographies: ``(B, K, 2)`` source / target points and ``(B, K)`` weights ->
    ``(B, 3, 3)`` with ``H[2, 2] = 1``."""
    if source.shape[-2] < 4:
        raise ValueError("at least 4 confident rays are needed to recover a camera from rays")
    w = weights.sqrt().unsqueeze(-1)
    x, y = source[..., 0:1], source[..., 1:2]
    u, v = target[..., 0:1], target[..., 1:2]
    zeros = torch.zeros_like(x)
    rows_u = torch.cat([-x * w, -y * w, -w, zeros, zeros, zeros, x * u * w, y * u * w, u * w], -1)
    rows_v = torch.cat([zeros, zeros, zeros, -x * w, -y * w, -w, x * v * w, y * v * w, v * w], -1)
    system = torch.cat([rows_u, rows_v], dim=-2)
    _, _, vh = torch.linalg.svd(system)
    homography = vh[..., -1, :].reshape((*source.shape[:-2], 3, 3))
    return homography / homography[..., 2:3, 2:3]


def _ransac_homographies(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    sample_indices: torch.Tensor,
    candidate_count: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Confidence-weighted RANSAC homographies from ``(B, N, 2)`` points, ``(B, N)`` weights and
    ``(iterations, sample)`` indices into the ``candidate_count`` most confident points."""
    views, count, _ = source.shape
    device = source.device
    candidates = torch.argsort(weights, descending=True, dim=1)[:, :candidate_count]
    picked = candidates[:, sample_indices]
    batch = torch.arange(views, device=device).view(views, 1, 1).expand_as(picked)
    hypotheses = _weighted_homography(
        source[batch, picked].flatten(0, 1),
        target[batch, picked].flatten(0, 1),
        weights[batch, picked].flatten(0, 1),
    )
    iterations = sample_indices.shape[0]
    source_h = torch.cat([source, torch.ones_like(source[..., :1])], dim=-1)
    source_h = source_h.unsqueeze(1).expand(views, iterations, count, 3).reshape(-1, count, 3)
    projected = torch.bmm(source_h, hypotheses.transpose(1, 2))
    projected = (projected[:, :, :2] / projected[:, :, 2:3]).reshape(views, iterations, count, 2)
    error = ((projected - target.unsqueeze(1)) ** 2).sum(dim=3).sqrt()
    inliers = error < _RAY_RANSAC_INLIER_THRESHOLD
    scores = (inliers * weights.unsqueeze(1)).sum(dim=2)
    best = inliers[torch.arange(views, device=device), torch.argmax(scores, dim=1)]

    refits = []
    for view in range(views):
        mask = best[view]
        inlier_source, inlier_target = source[view][mask], target[view][mask]
        inlier_weights = weights[view][mask]
        order = torch.argsort(inlier_weights, descending=True)
        if len(order) > _RAY_MAX_REFIT_POINTS:
            keep = max(int(len(order) * 0.95), _RAY_MAX_REFIT_POINTS)
            order = order[:keep]
            subset = torch.randperm(len(order), device=device, generator=generator)
            order = order[subset[:_RAY_MAX_REFIT_POINTS]]
        refits.append(
            _weighted_homography(
                inlier_source[order][None], inlier_target[order][None], inlier_weights[order][None]
            )[0]
        )
    return torch.stack(refits)


def _ql_decomposition(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Q L`` with Q orthogonal and L lower triangular with a positive diagonal."""
    flip = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0]], device=matrix.device).float()
    q_tilde, r_tilde = torch.linalg.qr(matrix @ flip)
    q = q_tilde @ flip
    lower = (flip @ r_tilde) @ flip
    signs = torch.sign(torch.diag(lower))
    for axis in range(3):
        q[:, axis] *= signs[axis]
        lower[axis] *= signs[axis]
    return q, lower


@dataclass(frozen=True)
class RayCameras:
    """Cameras recovered from DA3 ray maps.

    Attributes:
        rotation: ``(B, S, 3, 3)``.
        translation: ``(B, S, 3)``, the confidence-weighted mean ray origin.
        focal: ``(B, S, 2)`` focal lengths (x, y) for an image spanning ``[0, 2]`` on both axes.
        principal_point: ``(B, S, 2)`` principal point in the same ``[0, 2]`` frame. As in
            DA3's reference code, the homography is split with a QL decomposition, which is
            exact only for a centred principal point: off-centre values (and then the rotation)
            are approximate. DA3's rays come from centred cameras.
    """

    rotation: torch.Tensor
    translation: torch.Tensor
    focal: torch.Tensor
    principal_point: torch.Tensor


def cameras_from_rays(
    rays: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator | None = None
) -> RayCameras:
    """Recover per-view cameras from DA3 ray maps.

    Args:
        rays: ``(B, S, h, w, 6)``: per pixel a ray direction (3) then a ray origin (3).
        confidence: ``(B, S, h, w)`` positive weights.
        generator: source of the RANSAC samples; seed it for reproducible poses.

    The ray directions of each view are related to the pixel grid of a canonical camera by a
    homography ``K R``; a confidence-weighted RANSAC fit followed by a QL decomposition splits it
    into rotation and intrinsics.
    """
    batch, views, height, width, _ = rays.shape
    device = rays.device
    step_y, step_x = 1 / height, 1 / width
    grid_y, grid_x = torch.meshgrid(
        torch.linspace(-(1 - step_y) + 1.0, (1 - step_y) + 1.0, height, device=device),
        torch.linspace(-(1 - step_x) + 1.0, (1 - step_x) + 1.0, width, device=device),
        indexing="ij",
    )
    # Canonical camera: identity focal, principal point at (1, 1) in the [0, 2] image frame.
    canonical = torch.stack([grid_x - 1.0, grid_y - 1.0], dim=-1).reshape(1, height * width, 2)

    rays = rays.flatten(0, 1).flatten(1, 2)
    weights = confidence.flatten(0, 1).flatten(1, 2).clone()
    directions = rays[..., :3]
    valid = directions[..., 2].abs() > _RAY_MIN_Z
    target = torch.where(
        valid[..., None], directions[..., :2] / directions[..., 2:3], directions[..., :2]
    )
    weights[~valid] = 0
    source = canonical.expand(target.shape[0], -1, -1)

    count = height * width
    candidate_count = max(_RAY_RANSAC_SAMPLE_SIZE, int(count * _RAY_RANSAC_CANDIDATE_RATIO))
    sample_indices = torch.stack(
        [
            torch.randperm(candidate_count, device=device, generator=generator)[
                :_RAY_RANSAC_SAMPLE_SIZE
            ]
            for _ in range(_RAY_RANSAC_ITERATIONS)
        ]
    )
    homographies = []
    for start in range(0, target.shape[0], _RAY_VIEWS_PER_CHUNK):
        stop = start + _RAY_VIEWS_PER_CHUNK
        chunk = _ransac_homographies(
            source[start:stop],
            target[start:stop],
            weights[start:stop],
            sample_indices,
            candidate_count,
            generator,
        )
        flip = torch.linalg.det(chunk) < 0
        chunk[flip] = -chunk[flip]
        homographies.append(chunk)

    rotations, focals, principal_points = [], [], []
    for homography in torch.cat(homographies):
        rotation, lower = _ql_decomposition(homography)
        lower = lower / lower[2][2]
        rotations.append(rotation)
        focals.append(torch.stack((lower[0][0], lower[1][1])))
        principal_points.append(torch.stack((lower[2][0], lower[2][1])))

    translation = (rays[..., 3:] * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(
        dim=-1, keepdim=True
    )
    return RayCameras(
        rotation=torch.stack(rotations).reshape(batch, views, 3, 3),
        translation=translation.reshape(batch, views, 3),
        focal=1.0 / torch.stack(focals).reshape(batch, views, 2),
        principal_point=torch.stack(principal_points).reshape(batch, views, 2) + 1.0,
    )


# --------------------------------------------------------------------------------------------
# Similarity alignment of camera trajectories
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ x + translation`` (float64)."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: float


def umeyama(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None
) -> Similarity:
    """Least-squares similarity mapping points ``source (N, 3)`` onto ``target (N, 3)``,
    each pair weighted by ``weights (N,)`` (non-negative; default: all equal).

    Raises ValueError when the cross-covariance is degenerate (fewer than 3 points, or all points
    on a line), where rotation is not determined, or when the weights sum to zero.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if weights is None:
        share = np.full(len(source), 1.0 / max(len(source), 1))
    else:
        total = float(np.sum(weights))
        if not total > 0:
            raise ValueError("the weights sum to zero: similarity is not determined")
        share = np.asarray(weights, dtype=np.float64) / total
    mean_source, mean_target = share @ source, share @ target
    centred_source, centred_target = source - mean_source, target - mean_target
    variance = float(share @ np.einsum("ij,ij->i", centred_source, centred_source))
    covariance = (centred_target * share[:, None]).T @ centred_source
    u, d, vt = np.linalg.svd(covariance)
    # Relative test: rounding leaves the second singular value of collinear points at about
    # 1e-16 of the first, above any absolute epsilon once coordinates are large.
    if d[1] <= 1e-9 * d[0]:
        raise ValueError("degenerate point configuration: similarity is not determined")
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0.0:
        sign[2, 2] = -1
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / variance)
    translation = mean_target - scale * rotation @ mean_source
    return Similarity(rotation=rotation, translation=translation, scale=scale)


def rotation_vectors_to_matrices(vectors: np.ndarray) -> np.ndarray:
    """Rodrigues' formula for ``(n, 3)`` rotation vectors -> ``(n, 3, 3)``."""
    angles = np.linalg.norm(vectors, axis=1)
    zero = np.zeros(len(vectors))
    x, y, z = vectors.T
    cross = np.stack(
        [np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)],
        axis=1,
    )
    small = angles < 1e-8
    safe = np.where(small, 1.0, angles)
    # sin(a)/a and (1 - cos(a))/a^2, with their limits 1 and 1/2 near zero.
    first = np.where(small, 1.0, np.sin(safe) / safe)
    second = np.where(small, 0.5, (1.0 - np.cos(safe)) / safe**2)
    return (
        np.eye(3)
        + first[:, None, None] * cross
        + second[:, None, None] * np.einsum("nij,njk->nik", cross, cross)
    )


def matrices_to_rotation_vectors(rotations: np.ndarray) -> np.ndarray:
    """``(n, 3, 3)`` rotations -> ``(n, 3)`` rotation vectors (angles in [0, pi]), through
    Shepperd's quaternions (:func:`matrix_to_quaternion`)."""
    quaternions = matrix_to_quaternion(torch.from_numpy(rotations)).numpy()
    axes, real = quaternions[:, :3], quaternions[:, 3]
    sines = np.linalg.norm(axes, axis=1)
    small = sines < 1e-12
    factor = np.where(
        small,
        2.0 / np.maximum(real, 1e-300),
        2.0 * np.arctan2(sines, real) / np.where(small, 1.0, sines),
    )
    return axes * factor[:, None]


def compose_similarities(outer: Similarity, inner: Similarity) -> Similarity:
    """``outer`` after ``inner``: ``x -> outer(inner(x))``."""
    return Similarity(
        rotation=outer.rotation @ inner.rotation,
        translation=outer.scale * outer.rotation @ inner.translation + outer.translation,
        scale=outer.scale * inner.scale,
    )


def invert_similarity(similarity: Similarity) -> Similarity:
    """The similarity undoing ``similarity``."""
    rotation = similarity.rotation.T
    return Similarity(
        rotation=rotation,
        translation=-(rotation @ similarity.translation) / similarity.scale,
        scale=1.0 / similarity.scale,
    )


def apply_similarity(points: np.ndarray, similarity: Similarity) -> np.ndarray:
    """``points (N, 3)`` mapped by ``similarity``: ``scale * R @ p + t``."""
    return similarity.scale * points @ similarity.rotation.T + similarity.translation


@dataclass(frozen=True)
class RobustFit:
    """A similarity fitted by :func:`robust_similarity`.

    Attributes:
        similarity: maps source points onto target points.
        residual: the weighted median distance between mapped source and target points, in
            the target's unit.
        inlier_share: the share of the weight on pairs within the final Huber threshold.
        iterations: reweighting rounds run.
        converged: whether the rounds stopped changing the fit (else they ran out).
    """

    similarity: Similarity
    residual: float
    inlier_share: float
    iterations: int
    converged: bool


def robust_similarity(
    source: np.ndarray,
    target: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    huber_k: float = 1.345,
    max_iterations: int = 100,
    tolerance: float = 1e-7,
) -> RobustFit:
    """Similarity mapping ``source (N, 3)`` onto ``target (N, 3)`` by iteratively reweighted
    least squares with Huber's loss: each round refits :func:`umeyama` with the given weights
    times ``min(1, threshold / distance)``, the threshold ``huber_k`` robust standard
    deviations (1.4826 x the median distance) of the current fit. Points far off the fit
    (wrong matches, moving objects, bad depth) thus lose their pull. Stops when scale,
    rotation and translation change by less than ``tolerance`` (relative to the scene size),
    or after ``max_iterations`` rounds (outliers biased one way, such as depth too far on a
    shiny surface, take tens of rounds to lose their pull: 30% of them took 67).
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    base = np.ones(len(source)) if weights is None else np.asarray(weights, dtype=np.float64)
    size = float(np.sqrt(np.mean(np.sum((target - target.mean(axis=0)) ** 2, axis=1)))) or 1.0
    fit = umeyama(source, target, base)
    rounds, converged = 0, False
    for _ in range(max_iterations):
        rounds += 1
        distance = np.linalg.norm(apply_similarity(source, fit) - target, axis=1)
        threshold = max(huber_k * 1.4826 * float(np.median(distance)), 1e-12 * size)
        robust = base * np.minimum(1.0, threshold / np.maximum(distance, 1e-300))
        refit = umeyama(source, target, robust)
        change = (
            abs(refit.scale - fit.scale) / fit.scale
            + float(np.abs(refit.rotation - fit.rotation).max())
            + float(np.abs(refit.translation - fit.translation).max()) / size
        )
        fit = refit
        if change < tolerance:
            converged = True
            break
    distance = np.linalg.norm(apply_similarity(source, fit) - target, axis=1)
    threshold = huber_k * 1.4826 * float(np.median(distance))
    return RobustFit(
        similarity=fit,
        residual=weighted_median(distance, base),
        inlier_share=float(base[distance <= threshold].sum() / base.sum()),
        iterations=rounds,
        converged=converged,
    )


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half of the (non-negative, not all zero) ``weights`` lie."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def similarity_world_to_camera(extrinsics: np.ndarray, similarity: Similarity) -> np.ndarray:
    """World-to-camera ``(4, 4)`` of a camera after its world is mapped by ``similarity``
    (``X' = s R X + t``), with the camera frame scaled by ``s`` too, so that depths scale by
    ``s``: ``E' = [R_c R^T | s t_c - R_c R^T t]``."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    rotation = extrinsics[:3, :3] @ similarity.rotation.T
    result = np.eye(4)
    result[:3, :3] = rotation
    result[:3, 3] = similarity.scale * extrinsics[:3, 3] - rotation @ similarity.translation
    return result


def _ransac_umeyama(
    source: np.ndarray, target: np.ndarray, iterations: int, seed: int
) -> Similarity:
    """Umeyama on the inliers of a RANSAC over half-size subsets (for >= 10 views)."""
    rng = np.random.default_rng(seed)
    count = len(source)
    subset_size = max(3, (count + 1) // 2)
    initial = umeyama(source, target)
    aligned = apply_similarity(source, initial)
    nearest = np.linalg.norm(target[None, :, :] - aligned[:, None, :], axis=-1).min(axis=1)
    threshold = float(np.median(nearest))

    best_model, best_inliers, best_score = initial, None, (-1, np.inf)
    for _ in range(iterations):
        sample = rng.choice(np.arange(count), size=subset_size, replace=False)
        try:
            model = umeyama(source[sample], target[sample])
        except (ValueError, np.linalg.LinAlgError):
            continue
        errors = np.linalg.norm(apply_similarity(source, model) - target, axis=1)
        inliers = errors <= threshold
        inlier_count = int(inliers.sum())
        mean_error = float(errors[inliers].mean()) if inlier_count else np.inf
        if inlier_count > best_score[0] or (
            inlier_count == best_score[0] and mean_error < best_score[1]
        ):
            best_model, best_inliers, best_score = model, inliers, (inlier_count, mean_error)
    if best_inliers is not None and best_inliers.sum() >= 3:
        return umeyama(source[best_inliers], target[best_inliers])
    return best_model


def trajectory_scale(
    estimated_extrinsics: np.ndarray,
    reference_extrinsics: np.ndarray,
    *,
    ransac_min_views: int = 10,
    ransac_iterations: int = 10,
    seed: int = 42,
) -> float | None:
    """Scale that maps an estimated camera trajectory onto a reference one.

    Both are world-to-camera ``(N, 3|4, 4)``; camera centres are compared. Well-spread
    trajectories use Umeyama's similarity (with RANSAC from ``ransac_min_views`` views on,
    seeded); for two views or collinear centres, where rotation is undetermined but scale is
    not, the ratio of the centres' RMS spreads is used. Returns None when the scale is
    undetermined (one view, or all centres of either trajectory coincide).
    """
    estimated_centres = camera_centres(estimated_extrinsics)
    reference_centres = camera_centres(reference_extrinsics)
    if len(estimated_centres) < 2:
        return None
    spread_estimated = np.linalg.norm(estimated_centres - estimated_centres.mean(axis=0))
    spread_reference = np.linalg.norm(reference_centres - reference_centres.mean(axis=0))
    # Relative to how far from the origin the centres are: the centres of a tripod at
    # geo-referenced coordinates (1e6) differ by float rounding, not by a baseline.
    def tiny(centres: np.ndarray) -> float:
        return 1e-9 * max(1.0, float(np.abs(centres).max()))

    if spread_estimated <= tiny(estimated_centres) or spread_reference <= tiny(reference_centres):
        return None
    try:
        if len(estimated_centres) >= ransac_min_views:
            similarity = _ransac_umeyama(
                estimated_centres, reference_centres, ransac_iterations, seed
            )
        else:
            similarity = umeyama(estimated_centres, reference_centres)
        return similarity.scale
    except ValueError:
        logger.info("camera centres are collinear: scale taken from their spread ratio")
        return float(spread_reference / spread_estimated)


def camera_centres(extrinsics: np.ndarray) -> np.ndarray:
    """``(N, 3)`` float64 camera centres in world coordinates of ``(N, 3|4, 4)``
    world-to-camera extrinsics."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    rotation, translation = extrinsics[:, :3, :3], extrinsics[:, :3, 3]
    return -np.einsum("nji,nj->ni", rotation, translation)


# The floor on the median camera distance that pose conditioning divides by (upstream's), in
# the unit of the user's poses.
CONDITIONING_MIN_DISTANCE = 0.1


def normalize_pose_conditioning(extrinsics: torch.Tensor) -> torch.Tensor:
    """Prepare user extrinsics ``(B, N, 4, 4)`` for DA3's camera encoder as upstream's
    inference does: anchor them to view 0 and divide translations by the median distance of
    the cameras from view 0 (view 0's own 0 included; the lower middle value for even counts),
    floored at :data:`CONDITIONING_MIN_DISTANCE`."""
    anchored = extrinsics @ invert_rigid(extrinsics[:, :1])
    median = torch.clamp(_median_distance(anchored), min=CONDITIONING_MIN_DISTANCE)
    normalized = anchored.clone()
    normalized[..., :3, 3] = anchored[..., :3, 3] / median
    return normalized


def _median_distance(anchored: torch.Tensor) -> torch.Tensor:
    return torch.median(invert_rigid(anchored)[..., :3, 3].norm(dim=-1))


def conditioning_is_floored(extrinsics: np.ndarray) -> bool:
    """Whether the median camera distance from view 0 of world-to-camera ``(N, 4, 4)``
    extrinsics is under :data:`CONDITIONING_MIN_DISTANCE`, where the camera encoder's input
    stops being free of the poses' unit (always for two views: the median is view 0's own
    0); False for one view (no translation to scale)."""
    if len(extrinsics) < 2:
        return False
    given = torch.from_numpy(np.asarray(extrinsics, dtype=np.float64))
    return float(_median_distance(given @ invert_rigid(given[:1]))) < CONDITIONING_MIN_DISTANCE


# Largest rounding error of float32 anchoring kept for the camera encoder, in its input's
# units (translations over the median camera distance from view 0, floored): upstream's
# float32 arithmetic, bit for bit, while it is that accurate; float64 past it (cameras far
# from their world origin, as geo coordinates put them).
CONDITIONING_ROUNDING = 1e-5


def pose_conditioning(
    extrinsics: np.ndarray, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The camera encoder's ``(1, N, 4, 4)`` float32 input on ``device`` for user
    world-to-camera ``(N, 4, 4)`` extrinsics: :func:`normalize_pose_conditioning` in float32
    on that device, as upstream computes it, unless that is off by more than
    :data:`CONDITIONING_ROUNDING` (poses far from their world origin, such as geo coordinates
    5e5 m out, where float32 loses centimetres); then in float64 (on the CPU)."""
    given = torch.from_numpy(np.asarray(extrinsics, dtype=np.float64))[None]
    exact = normalize_pose_conditioning(given)
    upstream = normalize_pose_conditioning(given.float().to(device))
    if float((upstream.cpu().double() - exact).abs().max()) > CONDITIONING_ROUNDING:
        return exact.float().to(device)
    return upstream


def check_extrinsics(extrinsics: np.ndarray, count: int, tolerance: float = 1e-3) -> np.ndarray:
    """Validate user world-to-camera extrinsics; returns them as ``(count, 4, 4)`` float64."""
    array = np.asarray(extrinsics, dtype=np.float64)
    if array.ndim != 3 or array.shape[1:] not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsics must have shape (N, 3, 4) or (N, 4, 4), got {array.shape}")
    if len(array) != count:
        raise ValueError(f"got {len(array)} extrinsics for {count} images: give one per image")
    if not np.isfinite(array).all():
        raise ValueError("extrinsics contain NaN or infinite values")
    if (np.abs(array[:, :3, 3]) > MAX_TRANSLATION).any():
        raise ValueError(f"extrinsics hold translations beyond {MAX_TRANSLATION:g} (any unit)")
    if array.shape[1] == 4 and not np.allclose(array[:, 3], [0, 0, 0, 1], atol=tolerance):
        raise ValueError("the last row of 4x4 extrinsics must be [0, 0, 0, 1]")
    rotations = array[:, :3, :3]
    gram = rotations @ np.swapaxes(rotations, 1, 2)
    for index in range(count):
        if not np.allclose(gram[index], np.eye(3), atol=tolerance):
            raise ValueError(f"extrinsics[{index}] has a rotation block that is not orthonormal")
        if np.linalg.det(rotations[index]) < 0:
            raise ValueError(f"extrinsics[{index}] rotation has determinant -1 (a reflection)")
    homogeneous = np.tile(np.eye(4), (count, 1, 1))
    homogeneous[:, :3, :] = array[:, :3, :]
    return homogeneous


# Plausible cameras, as multiples of the image's longer side: focal lengths from a ~179 degree
# to a ~0.6 degree field of view, principal points up to one image size outside the frame
# (crops of a larger sensor). Beyond them a matrix is a typo or an attack, and the numbers
# downstream (points, exports) would overflow or divide by ~0.
FOCAL_RANGE = (0.01, 100.0)
PRINCIPAL_POINT_RANGE = (-1.0, 2.0)
# World-to-camera translations: beyond this no float32 export keeps them (any unit).
MAX_TRANSLATION = 1e9


def check_intrinsics_for_images(intrinsics: np.ndarray, sizes: Sequence[tuple[int, int]]) -> None:
    """Refuse intrinsics ``(N, 3, 3)`` that no camera of these ``(height, width)`` images can
    have (see :data:`FOCAL_RANGE`, :data:`PRINCIPAL_POINT_RANGE`); the message names the view
    and the accepted range."""
    for index, (matrix, (height, width)) in enumerate(zip(intrinsics, sizes, strict=True)):
        side = max(height, width)
        low, high = FOCAL_RANGE[0] * side, FOCAL_RANGE[1] * side
        for name, value in (("fx", matrix[0, 0]), ("fy", matrix[1, 1])):
            if not low <= value <= high:
                raise ValueError(
                    f"intrinsics[{index}]: {name} = {value:g} pixels is outside "
                    f"[{low:g}, {high:g}] ({FOCAL_RANGE[0]:g} to {FOCAL_RANGE[1]:g} x the "
                    f"longer side of its {width}x{height} image)"
                )
        for name, value, extent in (("cx", matrix[0, 2], width), ("cy", matrix[1, 2], height)):
            low_pp, high_pp = PRINCIPAL_POINT_RANGE[0] * extent, PRINCIPAL_POINT_RANGE[1] * extent
            if not low_pp <= value <= high_pp:
                raise ValueError(
                    f"intrinsics[{index}]: {name} = {value:g} pixels is outside "
                    f"[{low_pp:g}, {high_pp:g}] for its {width}x{height} image"
                )
        if abs(matrix[0, 1]) > max(matrix[0, 0], matrix[1, 1]):
            raise ValueError(f"intrinsics[{index}]: skew {matrix[0, 1]:g} exceeds the focal length")


def check_intrinsics(intrinsics: np.ndarray, count: int) -> np.ndarray:
    """Validate user intrinsics ``(count, 3, 3)`` in pixels; returns them as float64."""
    array = np.asarray(intrinsics, dtype=np.float64)
    if array.shape != (count, 3, 3):
        raise ValueError(f"intrinsics must have shape ({count}, 3, 3), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("intrinsics contain NaN or infinite values")
    if (array[:, 0, 0] <= 0).any() or (array[:, 1, 1] <= 0).any():
        raise ValueError("intrinsics must have positive focal lengths fx, fy")
    if not np.allclose(array[:, 2], [0, 0, 1]):
        raise ValueError("the last row of intrinsics must be [0, 0, 1]")
    # A pinhole camera matrix is upper triangular: K[1, 0] is no parameter of any camera
    # (a transposed matrix, or one of another convention, would be taken as it is).
    lower = np.flatnonzero(np.abs(array[:, 1, 0]) > 1e-6 * array[:, 1, 1])
    if len(lower):
        raise ValueError(
            f"intrinsics[{lower[0]}]: K[1, 0] = {array[lower[0], 1, 0]:g}, where a camera "
            "matrix holds 0 (is it transposed?)"
        )
    return array
