"""The views of a request: one image, a zip of images or a video, plus further images.

Every view ends up as an image file inside the request's folder (video frames as PNG), so the
pipeline names views after their files and reads EXIF focal lengths where there are any.
Nothing here touches a model.

Everything a user sends is checked by what it is, not by what it is called, and bounded
before it is expanded (:class:`~da3cog.serve.limits.Limits`): images by their magic bytes
among :data:`da3cog.io.images.IMAGE_FORMATS` and their header's size before any pixel is
decoded; zips by their directory, then member by member as they are streamed out (format from
the first bytes and, where the header lies near the start, size before the member is
written); videos by their container signature among a few demuxers, with every protocol but
the one local file turned off. Views larger than ``max_view_pixels`` are downscaled when read
(JPEGs by libjpeg's DCT scaling while decoding), keeping their EXIF, so outputs at input
resolution stay bounded. Each view carries the name the user knows it by, for messages.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from da3cog.io.images import (
    DEFAULT_MAX_PIXELS,
    HEADER_BYTES,
    IMAGE_FORMATS,
    ImageDecodeError,
    ImageHeader,
    open_image_file,
    pil_to_rgb_array,
    read_image_header,
    sniff_image_format,
)
from da3cog.io.inputs import clipped_name, first_few, natural_order
from da3cog.serve.limits import Limits
from da3cog.serve.request import RequestError

# File names inside a zip that are taken as images (their content decides whether they are).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"}
)
# A zip member's first bytes are held in memory to read its header before writing it out.
ZIP_HEADER_PREFIX = 1024 * 1024
# EXIF tags that tell the focal-length reader the size the sensor's pixel pitch refers to.
_EXIF_IFD = 0x8769
_PIXEL_X_DIMENSION = 0xA002
_PIXEL_Y_DIMENSION = 0xA003

Progress = Callable[[str], None]


@dataclass(frozen=True)
class View:
    """One view of a request.

    Attributes:
        path: the image file the pipeline reads (inside the request folder).
        label: how messages name it, in the user's terms (``image "a.jpg"``,
            ``images[1] "b.png"``, ``image "s.zip" member "x/c.png"``, ``image "v.mp4" frame 3``).
        input_size: ``(width, height)`` as the user sent it, stored orientation.
        size: ``(width, height)`` of ``path``; smaller than ``input_size`` when the view was
            downscaled to ``max_view_pixels``.
        transposed: whether EXIF orientation swaps width and height for display.
    """

    path: Path
    label: str
    input_size: tuple[int, int]
    size: tuple[int, int]
    transposed: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def downscaled(self) -> bool:
        return self.size != self.input_size

    @property
    def display_size(self) -> tuple[int, int]:
        """``(width, height)`` of the view as the pipeline sees it (EXIF orientation applied)."""
        return self._upright(self.size)

    @property
    def sent_display_size(self) -> tuple[int, int]:
        """``(width, height)`` of the image as the user sent it, EXIF orientation applied."""
        return self._upright(self.input_size)

    def _upright(self, size: tuple[int, int]) -> tuple[int, int]:
        return (size[1], size[0]) if self.transposed else size

    @property
    def display_scale(self) -> tuple[float, float]:
        """View pixels per input pixel along the displayed x and y axes."""
        scale = (self.size[0] / self.input_size[0], self.size[1] / self.input_size[1])
        return (scale[1], scale[0]) if self.transposed else scale

    def document(self) -> dict[str, object]:
        """For the manifest: the view's name, source and sizes."""
        return {
            "name": self.name,
            "source": self.label,
            "input_size": list(self.input_size),
            "size": list(self.size),
            "downscaled": self.downscaled,
        }


# cog downloads a URL or data-URI input to NamedTemporaryFile(suffix=<its file name>):
# "tmp" + 8 random characters + the name the user gave.
_COG_TEMP_NAME = re.compile(r"^tmp[a-z0-9_]{8}(?=.)")


def user_file_name(path: Path) -> str:
    """The file name a user gave an uploaded input (cog's temporary prefix removed)."""
    return _COG_TEMP_NAME.sub("", path.name)


def input_label(field: str, path: Path) -> str:
    """``image "photo.jpg"``: an input field and the file name the user gave it."""
    name = user_file_name(path)
    return f'{field} "{name}"' if name else field


def _safe_stem(name: str, fallback: str) -> str:
    stem = _COG_TEMP_NAME.sub("", PurePosixPath(name).stem)
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return clipped_name(cleaned) or fallback


def _view_path(folder: Path, index: int, name: str, suffix: str) -> Path:
    """A fresh file path for a view in its own sub-folder (equal names never collide), named
    after the user's file (outputs carry that name)."""
    target = folder / f"{index:04d}" / f"{_safe_stem(name, f'view_{index:04d}')}{suffix}"
    target.parent.mkdir(parents=True)
    return target


