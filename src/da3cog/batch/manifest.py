"""The scenes of a batch, read from a manifest: JSON Lines, CSV or Parquet, local or a URI.

JSON Lines (``.jsonl``), one scene an object::

    {"scene": "kitchen", "images": ["kitchen/a.jpg", "kitchen/b.jpg"], "cameras": "k.json"}
    {"scene": "walk", "video": "s3://bucket/walk.mp4", "options": {"process_res": 336}}

CSV (``.csv``) with the columns ``scene``, ``images`` (separated by ``;``), ``video``,
``cameras`` and ``options`` (JSON text; empty cells for none), or Parquet (``.parquet``, needs
pyarrow: ``pip install 'da3cog[batch]'``) with the same columns (``images`` a list of
strings, ``options`` JSON text). Inputs are paths or URIs (read through fsspec); relative ones
are relative to the manifest's folder. An ``images`` entry may also be a folder (its images)
or a video (its frames, see :mod:`da3cog.io.inputs`). Scene ids name the scenes' output
folders: letters, digits, ``.``, ``_`` and ``-`` only, unique.

``options`` override the batch's settings for one scene: any field of
:class:`da3cog.pipeline.InferenceOptions` (``process_res``, ``chunk_size``, ``seed``...),
``export`` (a list of formats) and the frame sampling of videos (``fps``, ``stride``,
``max_frames``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from da3cog.batch import storage
from da3cog.io.inputs import FrameSampling
from da3cog.pipeline import InferenceOptions

_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAMPLING_OPTIONS = ("fps", "stride", "max_frames")
SCENE_FIELDS = ("scene", "images", "video", "cameras", "options")
INFERENCE_OPTIONS = tuple(f.name for f in dataclasses.fields(InferenceOptions))
SCENE_OPTIONS = (*INFERENCE_OPTIONS, "export", *SAMPLING_OPTIONS)


@dataclass(frozen=True)
class Scene:
    """One unit of work.

    Attributes:
        id: names its output folder.
        inputs: its images, folders or video, as paths or URIs resolved against the manifest.
        cameras: a cameras JSON file (path or URI), or None.
        options: its overrides of the batch's settings (see the module docstring).
    """

    id: str
    inputs: tuple[str, ...]
    cameras: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "inputs": list(self.inputs)}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Scene:
        return cls(**{**document, "inputs": tuple(document["inputs"])})


def read_manifest(location: str | Path) -> list[Scene]:
    """The scenes of a ``.jsonl``, ``.csv`` or ``.parquet`` manifest at a path or URI (see
    the module docstring); ValueError naming the line (row) and what is wrong."""
    location = str(location)
    name = location.rstrip("/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix
    if suffix not in (".jsonl", ".csv", ".parquet"):
        raise ValueError(f"{location}: a manifest is .jsonl, .csv or .parquet")
    try:
        if suffix == ".parquet":
            rows = _parquet_rows(location)
        else:
            text = storage.read_text(location)
            rows = _jsonl_rows(name, text) if suffix == ".jsonl" else _csv_rows(name, text)
    except FileNotFoundError:
        raise ValueError(f"{location}: no such manifest file") from None
    # A local manifest's folder by its absolute path: Ray actors elsewhere resolve relative
    # inputs against their own working directory.
    base = storage.parent(location if storage.is_uri(location) else os.path.abspath(location))
    scenes: list[Scene] = []
    seen: dict[str, str] = {}
    for line, row in rows:
        scene = _scene(row, base, f"{name} line {line}")
        twice = _listed_twice(scene.id, seen)
        if twice:
            raise ValueError(f"{name} line {line}: {twice}")
        scenes.append(scene)
    if not scenes:
        raise ValueError(f"{location}: the manifest lists no scenes")
    return scenes


def check_scene_ids(scenes: Sequence[Scene]) -> None:
    """ValueError unless every scene's id can name its own output folder: the rules
    :func:`read_manifest` applies, for scenes made another way (:class:`Scene` is public)."""
    seen: dict[str, str] = {}
    for scene in scenes:
        problem = _id_problem(scene.id) or _listed_twice(scene.id, seen)
        if problem:
            raise ValueError(problem)


def _id_problem(scene_id: object) -> str | None:
    if not isinstance(scene_id, str) or not _SCENE_ID.match(scene_id):
        return (
            "'scene' must be an id of letters, digits, '.', '_' and '-' (it names the output "
            f"folder), got {scene_id!r}"
        )
    if scene_id.casefold() in {name.casefold() for name in storage.RESERVED_NAMES}:
        return f"{scene_id!r} names the batch's index, not a scene"
    return None


def _listed_twice(scene_id: str, seen: dict[str, str]) -> str | None:
    """Whether ``scene_id`` names a folder an earlier id of ``seen`` (by case-folded id)
    names (one folder on macOS and Windows disks when they differ in case only); records it."""
    folded = scene_id.casefold()
    if folded not in seen:
        seen[folded] = scene_id
        return None
    earlier = seen[folded]
    before = "" if earlier == scene_id else f" ({earlier!r} before)"
    return f"scene {scene_id!r} is listed twice{before}"


def _scene(row: dict[str, Any], base: str, where: str) -> Scene:
    unknown = sorted(str(key) for key in set(row) - set(SCENE_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(unknown)}; a scene has {', '.join(SCENE_FIELDS)}"
        )
    scene_id = row.get("scene")
    problem = _id_problem(scene_id)
    if problem:
        raise ValueError(f"{where}: {problem}")
    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    video = row.get("video")
    inputs = [*images, *([video] if video else [])]
    if not inputs or not all(isinstance(item, str) and item for item in inputs):
        raise ValueError(f"{where}: scene {scene_id!r} needs 'images' (paths) or a 'video'")
    cameras = row.get("cameras") or None
    if cameras is not None and not isinstance(cameras, str):
        raise ValueError(f"{where}: 'cameras' must be a path")
    options = _options(row.get("options"), where)
    return Scene(
        scene_id,
        tuple(storage.join(base, item) for item in inputs),
        storage.join(base, cameras) if cameras else None,
        options,
    )


def _options(value: Any, where: str) -> dict[str, Any]:
    """A scene's ``options``, checked now (before any model is loaded) by building what they
    configure."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: 'options' is not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'options' must be an object")
    unknown = sorted(set(value) - set(SCENE_OPTIONS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(SCENE_OPTIONS)}"
        )
    try:
        scene_settings(value, InferenceOptions(), ("depth_npy",), FrameSampling())
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: options: {error}") from None
    return value


