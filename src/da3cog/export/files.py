"""Writing files completely or not at all, file naming and manifest entries."""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

from da3cog.io.inputs import clipped_name
from da3cog.memory import EXPORT_WRITERS


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; finished files get the usual mode.
_FILE_MODE = 0o666 & ~_current_umask()


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place, so a
    failure never leaves a half-written ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: Path, payload: bytes | bytearray | memoryview) -> Path:
    """:func:`write_atomically` for an in-memory payload."""
    return write_atomically(path, lambda target: target.write_bytes(payload))


def write_text_atomically(path: Path, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda target: target.write_text(text, encoding="utf-8"))


def json_number(value: float) -> float | None:
    """``value`` for a JSON document: None where it is NaN or infinite (not valid JSON)."""
    return float(value) if math.isfinite(value) else None


_UNSAFE = re.compile(r"[^\w.\-]+")


def safe_name(name: str) -> str:
    """A view name made safe for a file name: runs of characters other than letters, digits,
    ``.``, ``-`` and ``_`` become ``_``; no leading dot; at most
    :data:`~da3cog.io.inputs.MAX_NAME_BYTES` bytes; never empty."""
    cleaned = clipped_name(_UNSAFE.sub("_", name).lstrip("."))
    return cleaned or "view"


def view_file_name(kind: str, index: int, name: str, suffix: str) -> str:
    """``depth_0003_IMG_42.png``: the kind, the view index (unique) and the view's name."""
    return f"{kind}_{index:04d}_{safe_name(name)}{suffix}"


@dataclass(frozen=True)
class ManifestEntry:
    """One written file: its path, its role and, for per-view files, the view.

    Attributes:
        path: the file.
        role: what it is (``depth_npy``, ``depth_png16``, ``point_cloud``...).
        view: index of the view it belongs to, or None for files about the whole prediction.
        details: format details a reader needs, e.g. ``{"scale": ...}`` for 16-bit depth PNGs.
    """

    path: Path
    role: str
    view: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


class FileBatch:
    """Collects the files one exporter writes; see :func:`all_or_nothing`."""

    def __init__(self, writers: int = 1) -> None:
        self.entries: list[ManifestEntry] = []
        self.created_folders: list[Path] = []
        self._writers = writers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future[Path], ManifestEntry]] = []

    def write(
        self,
        path: Path,
        write: Callable[[Path], None],
        role: str,
        view: int | None = None,
        **details: Any,
    ) -> Path:
        """Write ``path`` atomically (see :func:`write_atomically`) and record it. In a
        parallel batch the write may still be running when this returns: ``write`` then
        computes what it writes itself, so that at most one file per writer is in memory."""
        missing = [parent for parent in (path.parent, *path.parent.parents) if not parent.exists()]
        self.created_folders.extend(missing)
        entry = ManifestEntry(path, role, view, details)
        if self._writers <= 1:
            write_atomically(path, write)
            self.entries.append(entry)
            return path
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._writers, thread_name_prefix="da3cog-export")
        self._pending.append((self._pool.submit(write_atomically, path, write), entry))
        return path

    def wait(self) -> BaseException | None:
        """Let every queued write end; record the ones written, in the order they were asked
        for, and return the first error (None when all were written). Interrupted (a
        cancelled request), the writes not started are dropped and the running ones end
        before the interruption goes on, so no file appears after the batch is cleaned up."""
        if self._pool is None:
            return None
        try:
            wait_for([future for future, _ in self._pending])
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            failure = None
            for future, entry in self._pending:
                if future.cancelled():
                    continue
                error = future.exception()
                if error is None:
                    self.entries.append(entry)
                elif failure is None:
                    failure = error
            self._pending.clear()
        return failure

    @property
    def paths(self) -> list[Path]:
        return [entry.path for entry in self.entries]


@contextmanager
def all_or_nothing(parallel: bool = False) -> Iterator[FileBatch]:
    """A batch of files that all exist at the end, or, when anything raises, none of them:
    each file is written atomically and the ones already written are removed on failure.
    ``parallel``: several files are written at once, by ``da3cog.memory.EXPORT_WRITERS``
    threads (image encoders release the GIL; each write computes its own content, and the
    memory estimate counts one image per writer); the batch ends when all have."""
    batch = FileBatch(EXPORT_WRITERS if parallel else 1)
    try:
        try:
            yield batch
        finally:
            failure = batch.wait()
        if failure is not None:
            raise failure
    except BaseException:
        for entry in reversed(batch.entries):
            entry.path.unlink(missing_ok=True)
        for folder in sorted(set(batch.created_folders), key=lambda f: -len(f.parts)):
            with suppress(OSError):
                folder.rmdir()
        raise


_Options = ParamSpec("_Options")


def returning_paths(
    files: Callable[_Options, list[ManifestEntry]], name: str
) -> Callable[_Options, list[Path]]:
    """The library's ``export_*`` form of an exporter: ``files`` (which returns the manifest
    entries of what it wrote) under ``name``, with its arguments, returning the paths."""

    @functools.wraps(files)
    def export(*args: _Options.args, **kwargs: _Options.kwargs) -> list[Path]:
        return [entry.path for entry in files(*args, **kwargs)]

    export.__name__ = export.__qualname__ = name
    export.__signature__ = inspect.signature(files).replace(  # type: ignore[attr-defined]
        return_annotation="list[Path]"
    )
    export.__doc__ = (
        f"Write what :func:`{files.__name__}` writes and return the paths of the files.\n\n"
        f"{files.__doc__}"
    )
    return export