def _check_header(header: ImageHeader, label: str, limits: Limits) -> None:
    cap = limits.max_jpeg_pixels if header.format == "JPEG" else limits.max_decode_pixels
    if header.pixels > cap:
        raise RequestError(
            f"{label}: {header.width}x{header.height} = {header.pixels / 1e6:.1f} MP; a "
            f"{header.format} image may have at most {cap / 1e6:.0f} MP"
        )


def _fit(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    width, height = size
    if width * height <= max_pixels:
        return size
    factor = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * factor)), max(1, math.floor(height * factor))


def _downscaled_copy(source: Path, target: Path, label: str, size: tuple[int, int]) -> None:
    """Write ``source`` reduced to ``size`` (stored orientation) as PNG with its EXIF: the
    orientation tag still applies, and the focal-length tags still give the right focal
    length (``FocalLengthIn35mmFilm`` scales with the image; the sensor route needs the
    captured size, which is written in when the file had none)."""
    with open_image_file(source, label) as opened:
        original = opened.size
        exif = opened.getexif()
        if opened.format in ("JPEG", "MPO"):
            # libjpeg decodes straight to the smallest 1/2, 1/4 or 1/8 scale >= size.
            opened.draft("RGB", size)
        try:
            opened.load()
            # As load_image converts (16-bit and float greys scaled, not clipped to white).
            rgb = Image.fromarray(pil_to_rgb_array(opened, label))
            reduced = rgb.resize(size, Image.Resampling.LANCZOS)
        except (OSError, SyntaxError, ValueError) as error:
            raise RequestError(f"{label}: cannot decode the image ({error})") from error
    details = exif.get_ifd(_EXIF_IFD)
    if _PIXEL_X_DIMENSION not in details or _PIXEL_Y_DIMENSION not in details:
        details[_PIXEL_X_DIMENSION], details[_PIXEL_Y_DIMENSION] = original
    reduced.save(target, "PNG", compress_level=1, exif=exif.tobytes())


def take_image(
    source: Path,
    label: str,
    folder: Path,
    index: int,
    name: str,
    limits: Limits,
    *,
    consume: bool = False,
) -> View:
    """Check an image file by content and header, and place it (or its downscaled copy) as
    view ``index``; ``consume``: ``source`` is ours to move or delete. Raises RequestError
    naming ``label``."""
    try:
        header = read_image_header(source, label)
    except (ImageDecodeError, FileNotFoundError) as error:
        raise RequestError(str(error)) from error
    _check_header(header, label, limits)
    stored = (header.width, header.height)
    size = _fit(stored, limits.max_view_pixels)
    if size == stored:
        target = _view_path(folder, index, name, f".{header.format.lower()}")
        (shutil.move if consume else shutil.copyfile)(source, target)
    else:
        target = _view_path(folder, index, name, ".png")
        _downscaled_copy(source, target, label, size)
        if consume:
            source.unlink()
    return View(target, label, stored, size, header.transposed)


def _member_label(label: str, name: str) -> str:
    return f'{label} member "{name}"'


def _zip_members(
    archive: zipfile.ZipFile, label: str, limits: Limits
) -> tuple[list[zipfile.ZipInfo], list[str]]:
    """The image members of a zip in file-name order (folders, hidden files and macOS
    metadata skipped), after checking the directory against the limits; and the names of
    the other files, which are not read."""
    infos = archive.infolist()
    if len(infos) > limits.zip_max_entries:
        raise RequestError(
            f"{label}: the zip has {len(infos)} entries; at most {limits.zip_max_entries}"
        )
    members, others = [], []
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        hidden = any((p.startswith(".") and p != "..") or p == "__MACOSX" for p in parts)
        if info.is_dir() or hidden:
            continue
        if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            others.append(name)
            continue
        if ".." in parts or name.startswith(("/", "\\")) or ":" in parts[0]:
            raise RequestError(
                f"{_member_label(label, name)}: a member path that leaves the archive's folder "
                "is not accepted"
            )
        if info.flag_bits & 0x1:
            raise RequestError(f"{_member_label(label, name)}: encrypted zips are not supported")
        if info.file_size > limits.zip_max_member_bytes:
            raise RequestError(
                f"{_member_label(label, name)}: expands to {info.file_size / 1024**2:.0f} MiB; "
                f"a member may have at most {limits.zip_max_member_bytes / 1024**2:.0f} MiB"
            )
        if info.file_size > limits.zip_max_ratio * max(info.compress_size, 1):
            raise RequestError(
                f"{_member_label(label, name)}: compressed {info.compress_size} bytes expand to "
                f"{info.file_size}; at most {limits.zip_max_ratio}x is accepted"
            )
        members.append(info)
    # Numbers in names compare as numbers: frame 2 before frame 10.
    members.sort(key=lambda info: natural_order(info.filename))
    if not members:
        raise RequestError(
            f"{label}: the zip holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    total = sum(info.file_size for info in members)
    if total > limits.zip_max_total_bytes:
        raise RequestError(
            f"{label}: the zip's images expand to {total / 1024**3:.1f} GiB; at most "
            f"{limits.zip_max_total_bytes / 1024**3:.0f} GiB"
        )
    return members, sorted(others)


def _stream_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, label: str, limits: Limits
) -> None:
    """Copy one member to ``target``: its first bytes are checked (format, and the header's
    size where it can be read from them) before anything is written."""
    try:
        with archive.open(info) as source:
            prefix = source.read(ZIP_HEADER_PREFIX)
            if not prefix:
                raise RequestError(f"{label}: the member is empty (0 bytes)")
            image_format = sniff_image_format(prefix[:HEADER_BYTES])
            if image_format is None:
                raise RequestError(
                    f"{label}: not an image in an accepted format ({', '.join(IMAGE_FORMATS)}; "
                    "recognised by content, not by name)"
                )
            formats = [image_format]
            try:
                with Image.open(io.BytesIO(prefix), formats=formats) as partial:
                    width, height = partial.size
            except Image.DecompressionBombError as error:
                raise RequestError(
                    f"{label}: larger than the {DEFAULT_MAX_PIXELS / 1e6:.0f} MP any image may "
                    f"have ({error})"
                ) from error
            except (OSError, SyntaxError, ValueError, EOFError):
                # The header is not within the prefix: the written file is checked below.
                width = height = 0
            if width and height:
                _check_header(ImageHeader(image_format, width, height, ""), label, limits)
            with target.open("wb") as sink:
                sink.write(prefix)
                shutil.copyfileobj(source, sink, length=1 << 20)
    except zipfile.BadZipFile as error:
        raise RequestError(f"{label}: the member is corrupt ({error})") from error
    except (NotImplementedError, RuntimeError, OSError, EOFError, zipfile.LargeZipFile) as error:
        raise RequestError(f"{label}: cannot be extracted ({error})") from error


