"""A request's output files: all in one flat folder under unique names, plus ``manifest.json``.

Why flat and unique: the cog server uploads each returned file to ``<upload URL><file
name>`` (coglet 0.23.1 keeps only the base name, and uploads in parallel, so the returned
list arrives in no particular order). Two files with one name would overwrite each other, and
the order of the list cannot tell a client which file is which; ``manifest.json`` does, by
name and role.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from da3cog import __version__
from da3cog.export.manifest import export_all
from da3cog.pipeline import Prediction
from da3cog.serve.media import View
from da3cog.serve.request import EXPORT_FORMATS_MAP, POINT_FORMATS, ModelChoice, RequestValues

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
COLMAP_FOLDER = "colmap"
DEPTH_VIDEO_NAME = "depth_video.mp4"
GAUSSIAN_VIDEO_NAME = "gaussians_flythrough.mp4"


@dataclass(frozen=True)
class OutputFile:
    """One returned file.

    Attributes:
        path: the file, in the request's output folder.
        role: what it is (``depth_npy``, ``glb_scene``, ``gaussian_splats``, ``colmap_zip``...).
        view: the view it belongs to (index over the whole request), or None.
        prediction: index into the manifest's ``predictions`` (one per view in monocular
            mode, else one), or None for files about the whole request.
        details: format details (a depth PNG's scale, a count...).
    """

    path: Path
    role: str
    view: int | None = None
    prediction: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {
            "name": self.path.name,
            "role": self.role,
            "view": self.view,
            "prediction": self.prediction,
            "bytes": self.path.stat().st_size,
            **self.details,
        }


class OutputFolder:
    """The flat folder of returned files; every name is unique."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.files: list[OutputFile] = []

    def unique_name(self, name: str) -> str:
        """``name``, or ``stem_2.ext``, ``stem_3.ext``... when it is taken."""
        candidate, stem, suffix, counter = name, Path(name).stem, Path(name).suffix, 1
        while (self.folder / candidate).exists() or candidate == MANIFEST_NAME:
            counter += 1
            candidate = f"{stem}_{counter}{suffix}"
        return candidate

    def add(self, source: Path, name: str, role: str, **fields: Any) -> OutputFile:
        """Move ``source`` in under a unique version of ``name``."""
        target = self.folder / self.unique_name(name)
        shutil.move(source, target)
        entry = OutputFile(target, role, **fields)
        self.files.append(entry)
        return entry

    def new_path(self, name: str) -> Path:
        """A free path for a file written straight into the folder (then :meth:`record` it)."""
        return self.folder / self.unique_name(name)

    def record(self, path: Path, role: str, **fields: Any) -> OutputFile:
        entry = OutputFile(path, role, **fields)
        self.files.append(entry)
        return entry


def base_formats(prediction: Prediction) -> list[str]:
    """Returned for every request: depth (+ confidence) ``.npy``, the visualisation,
    ``cameras.json`` when any view has a camera, and the 3DGS PLY (``gaussians.ply``, with
    upstream's border and far-point trimming) when the prediction has Gaussians
    (gaussian-splat mode)."""
    formats = ["depth_npy", "depth_vis"]
    if any(v.intrinsics is not None or v.extrinsics is not None for v in prediction.views):
        formats.append("cameras_json")
    if prediction.gaussians is not None:
        formats.append("gaussians_ply")
    return formats


def export_options(values: RequestValues) -> dict[str, Any]:
    """The point-cloud options, only when a chosen format uses them (export_all rejects
    options no format uses)."""
    formats = set(EXPORT_FORMATS_MAP[values.export_format])
    if not formats & (POINT_FORMATS | {"all"}):
        return {}
    return {
        "confidence_percentile": float(values.confidence_percentile),
        "max_points": int(values.max_points),
        "seed": int(values.seed),
    }


def _zip_folder(folder: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())


def export_prediction(
    prediction: Prediction,
    index: int,
    prefix: str,
    view_offset: int,
    values: RequestValues,
    work: Path,
    outputs: OutputFolder,
) -> dict[str, Any]:
    """Export one prediction into ``outputs`` (names prefixed with ``prefix``, view indices
    shifted by ``view_offset``); returns its export manifest with paths replaced by the
    returned names. The COLMAP folder is returned as one zip (its layout is the format), and
    its files are named ``<zip name>!<path inside>`` in that manifest."""
    formats = base_formats(prediction) + list(EXPORT_FORMATS_MAP[values.export_format])
    options = export_options(values)
    manifest = export_all(prediction, work / f"export_{index:04d}", formats, **options)
    renamed: dict[str, str] = {}
    colmap_parts = []
    for entry in manifest.entries:
        relative = PurePosixPath(entry.path.relative_to(manifest.folder).as_posix())
        if relative.parts[0] == COLMAP_FOLDER:
            colmap_parts.append(relative)
            continue
        view = None if entry.view is None else entry.view + view_offset
        added = outputs.add(
            entry.path,
            prefix + "_".join(relative.parts),
            entry.role,
            view=view,
            prediction=index,
            details=dict(entry.details),
        )
        renamed[relative.as_posix()] = added.path.name
    if colmap_parts:
        archive = work / f"colmap_{index:04d}.zip"
        _zip_folder(manifest.folder / COLMAP_FOLDER, archive)
        added = outputs.add(
            archive,
            f"{prefix}colmap.zip",
            "colmap_zip",
            prediction=index,
            details={"contents": "COLMAP sparse model (sparse/0, text and/or binary) + images/"},
        )
        for part in colmap_parts:
            renamed[part.as_posix()] = f"{added.path.name}!{part.relative_to(COLMAP_FOLDER)}"
    document = dict(manifest.document)
    document["files"] = [
        {
            **item,
            "path": renamed.get(item["path"], item["path"]),
            **({"notes": _renamed_notes(item["notes"], renamed)} if "notes" in item else {}),
        }
        for item in document["files"]
    ]
    document["notes"] = _renamed_notes(document.get("notes", []), renamed)
    return document


def _renamed_notes(notes: list[str], renamed: dict[str, str]) -> list[str]:
    """``notes`` with every exported path they name replaced by the name it is returned
    under (``colmap/images/image_0000_a.png`` -> ``view_0001_colmap.zip!images/...``)."""
    result = []
    for note in notes:
        for old, new in renamed.items():
            if note.startswith(f"{old}:"):
                note = new + note[len(old) :]
        result.append(note)
    return result


def depth_video(outputs: OutputFolder, fps: float) -> OutputFile:
    """The depth visualisations in view order as an MP4, one frame per view."""
    from da3cog.serve.video import encode_mp4

    pictures = sorted(
        (f for f in outputs.files if f.role == "depth_vis"), key=lambda f: f.view or 0
    )
    path = outputs.new_path(DEPTH_VIDEO_NAME)
    frames = (np.asarray(Image.open(f.path, formats=["PNG"]).convert("RGB")) for f in pictures)
    count = encode_mp4(frames, path, fps)
    return outputs.record(path, "depth_video", details={"frames": count, "fps": fps})


def write_manifest(
    outputs: OutputFolder,
    values: RequestValues,
    choice: ModelChoice,
    input_kind: str,
    views: Sequence[View],
    predictions: Sequence[Prediction],
    prediction_documents: Sequence[dict[str, Any]],
    notes: Sequence[str],
) -> Path:
    """``manifest.json``: every returned file by name with its role, the request, the model
    and each prediction's own export manifest."""
    first = predictions[0]
    all_notes = list(notes)
    downscaled = [view.name for view in views if view.downscaled]
    if downscaled:
        all_notes.append(
            f"view(s) {', '.join(downscaled)} were larger than a view may be and were read "
            "downscaled (input.details gives both sizes): outputs at output_resolution=input "
            "have the downscaled size, and given intrinsics were rescaled to it"
        )
    for document in prediction_documents:
        all_notes.extend(n for n in document.get("notes", ()) if n not in all_notes)
    document = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "generator": f"da3cog {__version__}",
        "mode": values.mode,
        "model": {
            "preset": choice.preset,
            "id": first.model_id,
            "revision": first.model_revision,
            "loaded_preset": first.model_preset,
            "license": choice.spec.license,
            "why": choice.reason,
        },
        "input": {
            "kind": input_kind,
            "views": len(views),
            "names": [view.name for view in views],
            "details": [view.document() for view in views],
        },
        "request": values.as_document(),
        "is_metric": all(p.is_metric for p in predictions),
        "files": [entry.document() for entry in outputs.files],
        "predictions": list(prediction_documents),
        "notes": all_notes,
    }
    path = outputs.folder / MANIFEST_NAME
    path.write_text(json.dumps(document, indent=2, allow_nan=False, default=str), "utf-8")
    return path
