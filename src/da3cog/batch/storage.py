"""Where a batch reads its inputs and writes its scenes, through fsspec.

A location is a local path or a URI (``s3://bucket/run``, ``gs://...``, ``memory://...``; the
filesystem package, e.g. ``s3fs``, is the user's to install). Local output folders get
each scene by one atomic rename; on object stores, which have no rename, a scene's files are
uploaded with the completion marker last, so a reader (and a rerun) trusts only folders that
have the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from da3cog.io.inputs import first_few
from da3cog.processes import process_alive

RESULT_NAME = "result.json"
COMPLETE_NAME = ".complete"
# In every scene folder a batch writes, uploaded first: a folder with it (and without the
# completion marker) is a batch's half-written scene, which a rerun may replace; any other
# folder under the scene's name is the user's own, which a batch never touches.
SCENE_MARKER = ".da3cog-scene"
PARTIAL_FOLDER = ".partial"
# Scenes whose attempts never ended (their worker was killed: out of memory, a crash in a
# decoder) are not tried again after this many: their row says failed.
MAX_SCENE_ATTEMPTS = 3
ATTEMPTS_FOLDER = "attempts"
INDEX_NAME = "index.jsonl"
INDEX_PARQUET_NAME = "index.parquet"
# Names in the output folder that are not scenes.
RESERVED_NAMES = (INDEX_NAME, INDEX_PARQUET_NAME, PARTIAL_FOLDER)

# One remote input file larger than this is refused before it is fetched: a batch reads the
# user's own collection, but one mistyped URI must not fill the worker's disk.
MAX_REMOTE_INPUT_BYTES = 4 * 1024**3


def is_uri(text: str) -> bool:
    """True for ``protocol://...`` (``file://`` included), False for a plain path."""
    return "://" in text


def join(base: str, relative: str) -> str:
    """``relative`` under ``base`` (a folder path or URI); absolute paths and URIs as given."""
    if is_uri(relative) or os.path.isabs(relative):
        return relative
    if is_uri(base):
        return posixpath.join(base, relative)
    return str(Path(base) / relative)


def parent(location: str) -> str:
    """The folder holding ``location`` (a path or URI)."""
    if is_uri(location):
        protocol, _, rest = location.partition("://")
        return f"{protocol}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(location).parent)


def read_text(location: str) -> str:
    """The UTF-8 text at ``location``, without the byte-order mark some editors (Excel's
    "CSV UTF-8") put first."""
    with fsspec.open(location, "r", encoding="utf-8-sig") as stream:
        return stream.read()


def fetch_inputs(locations: Sequence[str], folder: Path) -> list[Path]:
    """Local paths for ``locations``: plain paths (and ``file://``) as they are, remote files
    and folders copied into ``folder`` (names kept). ValueError naming the location when it
    does not exist or a file is larger than :data:`MAX_REMOTE_INPUT_BYTES`."""
    paths: list[Path] = []
    for number, location in enumerate(locations):
        fs, path = fsspec.core.url_to_fs(location)
        if isinstance(fs, LocalFileSystem):
            paths.append(Path(path))
            continue
        if not fs.exists(path):
            raise ValueError(f"{location}: no such file or folder")
        target = folder / f"{number:03d}" / posixpath.basename(path.rstrip("/"))
        if fs.isdir(path):
            target.mkdir(parents=True)
            for member in _folder_images(fs, path, location):
                fs.get_file(member, str(target / posixpath.basename(member)))
        else:
            _check_size(fs, path, location)
            target.parent.mkdir(parents=True)
            fs.get_file(path, str(target))
        paths.append(target)
    return paths


def _folder_images(fs: fsspec.AbstractFileSystem, path: str, location: str) -> list[str]:
    """The image files directly in a remote folder (by content, as a local folder's are
    taken: :func:`da3cog.io.inputs.expand_inputs`), at most ``MAX_REMOTE_INPUT_BYTES`` in
    all: a bucket's other files (archives, subfolders) are not downloaded."""
    from da3cog.io.images import HEADER_BYTES, sniff_image_format

    files = sorted(
        (entry["name"], entry.get("size") or 0)
        for entry in fs.ls(path, detail=True)
        if entry.get("type") == "file"
    )
    images = [
        (name, size)
        for name, size in files
        if sniff_image_format(fs.cat_file(name, start=0, end=HEADER_BYTES)) is not None
    ]
    total = sum(size for _, size in images)
    if total > MAX_REMOTE_INPUT_BYTES:
        raise ValueError(
            f"{location}: its {len(images)} images come to {total / 1024**3:.1f} GiB, over the "
            f"{MAX_REMOTE_INPUT_BYTES / 1024**3:.0f} GiB limit for one input"
        )
    return [name for name, _ in images]