def extract_zip(
    path: Path,
    label: str,
    folder: Path,
    first_index: int,
    limits: Limits,
    progress: Progress,
) -> list[View]:
    """The images of a zip as views ``first_index``, ``first_index + 1``..., streamed member
    by member into ``folder`` under names of ours (member paths are never trusted);
    ``progress`` hears which files were left out for not being named as images."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise RequestError(f"{label}: not a readable zip file ({error})") from error
    with archive:
        members, others = _zip_members(archive, label, limits)
        if others:
            shown = first_few([f'"{name}"' for name in others], 5)
            progress(
                f"{label}: {len(others)} file(s) not named as images left out ({shown}); "
                f"images are taken by the names {', '.join(sorted(IMAGE_SUFFIXES))}"
            )
        if first_index + len(members) > limits.max_views:
            raise RequestError(
                f"{label}: the zip holds {len(members)} images; a request takes at most "
                f"{limits.max_views} views"
            )
        staging = folder / "zip-member"
        staging.mkdir(parents=True, exist_ok=True)
        views = []
        for offset, info in enumerate(members):
            index = first_index + offset
            member_label = _member_label(label, info.filename)
            name = PurePosixPath(info.filename.replace("\\", "/")).name
            staged = staging / "member"
            _stream_member(archive, info, staged, member_label, limits)
            views.append(
                take_image(staged, member_label, folder, index, name, limits, consume=True)
            )
        staging.rmdir()
    return views


def gather_views(
    image: Path,
    images: tuple[Path, ...],
    folder: Path,
    *,
    video_fps: float,
    max_frames: int,
    limits: Limits,
    progress: Progress,
) -> tuple[list[View], str]:
    """All views of a request as image files under ``folder``, and the kind of the main input
    (``image``, ``zip`` or ``video``). The paths must have passed
    :func:`da3cog.serve.provenance.check_request_files` already."""
    from da3cog.io.video import sniff_video_format
    from da3cog.serve.video import sample_video_frames

    image = Path(image)
    label = input_label("image", image)
    with image.open("rb") as stream:
        head = stream.read(1024)
    if not head:
        raise RequestError(f"{label}: the file is empty (0 bytes)")
    if sniff_image_format(head[:HEADER_BYTES]) is not None:
        kind = "image"
        views = [take_image(image, label, folder, 0, user_file_name(image), limits)]
    elif head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        kind = "zip"
        views = extract_zip(image, label, folder, 0, limits, progress)
        progress(f"zip: {len(views)} image(s)")
    elif sniff_video_format(head) is not None:
        kind = "video"
        views = sample_video_frames(
            image,
            label,
            folder,
            fps=video_fps,
            max_frames=min(max_frames, limits.max_views),
            limits=limits,
        )
        progress(f"video: {len(views)} frame(s) at {video_fps:g} fps")
    else:
        raise RequestError(
            f"{label}: neither an image ({', '.join(IMAGE_FORMATS)}), a zip of images nor a "
            "video (MP4, MOV, WebM, MKV, AVI, MPEG, GIF); recognised by content, not by name"
        )
    for position, extra in enumerate(images):
        extra = Path(extra)
        extra_label = input_label(f"images[{position}]", extra)
        if len(views) >= limits.max_views:
            raise RequestError(f"a request takes at most {limits.max_views} views")
        views.append(
            take_image(extra, extra_label, folder, len(views), user_file_name(extra), limits)
        )
    return views, kind
