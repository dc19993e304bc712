"""Video in (frames sampled at a rate) and out (H.264 MP4), with PyAV's bundled FFmpeg."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from da3cog.serve.request import RequestError


def sample_video_frames(path: Path, folder: Path, *, fps: float, max_frames: int) -> list[Path]:
    """Decode ``path`` and keep one frame per ``1 / fps`` seconds of video time (the first
    frame, then the first frame at or after each later sampling time), at most
    ``max_frames``, written as ``folder/NNNN/frame_NNNN.png``."""
    import av

    interval = 1.0 / fps
    frames: list[Path] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise RequestError(f"image: {path.name} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate) if stream.average_rate else 25.0
            start: float | None = None
            next_time = 0.0
            for position, frame in enumerate(container.decode(stream)):
                # Presentation time in seconds; frame counting when the container has none.
                time = float(frame.time) if frame.time is not None else position / rate
                if start is None:
                    start = time
                elapsed = time - start
                if elapsed + 1e-6 < next_time:
                    continue
                index = len(frames)
                target = folder / f"{index:04d}" / f"frame_{index:04d}.png"
                target.parent.mkdir(parents=True)
                Image.fromarray(frame.to_ndarray(format="rgb24")).save(target, compress_level=1)
                frames.append(target)
                # The next point of the sampling grid after this frame.
                next_time = (math.floor((elapsed + 1e-6) / interval) + 1) * interval
                if len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, OSError) as error:
        raise RequestError(
            f"image: {path.name} is neither an image (JPEG, PNG, WebP, HEIC), a zip nor a "
            f"readable video ({error})"
        ) from error
    if not frames:
        raise RequestError(f"image: the video {path.name} has no frames")
    return frames


def even_size(height: int, width: int) -> tuple[int, int]:
    """H.264 with 4:2:0 chroma needs even sides."""
    return height + height % 2, width + width % 2


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
    import av

    count = 0
    with av.open(str(path), mode="w") as container:
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
