"""Video in (frames sampled at a rate) and out (H.264 MP4, :func:`da3cog.export.video.encode_mp4`),
with PyAV's bundled FFmpeg."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from da3cog.export.video import encode_mp4, even_size, fit_frame
from da3cog.serve.request import RequestError

__all__ = ["encode_mp4", "even_size", "fit_frame", "sample_video_frames"]


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
