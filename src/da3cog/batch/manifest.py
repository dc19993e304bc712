"""The scenes of a batch, read from a manifest file.

JSON Lines (``.jsonl``), one scene an object::

    {"scene": "kitchen", "images": ["kitchen/a.jpg", "kitchen/b.jpg"], "cameras": "k.json"}
    {"scene": "walk", "video": "walk.mp4"}

or CSV (``.csv``) with the columns ``scene``, ``images`` (paths separated by ``;``),
``video`` and ``cameras`` (empty cells for none). Relative paths are relative to the
manifest's folder; an ``images`` entry may also be a folder (its images) or a video (its
frames, see :mod:`da3cog.io.inputs`). Scene ids name the scenes' output folders: letters,
digits, ``.``, ``_`` and ``-`` only, unique.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Scene:
    """One unit of work: its id, its inputs (absolute paths) and optional cameras file."""

    id: str
    inputs: tuple[Path, ...]
    cameras: Path | None = None


def read_manifest(path: str | Path) -> list[Scene]:
    """The scenes of a ``.jsonl`` or ``.csv`` manifest (see the module docstring);
    ValueError naming the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such manifest file")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise ValueError(f"{path}: a manifest is .jsonl or .csv")
    scenes: list[Scene] = []
    seen: set[str] = set()
    for line, row in rows:
        where = f"{path.name} line {line}"
        scene_id = row.get("scene")
        if not isinstance(scene_id, str) or not _SCENE_ID.match(scene_id):
            raise ValueError(
                f"{where}: 'scene' must be an id of letters, digits, '.', '_' and '-' "
                f"(it names the output folder), got {scene_id!r}"
            )
        if scene_id in seen:
            raise ValueError(f"{where}: scene {scene_id!r} is listed twice")
        seen.add(scene_id)
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
        scenes.append(
            Scene(
                scene_id,
                tuple(path.parent / item for item in inputs),
                path.parent / cameras if cameras else None,
            )
        )
    if not scenes:
        raise ValueError(f"{path}: the manifest lists no scenes")
    return scenes


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name} line {number}: a scene is a JSON object")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = []
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
                    },
                )
            )
    return rows
