"""The Gaussians' fly-through video (export format ``gaussians_video``, role
``gaussian_video``): the splats rendered along a smooth camera path through the input cameras
(an orbit for one view) and encoded as an H.264 MP4 with PyAV's bundled FFmpeg (``pip
install av``; no system ffmpeg).

The rasteriser is gsplat's CUDA ``rasterization`` when CUDA and gsplat are available, else the
pure-torch renderer of :mod:`da3cog.export.splat_render` (same conventions; on a 2-core CPU
about 0.4 s per 256x256 frame of 50,000 Gaussians and 2.5 s per 504x336 frame of 340,000, so
the default 120 frames take about 1 to 5 minutes there: lower ``video_frames`` for a quick
look). The manifest entry names the renderer used.
It renders the Gaussians that ``gaussians_ply`` writes (same border and depth trimming).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from da3cog.export.files import ManifestEntry, all_or_nothing
from da3cog.export.gaussians import (
    DEFAULT_BORDER_FRACTION,
    DEFAULT_KEEP_NEAREST,
    SH_DEGREE,
    gaussian_keep_mask,
    gaussian_view_depths,
    require_gaussians,
)
from da3cog.pipeline import Prediction, ViewPrediction

logger = logging.getLogger(__name__)

GAUSSIANS_VIDEO_NAME = "gaussians_flythrough.mp4"
VIDEO_FPS = 24.0
VIDEO_FRAMES = 120
SINGLE_VIEW_FRAMES = 48

# (means, quats, scales, opacities, harmonics (G, 3, 9), viewmats (F, 4, 4), Ks (F, 3, 3),
#  width, height) -> (F, H, W, 3) float RGB in [0, 1]
Rasterizer = Callable[..., torch.Tensor]


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:
        raise ImportError(
            "writing an MP4 needs PyAV (it bundles FFmpeg): pip install av "
            "(or pip install 'da3cog[cog]')"
        ) from error
    return av


@functools.cache
def gsplat_problem() -> str | None:
    """Why gsplat's CUDA rasteriser cannot be used here, or None when it can.

    gsplat compiles its CUDA kernels on first use (minutes; the cog image does it at build
    time), so the first call may take that long; the answer is then kept for the process. A
    failed build is reported here, with gsplat's error, rather than in the middle of a render.
    """
    if not torch.cuda.is_available():
        return "gsplat needs a CUDA GPU and none is visible"
    if importlib.util.find_spec("gsplat") is None:
        return "gsplat is not installed (pip install gsplat; it needs the CUDA toolkit's nvcc)"
    try:
        from gsplat.cuda._backend import _C
    except Exception as error:  # a failed JIT build raises whatever the toolchain raised
        return f"gsplat's CUDA kernels failed to build or load: {error}"
    if _C is None:
        return "gsplat's CUDA kernels are not built (gsplat found no CUDA toolkit, nvcc)"
    return None


def gsplat_available() -> bool:
    """Whether gsplat's CUDA rasteriser can be used here (see :func:`gsplat_problem`)."""
    return gsplat_problem() is None


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
    the same way, ``min(frames, SINGLE_VIEW_FRAMES)`` frames (one full circle)."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    rotations = extrinsics[:, :3, :3].transpose(0, 2, 1)  # camera-to-world
    centres = -np.einsum("nij,nj->ni", rotations, extrinsics[:, :3, 3])
    poses: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if len(extrinsics) == 1:
        count = max(1, min(frames, SINGLE_VIEW_FRAMES))
        for step in range(count):
            angle = 2 * math.pi * step / count
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


def default_rasterizer() -> tuple[str, Rasterizer, torch.device]:
    """``(name, rasteriser, device)``: gsplat on CUDA when available, else the torch renderer
    on the CPU."""
    problem = gsplat_problem()
    if problem is None:
        return "gsplat", gsplat_rasterizer, torch.device("cuda")
    logger.info("rendering the Gaussians with the torch renderer on the CPU: %s", problem)
    from da3cog.export.splat_render import torch_rasterizer

    return "torch", torch_rasterizer, torch.device("cpu")


