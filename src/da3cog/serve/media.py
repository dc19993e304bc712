"""The views of a request: one image, a zip of images or a video, plus further images.

Every view ends up as an image file inside the request's folder (video frames as PNG), so the
pipeline names views after their files and reads EXIF focal lengths where there are any.
Nothing here touches a model.
"""

from __future__ import annotations

import functools
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from da3cog.serve.request import RequestError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"}
)
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".gif"}
)
# A zip may expand to at most this much: it guards the disk against zip bombs.
MAX_ZIP_BYTES = 4 * 1024**3

Progress = Callable[[str], None]


@functools.cache
def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF headers (the pipeline registers the same opener to decode)."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def is_image(path: Path) -> bool:
    """Whether Pillow recognises ``path`` as an image (reads the header only)."""
    _register_heif()
    try:
        with Image.open(path) as opened:
            return opened.format is not None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


# cog downloads a URL or data-URI input to NamedTemporaryFile(suffix=<its file name>):
# "tmp" + 8 random characters + the name the user gave.
_COG_TEMP_NAME = re.compile(r"^tmp[a-z0-9_]{8}(?=.)")


def _safe_stem(name: str, fallback: str) -> str:
    stem = _COG_TEMP_NAME.sub("", PurePosixPath(name).stem)
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return cleaned[:80] or fallback


def _place(source: Path, folder: Path, index: int, name: str, suffix: str) -> Path:
    """Copy a view into its own sub-folder (so equal names never collide), keeping the name
    that the outputs will carry."""
    target = folder / f"{index:04d}" / f"{_safe_stem(name, f'view_{index:04d}')}{suffix}"
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    return target


def extract_zip(path: Path, folder: Path, first_index: int, max_views: int) -> list[Path]:
    """The images of a zip (by file extension, in file-name order; folders, hidden files and
    macOS metadata skipped), written one per sub-folder of ``folder``."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise RequestError(f"image: not a readable zip file ({error})") from error
    with archive:
        members = [
            info
            for info in archive.infolist()
            if not info.is_dir()
            and PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
            and not any(
                part.startswith(".") or part == "__MACOSX"
                for part in PurePosixPath(info.filename).parts
            )
        ]
        members.sort(key=lambda info: info.filename)
        if not members:
            raise RequestError(
                f"image: the zip holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        if first_index + len(members) > max_views:
            raise RequestError(
                f"image: the zip holds {len(members)} images; a request takes at most "
                f"{max_views} views"
            )
        total = sum(info.file_size for info in members)
        if total > MAX_ZIP_BYTES:
            raise RequestError(
                f"image: the zip's images expand to {total / 1024**3:.1f} GiB; the limit is "
                f"{MAX_ZIP_BYTES / 1024**3:.0f} GiB"
            )
        views = []
        for offset, info in enumerate(members):
            index = first_index + offset
            name = PurePosixPath(info.filename)
            target = folder / f"{index:04d}" / f"{_safe_stem(name.name, f'view_{index:04d}')}"
            target = target.with_name(target.name + name.suffix.lower())
            target.parent.mkdir(parents=True)
            # Read through the archive into a name of ours: member paths are never trusted.
            with archive.open(info) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
            if not is_image(target):
                raise RequestError(f"image: {info.filename} in the zip is not a readable image")
            views.append(target)
    return views


def gather_views(
    image: Path,
    images: tuple[Path, ...],
    folder: Path,
    *,
    video_fps: float,
    max_frames: int,
    max_views: int,
    progress: Progress,
) -> tuple[list[Path], str]:
    """All views of a request as image files under ``folder``, and the kind of the main input
    (``image``, ``zip`` or ``video``)."""
    from da3cog.serve.video import sample_video_frames

    image = Path(image)
    suffix = image.suffix.lower()
    if zipfile.is_zipfile(image):
        kind = "zip"
        views = extract_zip(image, folder, 0, max_views)
        progress(f"zip: {len(views)} image(s)")
    elif suffix not in VIDEO_SUFFIXES and is_image(image):
        kind = "image"
        views = [_place(image, folder, 0, image.name, suffix or ".img")]
    else:
        kind = "video"
        limit = min(max_frames, max_views)
        views = sample_video_frames(image, folder, fps=video_fps, max_frames=limit)
        progress(f"video: {len(views)} frame(s) at {video_fps:g} fps")
    for extra in images:
        extra = Path(extra)
        if len(views) >= max_views:
            raise RequestError(f"a request takes at most {max_views} views")
        if not is_image(extra):
            raise RequestError(
                f"images: {extra.name} is not a readable image (JPEG, PNG, WebP, HEIC); zips "
                "and videos go in `image`"
            )
        views.append(_place(extra, folder, len(views), extra.name, extra.suffix.lower()))
    return views, kind