def _check_size(fs: fsspec.AbstractFileSystem, path: str, label: str) -> None:
    size = fs.size(path)
    if size is not None and size > MAX_REMOTE_INPUT_BYTES:
        raise ValueError(
            f"{label}: {size / 1024**3:.1f} GiB, over the {MAX_REMOTE_INPUT_BYTES / 1024**3:.0f} "
            "GiB limit for one input file"
        )


class OutputRoot:
    """The batch's output folder: one folder per scene, ``index.jsonl`` (and
    ``index.parquet`` when pyarrow is installed) beside them."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        # A local folder by its absolute path: Ray actors elsewhere resolve a relative one
        # against their own working directory; a link by where it points (made there).
        self.location = str(location)
        if not is_uri(self.location):
            self.location = os.path.abspath(location)
            if os.path.islink(self.location):
                self.location = os.path.realpath(self.location)
        self.fs, self.root = fsspec.core.url_to_fs(self.location)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __reduce__(self) -> tuple[type[OutputRoot], tuple[str]]:
        # Sent to Ray workers by location: each opens its own filesystem client.
        return (OutputRoot, (self.location,))

    def scene(self, scene: str) -> str:
        return posixpath.join(self.root, scene)

    def scene_location(self, scene: str) -> str:
        """The scene's folder as the user names it (path or URI)."""
        return join(self.location, scene)

    def prepare(self, scenes: Sequence[str] = ()) -> None:
        """Create the folder and drop what killed runs on this machine left in the staging
        area (a run still going, here or elsewhere, keeps its own). ValueError, before any
        scene runs, naming the ``scenes`` whose folder exists and is not one a batch wrote."""
        if self.local and Path(self.root).exists() and not Path(self.root).is_dir():
            raise ValueError(f"{self.location} is a file, not a folder")
        self.fs.makedirs(self.root, exist_ok=True)
        self._drop_dead_staging()
        foreign = self.foreign(scenes)
        if foreign:
            raise self._not_ours(foreign)

    def foreign(self, scenes: Sequence[str]) -> list[str]:
        """The ``scenes`` whose folder exists without the markers a batch writes."""
        if not scenes:
            return []
        try:
            listed = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:  # an object store's "folder" before its first file
            listed = []
        present = {posixpath.basename(p.rstrip("/")) for p in listed}
        return [scene for scene in scenes if scene in present and not self._ours(scene)]

    def _not_ours(self, scenes: Sequence[str]) -> ValueError:
        """The refusal to replace the folders of ``scenes``, which a batch did not write."""
        shown = first_few([self.scene_location(scene) for scene in scenes], 5)
        return ValueError(
            f"{shown}: already there and not written by a da3cog batch; a batch does "
            "not replace folders it did not write: move them, or choose another --out"
        )

    def _ours(self, scene: str) -> bool:
        folder = self.scene(scene)
        return self.fs.isdir(folder) and any(
            self.fs.exists(posixpath.join(folder, name)) for name in (SCENE_MARKER, COMPLETE_NAME)
        )

    def finish(self) -> None:
        """Drop this process's staging folder, those of processes on this machine that died
        (a killed Ray worker's half-written scene), and the staging area once it is empty."""
        if self.local:
            partial = Path(self.root) / PARTIAL_FOLDER
            shutil.rmtree(partial / _own_staging(), ignore_errors=True)
            self._drop_dead_staging()
            with contextlib.suppress(OSError):
                partial.rmdir()

    def _drop_dead_staging(self) -> None:
        """Remove the staging folders of processes on this machine that are gone."""
        partial = Path(self.root) / PARTIAL_FOLDER
        if not self.local or not partial.is_dir():
            return
        for folder in partial.glob(f"{_host()}-*"):
            pid = folder.name.rpartition("-")[2]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def release(self, staging: Path) -> None:
        """Remove a scene's staging folder (and this process's part of the staging area when
        that leaves it empty: an idle worker leaves nothing there)."""
        shutil.rmtree(staging, ignore_errors=True)
        if self.local:
            with contextlib.suppress(OSError):
                staging.parent.rmdir()

    def completed(self, scene: str) -> dict[str, Any] | None:
        """The stored result of ``scene`` when its folder is complete, else None."""
        folder = self.scene(scene)
        if not self.fs.exists(posixpath.join(folder, COMPLETE_NAME)):
            return None
        # A marker beside a lost or cut result (a disk filled, a hand edit): not complete, so
        # the scene runs again and its folder is replaced.
        try:
            with self.fs.open(posixpath.join(folder, RESULT_NAME), "r") as stream:
                return json.load(stream)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def begin_attempt(self, scene: str) -> tuple[str, int]:
        """Record an attempt at ``scene`` before it runs; returns its record (for
        :meth:`end_attempt`) and how many earlier attempts never ended (their worker died)."""
        folder = self._attempts(scene)
        try:
            earlier = len(self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            earlier = 0
        record = posixpath.join(folder, f"{_own_staging()}-{uuid.uuid4().hex[:12]}")
        self.fs.makedirs(folder, exist_ok=True)
        self.fs.pipe_file(record, b"")
        return record, earlier

    def end_attempt(self, scene: str, record: str, *, clear: bool = False) -> None:
        """The attempt ``record`` ended (with a row, done or failed); ``clear`` forgets the
        scene's dead attempts too (it landed, or its row says it was given up)."""
        folder = self._attempts(scene)
        with contextlib.suppress(FileNotFoundError):
            if clear:
                self.fs.rm(folder, recursive=True)
            else:
                self.fs.rm(record)
        if self.local:
            for empty in (Path(folder), Path(folder).parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()

    def _attempts(self, scene: str) -> str:
        """The folder of ``scene``'s attempt records."""
        return posixpath.join(self.root, PARTIAL_FOLDER, ATTEMPTS_FOLDER, scene)

    def staging(self, scene: str) -> Path:
        """A fresh local folder to write ``scene`` into before :meth:`publish`: under
        ``.partial`` on the same disk for a local output (so publishing is one rename), a
        temporary folder for a remote one. Unique per attempt: a retried scene never writes
        over an attempt still running elsewhere."""
        name = f"{scene}.{uuid.uuid4().hex[:12]}"
        if self.local:
            folder = Path(self.root) / PARTIAL_FOLDER / _own_staging() / name
            folder.mkdir(parents=True)
            return folder
        return Path(tempfile.mkdtemp(prefix=f"da3cog-{name}-"))

    def publish(self, scene: str, folder: Path) -> bool:
        """Move the complete ``folder`` (its marker included) into place as ``scene``'s
        folder, replacing a half-written one. False, leaving the landed one untouched, when
        another attempt of the same scene landed first."""
        if self.completed(scene) is not None:
            return False
        final = self.scene(scene)
        if self.fs.exists(final):
            if not self._ours(scene):
                raise self._not_ours([scene])
            self.fs.rm(final, recursive=True)
        if self.local:
            try:
                os.replace(folder, final)
            except OSError:
                # A concurrent attempt renamed its folder in between: it landed first.
                if self.completed(scene) is not None:
                    return False
                raise
            return True
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_NAME)
        # The scene marker first: a folder the upload leaves half-written is known as ours.
        files.sort(key=lambda path: path != folder / SCENE_MARKER)
        for path in files:
            self.fs.put_file(str(path), posixpath.join(final, path.relative_to(folder).as_posix()))
        self.fs.pipe_file(posixpath.join(final, COMPLETE_NAME), b"")
        return True

    def write_index(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """``index.jsonl`` (and ``index.parquet`` with pyarrow), each written whole under a
        temporary name and renamed (uploaded whole on object stores). Returns their locations."""
        written = [self._write_whole(INDEX_NAME, "".join(json.dumps(r) + "\n" for r in rows))]
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return written
        table = pa.Table.from_pylist([_flat(row) for row in rows])
        with tempfile.TemporaryDirectory(prefix="da3cog-index-") as folder:
            local = Path(folder) / INDEX_PARQUET_NAME
            pq.write_table(table, local)
            written.append(self._write_whole(INDEX_PARQUET_NAME, local.read_bytes()))
        return written

    def _write_whole(self, name: str, content: str | bytes) -> str:
        data = content.encode() if isinstance(content, str) else content
        target = posixpath.join(self.root, name)
        if self.local:
            temporary = Path(self.root) / f".{name}.{os.getpid()}"
            temporary.write_bytes(data)
            os.replace(temporary, target)
        else:
            self.fs.pipe_file(target, data)
        return join(self.location, name)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _own_staging() -> str:
    """This process's part of the staging area: another run on the same output folder (a
    retry, a second user) neither writes into it nor removes it."""
    return f"{_host()}-{os.getpid()}"


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """An index row with its nested records as columns (``timings.predict`` ->
    ``seconds_predict``; the cameras summary as JSON text), for Parquet's fixed schema."""
    flat = {key: value for key, value in row.items() if key not in ("timings", "cameras")}
    for stage in ("inputs", "predict", "export"):
        flat[f"seconds_{stage}"] = (row.get("timings") or {}).get(stage)
    flat["cameras"] = json.dumps(row["cameras"]) if row.get("cameras") else None
    return flat
