"""Video in (frames sampled at a rate) and out (H.264 MP4, :func:`da3cog.export.video.encode_mp4`),
with PyAV's bundled FFmpeg.

A video is opened only with the demuxer its first bytes call for, among
:data:`VIDEO_DEMUXERS`, with every protocol but the local file turned off, and decoded only
with the codecs of :data:`VIDEO_CODECS`: a playlist (HLS, concat) or a container that points
at other files or URLs is never followed. Frame size, decoded frames and decoding time are
bounded (:class:`~da3cog.serve.limits.Limits`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from PIL import Image

from da3cog.export.video import encode_mp4, even_size, fit_frame
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

VIDEO_DEMUXERS: tuple[str, ...] = ("mov", "matroska", "avi", "mpeg", "gif")
"""FFmpeg demuxers a video input may be read with (MP4/MOV/M4V, WebM/MKV, AVI, MPEG-PS,
GIF)."""
VIDEO_CODECS: frozenset[str] = frozenset(
    {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg1video", "mpeg2video", "mjpeg", "gif"}
)
"""Video codecs a video input may be decoded with."""

# Options of every open: no protocol but the local file (playlists, concat and data
# references cannot reach anything else), and the MOV demuxer's external data references off.
_OPEN_OPTIONS = {"protocol_whitelist": "file", "enable_drefs": "0"}
# ISO base-media boxes that may open a QuickTime file instead of "ftyp".
_QUICKTIME_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})


def sniff_video_format(head: bytes) -> str | None:
    """The demuxer of :data:`VIDEO_DEMUXERS` whose signature starts ``head``, or None."""
    if head[4:8] == b"ftyp" or head[4:8] in _QUICKTIME_BOXES:
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def sample_video_frames(
    path: Path,
    label: str,
    folder: Path,
    *,
    fps: float,
    max_frames: int,
    limits: Limits,
) -> list[View]:
    """Decode ``path`` and keep one frame per ``1 / fps`` seconds of video time (the first
    frame, then the first frame at or after each later sampling time), at most
    ``max_frames``, written as ``folder/NNNN/frame_NNNN.png`` (downscaled to
    ``limits.max_view_pixels``). Messages name the video by ``label``."""
    import av

    with Path(path).open("rb") as stream:
        demuxer = sniff_video_format(stream.read(64))
    if demuxer is None:
        raise RequestError(f"{label}: not a video in an accepted container")
    interval = 1.0 / fps
    deadline = time.monotonic() + limits.video_decode_seconds
    frames: list[View] = []
    try:
        with av.open(str(path), format=demuxer, options=dict(_OPEN_OPTIONS)) as container:
            if not container.streams.video:
                raise RequestError(f"{label}: the file has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            if codec not in VIDEO_CODECS:
                raise RequestError(
                    f"{label}: video codec {codec} is not accepted "
                    f"({', '.join(sorted(VIDEO_CODECS))})"
                )
            context = stream.codec_context
            _check_frame_size(context.width, context.height, label, limits)
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate) if stream.average_rate else 25.0
            start: float | None = None
            next_time = 0.0
            for position, frame in enumerate(container.decode(stream)):
                if position >= limits.video_max_decoded_frames:
                    raise RequestError(
                        f"{label}: more than {limits.video_max_decoded_frames} frames decoded "
                        "before the sampling finished; lower video_fps or max_frames, or trim "
                        "the video"
                    )
                if time.monotonic() > deadline:
                    raise RequestError(
                        f"{label}: decoding took longer than {limits.video_decode_seconds:.0f} s "
                        f"({len(frames)} frame(s) sampled); send a shorter or smaller video"
                    )
                # Presentation time in seconds; frame counting when the container has none.
                seconds = float(frame.time) if frame.time is not None else position / rate
                if start is None:
                    start = seconds
                elapsed = seconds - start
                if elapsed + 1e-6 < next_time:
                    continue
                _check_frame_size(frame.width, frame.height, label, limits)
                index = len(frames)
                width, height = _fit((frame.width, frame.height), limits.max_view_pixels)
                target = _view_path(folder, index, f"frame_{index:04d}", ".png")
                picture = frame.to_ndarray(format="rgb24", width=width, height=height)
                Image.fromarray(picture).save(target, compress_level=1)
                frames.append(
                    View(
                        target,
                        f"{label} frame {index}",
                        (frame.width, frame.height),
                        (width, height),
                    )
                )
                # The next point of the sampling grid after this frame.
                next_time = (math.floor((elapsed + 1e-6) / interval) + 1) * interval
                if len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as error:
        reason = str(error).replace(str(path), "the file")
        raise RequestError(f"{label}: not a readable video ({reason})") from error
    if not frames:
        raise RequestError(f"{label}: the video has no frames")
    return frames


def _check_frame_size(width: int, height: int, label: str, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise RequestError(f"{label}: the video stream has no frame size")
    if width * height > limits.max_video_frame_pixels:
        raise RequestError(
            f"{label}: {width}x{height} frames; a video frame may have at most "
            f"{limits.max_video_frame_pixels / 1e6:.1f} MP"
        )