def scene_settings(
    options: dict[str, Any],
    inference: InferenceOptions,
    formats: tuple[str, ...],
    sampling: FrameSampling,
) -> tuple[InferenceOptions, tuple[str, ...], FrameSampling]:
    """The batch's settings with a scene's ``options`` applied."""
    from da3cog.export.manifest import FORMATS

    inference = dataclasses.replace(
        inference, **{k: v for k, v in options.items() if k in INFERENCE_OPTIONS}
    )
    if "export" in options:
        chosen = options["export"]
        if not isinstance(chosen, list) or not chosen:
            raise ValueError("'export' must be a list of formats")
        bad = [name for name in chosen if name not in (*FORMATS, "all")]
        if bad:
            raise ValueError(f"unknown export format(s) {', '.join(map(str, bad))}")
        formats = tuple(chosen)
    wanted = [name for name in formats if name in ("gaussians_ply", "gaussians_video")]
    if wanted and not inference.infer_gaussians:
        raise ValueError(
            f"export {', '.join(wanted)} needs the Gaussians predicted: --gaussians, or "
            '"infer_gaussians": true in the scene\'s options (giant, nested)'
        )
    if any(key in options for key in SAMPLING_OPTIONS):
        sampling = dataclasses.replace(
            sampling,
            **{
                **({"fps": None, "stride": None} if {"fps", "stride"} & set(options) else {}),
                **{k: v for k, v in options.items() if k in SAMPLING_OPTIONS},
            },
        )
    return inference, formats, sampling


def _jsonl_rows(name: str, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{name} line {number}: a scene is a JSON object")
        rows.append((number, row))
    return rows


def _csv_rows(name: str, text: str) -> list[tuple[int, dict]]:
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    # An empty column name is a trailing comma (spreadsheets write them): not a column.
    unknown = sorted({name for name in reader.fieldnames or () if name} - set(SCENE_FIELDS))
    if unknown:
        raise ValueError(
            f"{name} line 1: unknown column(s) {', '.join(unknown)}; a scene has "
            f"{', '.join(SCENE_FIELDS)}"
        )
    for number, row in enumerate(reader, start=2):
        images = [item.strip() for item in (row.get("images") or "").split(";")]
        rows.append(
            (
                number,
                {
                    "scene": (row.get("scene") or "").strip(),
                    "images": [item for item in images if item],
                    "video": (row.get("video") or "").strip(),
                    "cameras": (row.get("cameras") or "").strip(),
                    "options": (row.get("options") or "").strip(),
                },
            )
        )
    return rows


def _parquet_rows(location: str) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{location}: reading a Parquet manifest needs pyarrow: pip install 'da3cog[batch]'"
        ) from None
    import fsspec

    with fsspec.open(location, "rb") as stream:
        table = pq.read_table(stream)
    return [(number, row) for number, row in enumerate(table.to_pylist(), start=1)]
