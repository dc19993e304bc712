"""The Gaussians' fly-through video, rendered with gsplat (the PLY itself is written by
:mod:`da3cog.export.gaussians`).

Rendering needs a CUDA GPU (gsplat's kernels); :func:`gaussian_video_problem` says so before
any work. The rasteriser is a parameter so that the camera path and encoding can be tested
without one.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from da3cog.export.gaussians import SH_DEGREE, gaussian_view_depths
from da3cog.pipeline import Gaussians, Prediction, ViewPrediction

VIDEO_FPS = 24.0
VIDEO_FRAMES = 120
SINGLE_VIEW_FRAMES = 48

# (means, quats, scales, opacities, harmonics (G, 3, 9), viewmats (F, 4, 4), Ks (F, 3, 3),
#  width, height) -> (F, H, W, 3) float RGB in [0, 1]
Rasterizer = Callable[..., torch.Tensor]


def gaussian_video_problem() -> str | None:
    """Why a Gaussian video cannot be rendered here, or None."""
    if not torch.cuda.is_available():
        return (
            "render_video with mode=gaussian-splat renders the Gaussians with gsplat, which "
            "needs a CUDA GPU, and this server has none (the Gaussians are still returned as "
            "gaussians.ply; render_video in the other modes makes a depth video on any machine)"
        )
    if importlib.util.find_spec("gsplat") is None:
        return "render_video with mode=gaussian-splat needs gsplat, which is not installed"
    return None


def _quaternion(rotation: np.ndarray) -> np.ndarray:
    """``(w, x, y, z)`` of a rotation matrix (Shepperd's method, w >= 0)."""
    m = rotation
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = math.sqrt(trace + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    quaternion = np.array(q)
    quaternion /= np.linalg.norm(quaternion)
    return quaternion if quaternion[0] >= 0 else -quaternion


def _rotation(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    if np.dot(a, b) < 0:
        b = -b
    cosine = float(np.clip(np.dot(a, b), -1.0, 1.0))
    if cosine > 0.9995:
        mixed = a + t * (b - a)
        return mixed / np.linalg.norm(mixed)
    angle = math.acos(cosine)
    return (math.sin((1 - t) * angle) * a + math.sin(t * angle) * b) / math.sin(angle)


def flythrough_cameras(
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    *,
    frames: int = VIDEO_FRAMES,
    wander_radius: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera ``(F, 4, 4)`` and ``(F, 3, 3)`` intrinsics along the input cameras.

    Two or more views: from each camera to the next (rotations slerped, centres and
    intrinsics interpolated linearly), passing exactly through every input camera. One view:
    a small circle of ``wander_radius`` (in scene units) in the camera's image plane, looking
    the same way, :data:`SINGLE_VIEW_FRAMES` frames."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    rotations = extrinsics[:, :3, :3].transpose(0, 2, 1)  # camera-to-world
    centres = -np.einsum("nij,nj->ni", rotations, extrinsics[:, :3, 3])
    poses: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if len(extrinsics) == 1:
        for step in range(SINGLE_VIEW_FRAMES):
            angle = 2 * math.pi * step / SINGLE_VIEW_FRAMES
            offset = wander_radius * np.array([math.cos(angle) - 1.0, math.sin(angle), 0.0])
            poses.append((rotations[0], centres[0] + rotations[0] @ offset, intrinsics[0]))
    else:
        segments = len(extrinsics) - 1
        per_segment = max(2, math.ceil(frames / segments))
        quaternions = [_quaternion(r) for r in rotations]
        for index in range(segments):
            for step in range(per_segment):
                t = step / per_segment
                rotation = _rotation(_slerp(quaternions[index], quaternions[index + 1], t))
                centre = (1 - t) * centres[index] + t * centres[index + 1]
                k = (1 - t) * intrinsics[index] + t * intrinsics[index + 1]
                poses.append((rotation, centre, k))
        poses.append((rotations[-1], centres[-1], intrinsics[-1]))
    viewmats = np.tile(np.eye(4), (len(poses), 1, 1))
    for index, (rotation, centre, _) in enumerate(poses):
        viewmats[index, :3, :3] = rotation.T
        viewmats[index, :3, 3] = -rotation.T @ centre
    return viewmats, np.stack([k for _, _, k in poses])


def gsplat_rasterizer(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    harmonics: torch.Tensor,
    viewmats: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    chunk: int = 8,
) -> torch.Tensor:
    """Render with gsplat (CUDA), a few cameras at a time to bound memory."""
    from gsplat import rasterization

    colors = harmonics.transpose(1, 2).contiguous()  # gsplat wants (G, K, 3)
    frames = []
    for start in range(0, len(viewmats), chunk):
        rendered, _, _ = rasterization(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmats[start : start + chunk],
            intrinsics[start : start + chunk],
            width,
            height,
            sh_degree=SH_DEGREE,
            render_mode="RGB",
        )
        frames.append(rendered.clamp(0, 1))
    return torch.cat(frames)


def render_flythrough(
    gaussians: Gaussians,
    prediction: Prediction,
    path: Path,
    *,
    rasterizer: Rasterizer | None = None,
    device: torch.device | None = None,
) -> int:
    """Render the Gaussians along :func:`flythrough_cameras` at the processing resolution
    and write an MP4 at :data:`VIDEO_FPS`; returns the number of frames."""
    from da3cog.serve.video import encode_mp4

    rasterize = rasterizer or gsplat_rasterizer
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, height, width = gaussians.grid
    extrinsics = np.stack([np.asarray(v.extrinsics, dtype=np.float64) for v in prediction.views])
    # Intrinsics at the processing resolution, where the Gaussians' grid lives.
    intrinsics = np.stack(
        [_processing_intrinsics(view, height, width) for view in prediction.views]
    )
    depths = gaussian_view_depths(gaussians, prediction)
    radius = 0.05 * float(np.median(depths[0][depths[0] > 0])) if (depths[0] > 0).any() else 0.05
    viewmats, ks = flythrough_cameras(extrinsics, intrinsics, wander_radius=radius)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.float32, device=device)

    with torch.no_grad():
        rendered = rasterize(
            tensor(gaussians.means),
            tensor(gaussians.rotations),
            tensor(gaussians.scales),
            tensor(gaussians.opacities),
            tensor(gaussians.harmonics),
            tensor(viewmats),
            tensor(ks),
            width,
            height,
        )
    frames = (rendered.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return encode_mp4(iter(frames), path, VIDEO_FPS)


def _processing_intrinsics(view: ViewPrediction, height: int, width: int) -> np.ndarray:
    """The view's intrinsics rescaled to the processing grid (``height x width``)."""
    k = np.asarray(view.intrinsics, dtype=np.float64).copy()
    k[0] *= width / view.width
    k[1] *= height / view.height
    k[2] = [0.0, 0.0, 1.0]
    return k
