"""The 3D Gaussians as a standard 3D Gaussian Splatting PLY (numpy only).

Layout: the one of the original 3DGS code, which splat viewers and tools read. One ``vertex``
element with little-endian float32 properties ``x y z`` (centre), ``nx ny nz`` (zeros, as 3DGS
writes them), ``f_dc_0..2`` (the DC spherical-harmonic coefficient per colour),
``f_rest_0..23`` (the 8 higher coefficients of degree 1 and 2, all red, then all green, then
all blue), ``opacity`` (a logit: the reader applies a sigmoid), ``scale_0..2`` (natural logs
of the standard deviations: the reader applies exp) and ``rot_0..3`` (the quaternion as
``(w, x, y, z)``, see :class:`da3cog.pipeline.Gaussians`).

Like upstream's ``export_to_gs_ply`` it leaves out, per view, the Gaussians of a thin border
(``8/256`` of each side: the head's least reliable pixels) and the farthest 10% (mostly
background noise); both can be changed or turned off. One deliberate difference: upstream
ranks by the view's depth map, which exists here at the Gaussians' grid only for
``output_resolution="processing"``, so this ranks by each Gaussian's own depth in its view's
camera (its centre's z), which is defined for every prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from da3cog.export.files import ManifestEntry, all_or_nothing, returning_paths
from da3cog.export.ply import ply_header
from da3cog.pipeline import Gaussians, Prediction

GAUSSIANS_PLY_NAME = "gaussians.ply"
SH_DEGREE = 2
DEFAULT_BORDER_FRACTION = 8 / 256
DEFAULT_KEEP_NEAREST = 0.9
# Opacities are clipped to (eps, 1 - eps) before the logit, so 0 and 1 stay finite.
_OPACITY_EPS = 1e-6


def gaussian_ply_fields(sh_degree: int = SH_DEGREE) -> list[str]:
    """The vertex properties of the 3DGS PLY, in file order."""
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return [
        *("x", "y", "z", "nx", "ny", "nz"),
        *(f"f_dc_{i}" for i in range(3)),
        *(f"f_rest_{i}" for i in range(rest)),
        "opacity",
        *(f"scale_{i}" for i in range(3)),
        *(f"rot_{i}" for i in range(4)),
    ]


def gaussians_problem(prediction: Prediction) -> str | None:
    """Why ``prediction`` has no Gaussians to export, or None when it has."""
    if getattr(prediction, "gaussians", None) is not None:
        return None
    from da3cog.model.network import gaussian_models

    models = ", ".join(gaussian_models())
    return (
        "the prediction has no 3D Gaussians: predict with "
        f"InferenceOptions(infer_gaussians=True) on a model with a Gaussian head: {models}"
    )


def require_gaussians(prediction: Prediction) -> Gaussians:
    """``prediction.gaussians``, or ValueError saying how to get them."""
    problem = gaussians_problem(prediction)
    if problem is not None:
        raise ValueError(problem)
    return prediction.gaussians  # type: ignore[return-value]


def gaussian_view_depths(gaussians: Gaussians, prediction: Prediction) -> np.ndarray:
    """``(V, h, w)`` float64: each Gaussian's depth (z of its centre) in the camera of the view
    it comes from, in the prediction's unit; a view without extrinsics (a lone view) uses its
    camera frame as the world frame."""
    views, height, width = gaussians.grid
    if views != len(prediction.views):
        raise ValueError(
            f"the Gaussians come from {views} views but the prediction has {len(prediction)}"
        )
    means = np.asarray(gaussians.means, dtype=np.float64).reshape(views, height * width, 3)
    depths = np.empty((views, height * width))
    for index, view in enumerate(prediction.views):
        extrinsics = np.eye(4) if view.extrinsics is None else np.asarray(view.extrinsics)
        rotation, translation = extrinsics[:3, :3], extrinsics[:3, 3]
        depths[index] = means[index] @ rotation[2] + translation[2]
    return depths.reshape(views, height, width)


def _check_options(border_fraction: float, keep_nearest: float) -> None:
    if not 0.0 <= border_fraction < 0.5:
        raise ValueError(
            f"gaussian_border_fraction must be within [0, 0.5) (0 keeps the border), "
            f"got {border_fraction}"
        )
    if not 0.0 < keep_nearest <= 1.0:
        raise ValueError(
            f"gaussian_keep_nearest must be within (0, 1] (1 keeps every depth), got {keep_nearest}"
        )


def gaussian_keep_mask(
    prediction: Prediction,
    *,
    border_fraction: float = DEFAULT_BORDER_FRACTION,
    keep_nearest: float = DEFAULT_KEEP_NEAREST,
) -> tuple[np.ndarray, dict[str, int]]:
    """Which Gaussians go into the PLY, and how many each rule removed.

    Per view of the ``(V, h, w)`` grid: rows ``[int(f h), h - int(f h))`` and columns
    ``[int(f w), w - int(f w))`` are kept (``f = border_fraction``, upstream's integer
    rounding), and of those the Gaussians at most as deep as the ``keep_nearest`` quantile of
    all the view's finite Gaussian depths, border included (linear interpolation, as
    upstream's ``torch.quantile``); 1 keeps every depth. Gaussians with no valid PLY form are
    always left out: a centre behind its camera, a non-positive scale (its log is undefined)
    or any non-finite value; trained checkpoints make none, random weights do.

    Returns:
        ``(G,)`` bool mask in the Gaussians' order, and the counts ``border`` (outside the kept
        rows and columns), ``far`` (inside them, beyond the depth quantile) and ``invalid``
        (left after both, with no valid PLY form).
    """
    _check_options(border_fraction, keep_nearest)
    gaussians = require_gaussians(prediction)
    views, height, width = gaussians.grid
    inside = np.zeros((views, height, width), dtype=bool)
    trim_h, trim_w = int(border_fraction * height), int(border_fraction * width)
    inside[:, trim_h : height - trim_h, trim_w : width - trim_w] = True
    depths = gaussian_view_depths(gaussians, prediction)
    near = np.ones_like(inside)
    if keep_nearest < 1.0:
        # One non-finite depth would make the whole view's quantile NaN and drop the view.
        finite_depths = np.where(np.isfinite(depths), depths, np.nan).reshape(views, -1)
        # A view with no finite depth has no quantile (NaN: nothing of it is near). Skipped
        # rather than silenced: a warnings filter is process-wide, not thread-safe.
        some = np.isfinite(finite_depths).any(axis=1)
        limits = np.full(views, np.nan)
        if some.any():
            limits[some] = np.nanquantile(finite_depths[some], keep_nearest, axis=1)
        # Non-finite depths are counted as invalid below, not as far.
        near = (depths <= limits[:, None, None]) | ~np.isfinite(depths)
    scales = np.asarray(gaussians.scales).reshape(views, height, width, 3)
    finite = np.ones_like(inside)
    for array in (gaussians.means, gaussians.rotations, gaussians.harmonics, gaussians.opacities):
        per_gaussian = np.asarray(array).reshape(views, height, width, -1)
        finite &= np.isfinite(per_gaussian).all(axis=-1)
    valid = finite & (depths > 0) & (np.isfinite(scales) & (scales > 0)).all(axis=-1)
    kept = inside & near
    counts = {
        "border": int((~inside).sum()),
        "far": int((inside & ~near).sum()),
        "invalid": int((kept & ~valid).sum()),
    }
    return (kept & valid).reshape(-1), counts


def gaussian_ply_records(gaussians: Gaussians, keep: np.ndarray) -> np.ndarray:
    """The kept Gaussians as a ``(K,)`` structured array of little-endian float32 fields named
    by :func:`gaussian_ply_fields`, ready to be written after the header."""
    count = int(np.count_nonzero(keep))
    harmonics = np.asarray(gaussians.harmonics)[keep]  # (K, 3, 9)
    records = np.zeros(count, dtype=[(name, "<f4") for name in gaussian_ply_fields()])
    for axis, name in enumerate(("x", "y", "z")):
        records[name] = np.asarray(gaussians.means)[keep, axis]
    # nx, ny, nz stay zero, as the 3DGS code writes them.
    for channel in range(3):
        records[f"f_dc_{channel}"] = harmonics[:, channel, 0]
    # Channel-major: all red, then green, then blue (shaped by name: none may be kept).
    rest = harmonics[:, :, 1:].reshape(count, 3 * (harmonics.shape[2] - 1))
    for index in range(rest.shape[1]):
        records[f"f_rest_{index}"] = rest[:, index]
    opacities = np.clip(
        np.asarray(gaussians.opacities, dtype=np.float64)[keep], _OPACITY_EPS, 1 - _OPACITY_EPS
    )
    records["opacity"] = np.log(opacities / (1 - opacities))
    scales = np.log(np.asarray(gaussians.scales, dtype=np.float64)[keep])
    rotations = np.asarray(gaussians.rotations)[keep]
    for axis in range(3):
        records[f"scale_{axis}"] = scales[:, axis]
    for axis in range(4):
        records[f"rot_{axis}"] = rotations[:, axis]
    return records


def gaussian_ply_header(count: int, comments: tuple[str, ...] = ()) -> bytes:
    """The ASCII header of a binary little-endian 3DGS PLY with ``count`` vertices."""
    return ply_header(count, [("float", name) for name in gaussian_ply_fields()], comments)


def gaussians_ply_files(
    prediction: Prediction,
    folder: Path,
    *,
    gaussian_border_fraction: float = DEFAULT_BORDER_FRACTION,
    gaussian_keep_nearest: float = DEFAULT_KEEP_NEAREST,
) -> list[ManifestEntry]:
    """Write ``gaussians.ply`` (see the module docstring); role ``gaussian_splats``.

    Args:
        prediction: a prediction with Gaussians (``InferenceOptions(infer_gaussians=True)``
            on a model with a Gaussian head); ValueError otherwise.
        folder: where the file goes.
        gaussian_border_fraction: fraction of each side of every view whose Gaussians are
            left out (default 8/256, as upstream; 0 keeps the border).
        gaussian_keep_nearest: fraction of every view's Gaussians kept, nearest first
            (default 0.9, as upstream; 1 keeps every depth).
    """
    gaussians = require_gaussians(prediction)
    keep, removed = gaussian_keep_mask(
        prediction, border_fraction=gaussian_border_fraction, keep_nearest=gaussian_keep_nearest
    )
    records = gaussian_ply_records(gaussians, keep)
    unit = "metres" if prediction.is_metric else "relative units"
    views, height, width = gaussians.grid
    comments = (
        f"da3cog {prediction.model_id} ({prediction.model_preset}): 3D Gaussians, "
        f"SH degree {SH_DEGREE}, {len(records)} of {len(gaussians)}",
        "frame: world of cameras.json, OpenCV axes (x right, y down, z forward), " + unit,
    )
    header = gaussian_ply_header(len(records), comments)

    def write(target: Path) -> None:
        # The records go straight to the file: no second in-memory copy of a large cloud.
        with target.open("wb") as handle:
            handle.write(header)
            records.tofile(handle)

    details: dict[str, Any] = {
        "gaussians": len(records),
        "total": len(gaussians),
        "sh_degree": SH_DEGREE,
        "grid": {"views": views, "height": height, "width": width},
        "border_fraction": gaussian_border_fraction,
        "keep_nearest": gaussian_keep_nearest,
        "removed": removed,
        "frame": "world, OpenCV axes",
    }
    with all_or_nothing() as batch:
        batch.write(folder / GAUSSIANS_PLY_NAME, write, "gaussian_splats", **details)
    return batch.entries


export_gaussians_ply = returning_paths(gaussians_ply_files, "export_gaussians_ply")
