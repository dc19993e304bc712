"""What a user's input paths mean as views: image files as they are, folders as their image
files, videos as sampled frames. Shared by the CLI and the batch runner."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from da3cog.io.images import HEADER_BYTES, read_image_header, sniff_image_format
from da3cog.io.video import LOCAL_VIDEO_BOUNDS, sample_frames, sniff_video_format


@dataclass(frozen=True)
class FrameSampling:
    """How frames are taken from a video: ``fps`` a second (default 2) or every ``stride``-th
    frame, at most ``max_frames`` from each video."""

    fps: float | None = None
    stride: int | None = None
    max_frames: int = 1000

    def __post_init__(self) -> None:
        check_sampling(self.fps, self.stride, self.max_frames)


def check_sampling(
    fps: object, stride: object, max_frames: object, name: Callable[[str], str] = str
) -> None:
    """ValueError unless ``fps`` (None or a finite number above 0), ``stride`` (None or a
    whole number of at least 1) and ``max_frames`` (a whole number of at least 1) can sample
    a video; ``name`` gives each option's name as the user wrote it (a CLI flag)."""
    if fps is not None and stride is not None:
        raise ValueError(f"give {name('fps')} or {name('stride')}, not both")
    if fps is not None and not (
        isinstance(fps, numbers.Real)
        and not isinstance(fps, bool)
        and math.isfinite(fps)
        and fps > 0
    ):
        raise ValueError(f"{name('fps')} must be a number of frames a second above 0, got {fps!r}")
    for option, value in (("stride", stride), ("max_frames", max_frames)):
        if value is None and option == "stride":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name(option)} must be a whole number of at least 1, got {value!r}")


DEFAULT_SAMPLING = FrameSampling()


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            return stream.read(HEADER_BYTES)
    except OSError as error:
        raise unreadable(path, error) from error


def unreadable(path: Path | str, error: OSError) -> ValueError:
    """The refusal of an input the file system will not let us read (permissions, a name
    too long): the request's fault, not the machine's."""
    return ValueError(f"{path}: cannot be read ({error.strerror or error})")


def expand_inputs(
    paths: Sequence[Path],
    frames_folder: Path,
    sampling: FrameSampling = DEFAULT_SAMPLING,
    report: Callable[[str], None] | None = None,
) -> list[Path]:
    """The views ``paths`` name, in order: a folder gives its image files (by content, in
    name order with numbers compared as numbers: :func:`natural_order`), a video its sampled
    frames (written as ``<video>_frame_0000.png`` into ``frames_folder``); anything else
    stays as given (see :func:`check_images`)."""
    from PIL import Image

    views: list[Path] = []
    for number, path in enumerate(paths):
        try:
            folder = path.is_dir()
            members = sorted(
                (p for p in path.iterdir() if p.is_file()) if folder else (),
                key=lambda p: natural_order(p.name),
            )
            is_file = path.is_file()
        except OSError as error:
            raise unreadable(path, error) from error
        if folder:
            images = [p for p in members if sniff_image_format(_head(p)) is not None]
            if not images:
                raise ValueError(f"{path}: a folder with no image files")
            views.extend(images)
        elif is_file and sniff_video_format(_head(path)) is not None:
            rate = (
                {"stride": sampling.stride}
                if sampling.stride is not None
                else {"fps": 2.0 if sampling.fps is None else sampling.fps}
            )
            folder = frames_folder / f"{number:03d}"
            folder.mkdir(parents=True)
            count = 0
            for count, frame in enumerate(
                sample_frames(
                    path,
                    str(path),
                    max_frames=sampling.max_frames,
                    bounds=LOCAL_VIDEO_BOUNDS,
                    **rate,
                ),
                start=1,
            ):
                target = folder / f"{clipped_name(path.stem)}_frame_{count - 1:04d}.png"
                Image.fromarray(frame.picture).save(target, compress_level=1)
                views.append(target)
            if report is not None:
                report(f"{path}: {count} frame(s) sampled")
        else:
            views.append(path)
    return views


# File names derived from a user's (frames, exported files) keep at most this much of it:
# file systems allow 255 bytes, and a prefix and a suffix are added.
MAX_NAME_BYTES = 100


def clipped_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``name`` cut to at most ``max_bytes`` of UTF-8, whole characters only (a file name
    that is not UTF-8 keeps its undecodable bytes, as Python hands them over)."""
    size = 0
    for index, character in enumerate(name):
        size += len(character.encode("utf-8", errors="surrogatepass"))
        if size > max_bytes:
            return name[:index]
    return name


def first_few(items: Sequence[str], limit: int) -> str:
    """``a, b, c and 7 more``: the first ``limit`` of ``items`` for a message."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def natural_order(name: str) -> tuple:
    """Sort key of a file name with its runs of digits compared as numbers: ``2.png`` before
    ``10.png`` (the frames ffmpeg writes as ``%d.png``), ties broken by the name itself."""
    parts = re.split(r"([0-9]+)", name)
    # A run of digits as a number: by its length without leading zeros, then its digits (no
    # int(): Python refuses to convert more than 4300 digits, and a name may have more).
    return (
        tuple(
            (0, len(part.lstrip("0")), part.lstrip("0"))
            if part.isascii() and part.isdigit()
            else (1, 0, part)
            for part in parts
        ),
        name,
    )


def check_images(paths: Sequence[Path]) -> None:
    """Every path is an existing image file in an accepted format with a readable header
    (checked before any model is loaded). ValueError naming the file."""
    for path in paths:
        try:
            exists, is_file = path.exists(), path.is_file()
        except OSError as error:
            raise unreadable(path, error) from error
        if not exists:
            raise ValueError(f"{path}: no such file")
        if not is_file:
            raise ValueError(f"{path}: not a file")
        read_image_header(path, str(path))
