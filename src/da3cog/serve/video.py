"""Video in (frames sampled at a rate, :mod:`da3cog.io.video`, as views of a request) and out
(H.264 MP4, :func:`da3cog.export.video.encode_mp4`), with PyAV's bundled FFmpeg. The bounds
are the request's (:class:`~da3cog.serve.limits.Limits`)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from da3cog.export.video import encode_mp4, even_size, fit_frame
from da3cog.io.video import (
    VIDEO_CODECS,
    VIDEO_DEMUXERS,
    VideoBounds,
    VideoDecodeError,
    sample_frames,
    sniff_video_format,
)
from da3cog.serve.limits import Limits
from da3cog.serve.media import View, _fit, _view_path
from da3cog.serve.request import RequestError

__all__ = [
    "VIDEO_CODECS",
    "VIDEO_DEMUXERS",
    "encode_mp4",
    "even_size",
    "fit_frame",
    "sample_video_frames",
    "sniff_video_format",
]


def sample_video_frames(
    path: Path,
    label: str,
    folder: Path,
    *,
    fps: float,
    max_frames: int,
    limits: Limits,
) -> list[View]:
    """Decode ``path`` and keep one frame per ``1 / fps`` seconds of video time (see
    :func:`da3cog.io.video.sample_frames`), at most ``max_frames``, written as
    ``folder/NNNN/frame_NNNN.png`` (downscaled to ``limits.max_view_pixels``). Messages name
    the video by ``label``."""
    bounds = VideoBounds(
        max_frame_pixels=limits.max_video_frame_pixels,
        decode_seconds=limits.video_decode_seconds,
        max_decoded_frames=limits.video_max_decoded_frames,
    )
    frames: list[View] = []
    try:
        for sampled in sample_frames(
            path,
            label,
            fps=fps,
            max_frames=max_frames,
            bounds=bounds,
            fit=lambda size: _fit(size, limits.max_view_pixels),
            # Every frame up to the last one sampled is decoded: fewer frames a second reach
            # further into the video, and cost more decoding.
            advice="lower max_frames, or trim the video",
        ):
            index = len(frames)
            target = _view_path(folder, index, f"frame_{index:04d}", ".png")
            Image.fromarray(sampled.picture).save(target, compress_level=1)
            height, width = sampled.picture.shape[:2]
            frames.append(View(target, f"{label} frame {index}", sampled.size, (width, height)))
    except VideoDecodeError as error:
        raise RequestError(str(error)) from error
    return frames