def render_flythrough(
    prediction: Prediction,
    path: Path,
    *,
    keep: np.ndarray | None = None,
    frames: int = VIDEO_FRAMES,
    rasterizer: Rasterizer | None = None,
    device: torch.device | None = None,
) -> int:
    """Render ``prediction.gaussians`` (those where ``keep``, default all) along
    :func:`flythrough_cameras` at the processing resolution and write an MP4 at
    :data:`VIDEO_FPS`; returns the number of frames. ``rasterizer`` defaults to
    :func:`default_rasterizer`'s."""
    gaussians = require_gaussians(prediction)
    if rasterizer is None:
        _, rasterizer, default_device = default_rasterizer()
        device = device or default_device
    device = device or torch.device("cpu")
    _, height, width = gaussians.grid
    extrinsics = np.stack(
        [
            np.eye(4) if v.extrinsics is None else np.asarray(v.extrinsics, dtype=np.float64)
            for v in prediction.views
        ]
    )
    # Intrinsics at the processing resolution, where the Gaussians' grid lives.
    intrinsics = np.stack(
        [_processing_intrinsics(view, height, width) for view in prediction.views]
    )
    depths = gaussian_view_depths(gaussians, prediction)
    positive = depths[0][depths[0] > 0]
    radius = 0.05 * float(np.median(positive)) if positive.size else 0.05
    viewmats, ks = flythrough_cameras(extrinsics, intrinsics, frames=frames, wander_radius=radius)
    selected = slice(None) if keep is None else np.asarray(keep, dtype=bool)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(array)[selected], dtype=torch.float32, device=device)

    def camera_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.float32, device=device)

    means, quats, scales, opacities, harmonics = (
        tensor(gaussians.means),
        tensor(gaussians.rotations),
        tensor(gaussians.scales),
        tensor(gaussians.opacities),
        tensor(gaussians.harmonics),
    )

    def rendered() -> Iterable[np.ndarray]:
        # A few cameras at a time: the frames are encoded as they come.
        for start in range(0, len(viewmats), 8):
            with torch.no_grad():
                batch = rasterizer(
                    means,
                    quats,
                    scales,
                    opacities,
                    harmonics,
                    camera_tensor(viewmats[start : start + 8]),
                    camera_tensor(ks[start : start + 8]),
                    width,
                    height,
                )
            yield from (batch.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    return encode_mp4(rendered(), path, VIDEO_FPS)


def gaussians_video_files(
    prediction: Prediction,
    folder: Path,
    *,
    video_frames: int = VIDEO_FRAMES,
    gaussian_border_fraction: float = DEFAULT_BORDER_FRACTION,
    gaussian_keep_nearest: float = DEFAULT_KEEP_NEAREST,
) -> list[ManifestEntry]:
    """Write ``gaussians_flythrough.mp4`` (see the module docstring); role ``gaussian_video``.

    Args:
        prediction: a prediction with Gaussians; ValueError otherwise.
        folder: where the file goes.
        video_frames: about how many frames the path through two or more cameras has (at
            least 2 per pair of cameras, plus the last camera; one view: an orbit of
            ``min(video_frames, SINGLE_VIEW_FRAMES)`` frames).
        gaussian_border_fraction, gaussian_keep_nearest: which Gaussians are rendered, as
            for ``gaussians_ply``.
    """
    if video_frames < 1:
        raise ValueError(f"video_frames must be at least 1, got {video_frames}")
    _import_av()
    require_gaussians(prediction)
    keep, _ = gaussian_keep_mask(
        prediction, border_fraction=gaussian_border_fraction, keep_nearest=gaussian_keep_nearest
    )
    renderer, rasterizer, device = default_rasterizer()
    # The processing size, made even for H.264's 4:2:0 chroma (see encode_mp4).
    height, width = even_size(*prediction.gaussians.grid[1:])  # type: ignore[union-attr]
    written: dict[str, int] = {}

    def write(target: Path) -> None:
        written["frames"] = render_flythrough(
            prediction, target, keep=keep, frames=video_frames, rasterizer=rasterizer, device=device
        )

    with all_or_nothing() as batch:
        batch.write(folder / GAUSSIANS_VIDEO_NAME, write, "gaussian_video")
        batch.entries[-1].details.update(
            renderer=renderer,
            frames=written["frames"],
            fps=VIDEO_FPS,
            size={"height": height, "width": width},
            gaussians=int(keep.sum()),
        )
    return batch.entries


# The longest side of a video we write: libx264 refuses frames wider or taller than 16384
# pixels (a panorama's depth at its input size can be), and a preview needs far less.
MAX_VIDEO_SIDE = 4096


def even_size(height: int, width: int) -> tuple[int, int]:
    """The frame size to encode ``height x width`` pictures at: H.264 with 4:2:0 chroma needs
    even sides; at most :data:`MAX_VIDEO_SIDE` (aspect kept)."""
    scale = min(1.0, MAX_VIDEO_SIDE / max(height, width))
    height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return min(height + height % 2, MAX_VIDEO_SIDE), min(width + width % 2, MAX_VIDEO_SIDE)


def fit_frame(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """``picture`` scaled to fit ``height x width`` (aspect kept), centred on black."""
    scale = min(height / picture.shape[0], width / picture.shape[1])
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    resized = np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return canvas


def encode_mp4(frames: Iterable[np.ndarray], path: Path, fps: float) -> int:
    """Write ``(H, W, 3)`` uint8 frames as an H.264 MP4 (yuv420p, playable everywhere); every
    frame is fitted to the first one's (even) size. Returns the number of frames."""
    av = _import_av()

    count = 0
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = None
        for picture in frames:
            if stream is None:
                height, width = even_size(*picture.shape[:2])
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "20", "preset": "veryfast"}
            if picture.shape[:2] != (stream.height, stream.width):
                picture = fit_frame(picture, stream.height, stream.width)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            container.mux(stream.encode(frame))
            count += 1
        if stream is None:
            raise ValueError("no frames to encode")
        container.mux(stream.encode())
    return count


def _processing_intrinsics(view: ViewPrediction, height: int, width: int) -> np.ndarray:
    """The view's intrinsics rescaled to the processing grid (``height x width``)."""
    k = np.asarray(view.intrinsics, dtype=np.float64).copy()
    k[0] *= width / view.width
    k[1] *= height / view.height
    k[2] = [0.0, 0.0, 1.0]
    return k
