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
    """One kept frame, upright as players show it (its stream's display matrix applied:
    quarter turns, mirroring):
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
    time (the first frame, then the first frame at or after each later sampling time, to
    within the rounding of the container's clock), or
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
    try:
        with Path(path).open("rb") as stream:
            demuxer = sniff_video_format(stream.read(64))
    except OSError as error:
        raise VideoDecodeError(f"{label}: cannot be read ({error.strerror or error})") from error
    if demuxer is None:
        raise VideoDecodeError(f"{label}: not a video in an accepted container")
    tally = _Tally()
    try:
        with av.open(str(path), format=demuxer, options=dict(_OPEN_OPTIONS)) as container:
            video = _video_stream(container, label, bounds)
            rate = float(video.average_rate) if video.average_rate else 25.0
            # Anamorphic video (DV and DVD store 16:9 so) is shown with wider or narrower
            # pixels than it is coded with.
            pixel_aspect = float(video.codec_context.sample_aspect_ratio or 1)
            grid = _SamplingGrid(fps, stride, _clock_tolerance(video))
            start: float | None = None
            frames = _decoded_frames(container, video, label, bounds, advice, tally)
            for position, frame in enumerate(frames):
                # Presentation time in seconds; frame counting when the container has none.
                seconds = float(frame.time) if frame.time is not None else position / rate
                start = seconds if start is None else start
                elapsed = seconds - start
                if not grid.keeps(elapsed, position):
                    continue
                yield _sampled(frame, elapsed, position, pixel_aspect, label, bounds, fit)
                tally.kept += 1
                grid.advance(elapsed)
                if tally.kept >= max_frames:
                    return
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        reason = str(error).replace(str(path), "the file")
        raise VideoDecodeError(f"{label}: not a readable video ({reason})") from error
    if not tally.kept:
        damaged = f" ({tally.skipped} damaged packet(s) skipped)" if tally.skipped else ""
        raise VideoDecodeError(f"{label}: the video has no frames{damaged}")


@dataclass
class _Tally:
    """Frames sampled and damaged packets skipped so far, for messages."""

    kept: int = 0
    skipped: int = 0


@dataclass
class _SamplingGrid:
    """Which decoded frames :func:`sample_frames` keeps: every ``stride``-th, or the first
    frame at or after each point of a ``1 / fps`` s grid (to within ``tolerance`` s)."""

    fps: float | None
    stride: int | None
    tolerance: float
    next_time: float = 0.0

    def keeps(self, elapsed: float, position: int) -> bool:
        if self.stride is not None:
            return position % self.stride == 0
        return elapsed + self.tolerance >= self.next_time

    def advance(self, elapsed: float) -> None:
        """A frame at ``elapsed`` s was kept: the next grid point after it."""
        if self.fps is not None:
            interval = 1.0 / self.fps
            self.next_time = (math.floor((elapsed + self.tolerance) / interval) + 1) * interval


def _clock_tolerance(video: object) -> float:
    """How early a frame may be and still count as on a sampling time, in seconds.

    Matroska (WebM, MKV) rounds frame times to whole milliseconds: a 30 fps frame at 33.3 ms
    is stored at 33 ms. A frame less than half a tick of such a clock before a sampling time
    is on it; coarser clocks (AVI's, a frame a tick) are exact and keep the strict rule."""
    tick = float(video.time_base) if video.time_base else 0.0
    return max(1e-6, min(0.499 * tick, 1e-3))


def _video_stream(container: object, label: str, bounds: VideoBounds) -> object:
    """The container's first video stream, checked (codec, frame size) and set up to decode
    (frames larger than the header said refused by the decoder before their pixels are
    allocated)."""
    if not container.streams.video:
        raise VideoDecodeError(f"{label}: the file has no video stream")
    video = container.streams.video[0]
    # The codec's name, not its decoder's (AV1 decodes with libdav1d).
    codec = video.codec_context.codec.canonical_name
    if codec not in VIDEO_CODECS:
        raise VideoDecodeError(
            f"{label}: video codec {codec} is not accepted ({', '.join(sorted(VIDEO_CODECS))})"
        )
    _check_frame_size(video.codec_context.width, video.codec_context.height, label, bounds)
    video.codec_context.options = {"max_pixels": str(bounds.max_frame_pixels)}
    video.thread_type = "AUTO"
    return video


def _decoded_frames(
    container: object,
    video: object,
    label: str,
    bounds: VideoBounds,
    advice: str,
    tally: _Tally,
) -> Iterator[object]:
    """The frames of ``video`` in decoding order, damaged packets skipped (counted in
    ``tally``). The bounds are checked packet by packet, every stream's, so that they hold
    for packets that show no frame (hidden VP8 frames, data the decoder drops, other
    streams) as well as for frames."""
    import av

    deadline = time.monotonic() + bounds.decode_seconds
    read = 0
    for packet in container.demux():
        if time.monotonic() > deadline:
            raise VideoDecodeError(
                f"{label}: decoding took longer than {bounds.decode_seconds:.0f} s "
                f"({tally.kept} frame(s) sampled); {advice}"
            )
        if packet.stream is not video:
            continue
        read += 1
        if read > bounds.max_decoded_frames:
            raise VideoDecodeError(
                f"{label}: more than {bounds.max_decoded_frames} frames read "
                f"before the sampling finished; {advice}"
            )
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            tally.skipped += 1  # a damaged packet: players skip it too
            continue
        except av.error.ArgumentError as error:
            raise VideoDecodeError(
                f"{label}: the decoder refused a frame (larger than the "
                f"{bounds.max_frame_pixels / 1e6:.1f} MP a video frame may have, or damaged)"
            ) from error
        yield from frames


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
    picture, turned = _as_displayed(picture, _display_matrix(frame))
    size = size[::-1] if turned else size
    return SampledFrame(picture, size, elapsed, position)


def _display_matrix(frame: object) -> np.ndarray | None:
    """The frame's display matrix (FFmpeg's 3x3, 16.16 fixed point: a displayed point is
    ``(a x + c y, b x + d y)`` of the coded ``(x, y)``), or None."""
    import av

    for data in getattr(frame, "side_data", ()):
        if data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            return np.frombuffer(bytes(data), dtype=np.int32).reshape(3, 3)
    return None


def _as_displayed(picture: np.ndarray, matrix: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """``picture`` ``(h, w, 3)`` as players show it under its display ``matrix``: turned by
    quarter turns (to the nearest one) and mirrored where the matrix mirrors (front cameras);
    and whether width and height swapped."""
    if matrix is None:
        return picture, False
    a, b, c, d = (float(v) for v in (matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1]))
    swapped = abs(b) + abs(c) > abs(a) + abs(d)
    if swapped:
        # x' = c y, y' = b x: the displayed picture is the coded one transposed.
        picture = picture.transpose(1, 0, 2)
        mirror_x, mirror_y = c < 0, b < 0
    else:
        mirror_x, mirror_y = a < 0, d < 0
    if mirror_x:
        picture = picture[:, ::-1]
    if mirror_y:
        picture = picture[::-1]
    return np.ascontiguousarray(picture), swapped


def _check_frame_size(width: int, height: int, label: str, bounds: VideoBounds) -> None:
    if width <= 0 or height <= 0:
        raise VideoDecodeError(f"{label}: the video stream has no frame size")
    if width * height > bounds.max_frame_pixels:
        raise VideoDecodeError(
            f"{label}: {width}x{height} frames; a video frame may have at most "
            f"{bounds.max_frame_pixels / 1e6:.1f} MP"
        )
