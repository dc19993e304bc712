"""Frames sampled from a video file, with PyAV's bundled FFmpeg, safely.

A video is opened only with the demuxer its first bytes call for, among
:data:`VIDEO_DEMUXERS`, with every protocol but the local file turned off, and decoded only
with the codecs of :data:`VIDEO_CODECS`: a playlist (HLS, concat) or a container that points
at other files or URLs is never followed. Frame size, decoded frames and decoding time are
bounded by the caller (:class:`VideoBounds`). Used by the CLI and the served model alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class VideoDecodeError(ValueError):
    """A video cannot be sampled; the message names it and says why."""


@dataclass(frozen=True)
class VideoBounds:
    """What decoding one video may cost.

    Attributes:
        max_frame_pixels: a frame's size, from the stream header and every frame.
        decode_seconds: wall time to decode and sample.
        max_decoded_frames: frames decoded (sampled or not).
    """

    max_frame_pixels: int = 7680 * 4320
    decode_seconds: float = 120.0
    max_decoded_frames: int = 100_000


# The user's own videos on their own machine (the CLI, the batch runner): decoding streams one
# frame at a time, so only the frame size is bounded; a long video takes as long as it takes.
LOCAL_VIDEO_BOUNDS = VideoBounds(decode_seconds=math.inf, max_decoded_frames=1 << 62)


@dataclass(frozen=True)
class SampledFrame:
    """One kept frame, upright as players show it (its stream's display rotation applied):
    ``picture`` ``(h, w, 3)`` uint8 RGB at the size the caller's ``fit`` chose (for the
    frame with square pixels, before it is turned), ``size`` the frame's own
    ``(width, height)`` as shown (square pixels, turned),
    ``seconds`` its time from the first frame, ``position`` its index among all decoded
    frames."""

    picture: np.ndarray
    size: tuple[int, int]
    seconds: float
    position: int


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


def sample_frames(
    path: str | Path,
    label: str,
    *,
    fps: float | None = None,
    stride: int | None = None,
    max_frames: int,
    bounds: VideoBounds = VideoBounds(),
    fit: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
    advice: str = "sample fewer frames or trim the video",
) -> Iterator[SampledFrame]:
    """Decode ``path`` and yield its sampled frames: one per ``1 / fps`` seconds of video
    time (the first frame, then the first frame at or after each later sampling time), or
    every ``stride``-th decoded frame, at most ``max_frames``. ``fit(width, height)`` gives
    the size to convert each frame to (default: its own). Raises :class:`VideoDecodeError`
    naming the video by ``label``; ``advice`` ends the message of a bound that was hit."""
    import av

    if (fps is None) == (stride is None):
        raise ValueError("give exactly one of fps and stride")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    with Path(path).open("rb") as stream:
        demuxer = sniff_video_format(stream.read(64))
    if demuxer is None:
        raise VideoDecodeError(f"{label}: not a video in an accepted container")
    deadline = time.monotonic() + bounds.decode_seconds
    kept = skipped = 0
    try:
        with av.open(str(path), format=demuxer, options=dict(_OPEN_OPTIONS)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{label}: the file has no video stream")
            video = container.streams.video[0]
            # The codec's name, not its decoder's (AV1 decodes with libdav1d).
            codec = video.codec_context.codec.canonical_name
            if codec not in VIDEO_CODECS:
                raise VideoDecodeError(
                    f"{label}: video codec {codec} is not accepted "
                    f"({', '.join(sorted(VIDEO_CODECS))})"
                )
            _check_frame_size(video.codec_context.width, video.codec_context.height, label, bounds)
            # Frames larger than the header said are refused by the decoder before their
            # pixels are allocated.
            video.codec_context.options = {"max_pixels": str(bounds.max_frame_pixels)}
            video.thread_type = "AUTO"
            rate = float(video.average_rate) if video.average_rate else 25.0
            # Anamorphic video (DV and DVD store 16:9 so) is shown with wider or narrower
            # pixels than it is coded with.
            pixel_aspect = float(video.codec_context.sample_aspect_ratio or 1)
            # Container clocks round frame times (Matroska to whole milliseconds): a frame
            # within half a frame interval of a sampling time is on it.
            tolerance = 0.5 / max(rate, fps or 0.0)
            start: float | None = None
            next_time = 0.0
            position = read = -1
            # Packet by packet, every stream's, so that the bounds hold for packets that show
            # no frame (hidden VP8 frames, data the decoder drops, other streams) as well as
            # for frames.
            for packet in container.demux():
                if time.monotonic() > deadline:
                    raise VideoDecodeError(
                        f"{label}: decoding took longer than {bounds.decode_seconds:.0f} s "
                        f"({kept} frame(s) sampled); {advice}"
                    )
                if packet.stream is not video:
                    continue
                read += 1
                if read >= bounds.max_decoded_frames:
                    raise VideoDecodeError(
                        f"{label}: more than {bounds.max_decoded_frames} frames read "
                        f"before the sampling finished; {advice}"
                    )
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    skipped += 1  # a damaged packet: players skip it too
                    continue
                except av.error.ArgumentError as error:
                    raise VideoDecodeError(
                        f"{label}: the decoder refused a frame (larger than the "
                        f"{bounds.max_frame_pixels / 1e6:.1f} MP a video frame may have, or "
                        "damaged)"
                    ) from error
                for frame in frames:
                    position += 1
                    # Presentation time in seconds; frame counting when the container has
                    # none.
                    seconds = float(frame.time) if frame.time is not None else position / rate
                    if start is None:
                        start = seconds
                    elapsed = seconds - start
                    if stride is not None:
                        if position % stride:
                            continue
                    elif elapsed + tolerance < next_time:
                        continue
                    yield _sampled(frame, elapsed, position, pixel_aspect, label, bounds, fit)
                    kept += 1
                    if fps is not None:
                        # The next point of the sampling grid after this frame.
                        interval = 1.0 / fps
                        next_time = (math.floor((elapsed + tolerance) / interval) + 1) * interval
                    if kept >= max_frames:
                        return
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        reason = str(error).replace(str(path), "the file")
        raise VideoDecodeError(f"{label}: not a readable video ({reason})") from error
    if not kept:
        damaged = f" ({skipped} damaged packet(s) skipped)" if skipped else ""
        raise VideoDecodeError(f"{label}: the video has no frames{damaged}")


def _sampled(
    frame: object,
    elapsed: float,
    position: int,
    pixel_aspect: float,
    label: str,
    bounds: VideoBounds,
    fit: Callable[[tuple[int, int]], tuple[int, int]] | None,
) -> SampledFrame:
    """A decoded frame as a :class:`SampledFrame`: at the size ``fit`` chooses for its
    display size (its pixels made square, ``pixel_aspect`` = width / height of one), upright."""
    _check_frame_size(frame.width, frame.height, label, bounds)
    size = (frame.width, frame.height)
    if pixel_aspect > 0 and abs(pixel_aspect - 1) > 1e-3:
        size = (max(1, round(frame.width * pixel_aspect)), frame.height)
        _check_frame_size(*size, label, bounds)
    width, height = fit(size) if fit is not None else size
    picture = frame.to_ndarray(format="rgb24", width=width, height=height)
    # Upright as players show it (phones record portrait video as landscape frames with a
    # display rotation), as images are with their EXIF orientation.
    turns = _display_quarter_turns(frame)
    if turns:
        picture = np.ascontiguousarray(np.rot90(picture, turns))
        size = size[::-1] if turns % 2 else size
    return SampledFrame(picture, size, elapsed, position)


def _display_quarter_turns(frame: object) -> int:
    """Counterclockwise quarter turns (0-3) that show a decoded frame as players do: its
    stream's display matrix (PyAV's ``rotation``, counterclockwise degrees), to the nearest
    quarter turn."""
    rotation = getattr(frame, "rotation", 0) or 0
    return round(rotation / 90) % 4


def _check_frame_size(width: int, height: int, label: str, bounds: VideoBounds) -> None:
    if width <= 0 or height <= 0:
        raise VideoDecodeError(f"{label}: the video stream has no frame size")
    if width * height > bounds.max_frame_pixels:
        raise VideoDecodeError(
            f"{label}: {width}x{height} frames; a video frame may have at most "
            f"{bounds.max_frame_pixels / 1e6:.1f} MP"
        )
