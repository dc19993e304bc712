"""``export_all``: several formats into one new folder, with ``manifest.json`` written last."""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from da3cog import __version__
from da3cog.export.cameras import (
    cameras_json_files,
    chunk_record,
    prediction_flags,
    transforms_json_files,
)
from da3cog.export.colmap import colmap_files
from da3cog.export.depth import (
    confidence_png_files,
    depth_npy_files,
    depth_png16_files,
    depth_vis_files,
)
from da3cog.export.files import ManifestEntry, _current_umask, write_text_atomically
from da3cog.export.gaussians import gaussians_ply_files, gaussians_problem
from da3cog.export.glb import glb_files
from da3cog.export.npz import npz_files, npz_upstream_files, upstream_layout_problem
from da3cog.export.ply import PLY_NAME, point_cloud_files
from da3cog.export.points import camera_problem, fuse_points
from da3cog.export.video import gaussians_video_files
from da3cog.pipeline import Prediction

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_FILE = "manifest.schema.json"
MANIFEST_FORMAT_VERSION = 1

_Writer = Callable[..., list[ManifestEntry]]
_EXPORTERS: dict[str, _Writer] = {
    "depth_npy": depth_npy_files,
    "depth_png16": depth_png16_files,
    "depth_vis": depth_vis_files,
    "confidence_png": confidence_png_files,
    "ply": point_cloud_files,
    "glb": glb_files,
    "cameras_json": cameras_json_files,
    "transforms_json": transforms_json_files,
    "colmap": colmap_files,
    "colmap_text": colmap_files,
    "colmap_binary": colmap_files,
    "npz": npz_files,
    "npz_upstream": npz_upstream_files,
    "gaussians_ply": gaussians_ply_files,
    "gaussians_video": gaussians_video_files,
}
# Format name -> the COLMAP model formats it asks for.
_COLMAP_FORMATS = {
    "colmap": ("text", "binary"),
    "colmap_text": ("text",),
    "colmap_binary": ("binary",),
}
FORMATS: tuple[str, ...] = tuple(_EXPORTERS)
_FUSION_OPTIONS = ("confidence_percentile", "max_points", "seed", "drop_sky")
# Formats that need every view in one world frame (see points.camera_problem).
CAMERA_FORMATS = ("ply", "glb", "transforms_json", "colmap", "colmap_text", "colmap_binary")
_POINT_FORMATS = ("ply", "glb", "colmap")
# Left out of "all", asked for by name only: parts of colmap; a second copy of npz's arrays
# for upstream's scripts; slow without gsplat on CUDA (minutes on a CPU).
_NOT_IN_ALL = ("colmap_text", "colmap_binary", "npz_upstream", "gaussians_video")
# Set by export_all itself, never by a caller.
_INTERNAL_OPTIONS = ("points", "colmap_formats", "ply_file_path")


@dataclass(frozen=True)
class Manifest:
    """What :func:`export_all` wrote.

    Attributes:
        folder: the output folder.
        path: ``folder / "manifest.json"``.
        entries: every file but the manifest, with absolute paths in ``folder``.
        document: the manifest as written (JSON-ready; paths relative to ``folder``).
    """

    folder: Path
    path: Path
    entries: tuple[ManifestEntry, ...]
    document: dict[str, Any]

    @property
    def paths(self) -> list[Path]:
        """Every file written, the manifest last."""
        return [entry.path for entry in self.entries] + [self.path]

    def by_role(self, role: str) -> list[ManifestEntry]:
        return [entry for entry in self.entries if entry.role == role]


@functools.cache
def manifest_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of ``manifest.json``, shipped beside this module."""
    return json.loads(Path(__file__).with_name(MANIFEST_SCHEMA_FILE).read_text(encoding="utf-8"))


def _exporter_options(exporter: _Writer) -> set[str]:
    parameters = inspect.signature(exporter).parameters.values()
    return {
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _INTERNAL_OPTIONS
    }


def inapplicable(prediction: Prediction, name: str) -> str | None:
    """Why format ``name`` cannot be made from ``prediction``, or None."""
    if name in CAMERA_FORMATS:
        return camera_problem(prediction)
    if name == "confidence_png" and all(v.confidence is None for v in prediction.views):
        return "the model predicts no confidence"
    if name in ("gaussians_ply", "gaussians_video"):
        return gaussians_problem(prediction)
    if name == "npz_upstream":
        return upstream_layout_problem(prediction)
    return None


def _check_formats(
    prediction: Prediction, formats: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """The formats to write, and the ones ``all`` skipped with the reason."""
    if isinstance(formats, str):
        formats = [formats]
    requested = list(dict.fromkeys(formats))
    unknown = [name for name in requested if name not in _EXPORTERS and name != "all"]
    if unknown or not requested:
        problem = f"unknown export format(s) {unknown}" if unknown else "no export format given"
        raise ValueError(f"{problem}: valid formats are {', '.join(FORMATS)} (or 'all')")
    skipped: dict[str, str] = {}
    if "all" in requested:
        everything = [name for name in FORMATS if name not in _NOT_IN_ALL]
        explicit = [name for name in requested if name != "all"]
        requested = list(dict.fromkeys(everything + explicit))
        for name in everything:
            reason = inapplicable(prediction, name)
            if reason is not None and name not in explicit:
                requested.remove(name)
                skipped[name] = reason
    for name in requested:
        reason = inapplicable(prediction, name)
        if reason is not None:
            raise ValueError(f"format {name} cannot be exported: {reason}")
    return requested, skipped


def options_taken(formats: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    """The part of ``options`` that one of ``formats`` (names, or ``"all"``) takes: options
    shared by scenes that choose their own formats (``da3cog batch``)."""
    names = list(FORMATS) if "all" in formats else [name for name in formats if name in FORMATS]
    accepted = set().union(*(_exporter_options(_EXPORTERS[name]) for name in names))
    return {key: value for key, value in options.items() if key in accepted}


def _check_options(formats: list[str], options: dict[str, Any]) -> None:
    accepted = set().union(*(_exporter_options(_EXPORTERS[name]) for name in formats))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"option(s) {', '.join(unknown)} not used by format(s) {', '.join(formats)}; "
            f"their options are: {', '.join(sorted(accepted)) or 'none'}"
        )


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, paths and other objects in the options: as plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def output_target(folder: Path, named: str = "output folder") -> Path:
    """Where :func:`export_all` writes ``folder`` (given as ``named``): the folder itself, or
    where it points when it is a link (renaming onto the link itself fails); ValueError when
    it exists and is not empty, or is the working directory (the results are written beside
    it and renamed onto it: the working directory would be replaced)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{named} {folder} exists and is not empty: choose a new one")
    if folder.resolve() == Path.cwd().resolve():
        raise ValueError(f"{named} {folder} is the working directory: choose a new one")
    return folder.resolve() if folder.is_symlink() else folder


def _entry_document(entry: ManifestEntry, root: Path) -> dict[str, Any]:
    document: dict[str, Any] = {
        "path": entry.path.relative_to(root).as_posix(),
        "role": entry.role,
        "view": entry.view,
        "bytes": entry.path.stat().st_size,
    }
    document.update(entry.details)
    return document


def manifest_document(
    prediction: Prediction,
    entries: Sequence[ManifestEntry],
    root: Path,
    formats: Sequence[str],
    options: dict[str, Any],
) -> dict[str, Any]:
    """The ``manifest.json`` document for files written under ``root``."""
    notes = list(prediction.notes)
    for entry in entries:
        for note in entry.details.get("notes", ()):
            if note not in notes:
                notes.append(note)
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "generator": f"da3cog {__version__}",
        "model": {
            "id": prediction.model_id,
            "revision": prediction.model_revision,
            "preset": prediction.model_preset,
            "precision": prediction.precision,
        },
        "is_metric": prediction.is_metric,
        "units": "metres" if prediction.is_metric else "relative (shared by all views)",
        "output_resolution": prediction.output_resolution,
        "processing_size": {
            "height": prediction.processing_size[0],
            "width": prediction.processing_size[1],
        },
        "pose_conditioned": prediction.pose_conditioned,
        **prediction_flags(prediction),
        "views": [
            {
                "index": index,
                "name": view.name,
                "width": view.width,
                "height": view.height,
                "input_size": {"height": view.input_size[0], "width": view.input_size[1]},
                "crop_box": [round(float(value), 3) for value in view.crop_box],
                "pixel_aspect": round(float(view.pixel_aspect), 6),
                **chunk_record(view),
            }
            for index, view in enumerate(prediction.views)
        ],
        "formats": list(formats),
        "options": options,
        "notes": notes,
        "files": [_entry_document(entry, root) for entry in entries],
    }


def _write_formats(
    prediction: Prediction, folder: Path, formats: list[str], options: dict[str, Any]
) -> list[ManifestEntry]:
    # One format after the other: run side by side they held several formats' images at once
    # (a request's peak 0.37 -> 1.01 of its memory estimate), for 6% less time on two cores.
    entries: list[ManifestEntry] = []
    points = None
    if any(name in _POINT_FORMATS or name in _COLMAP_FORMATS for name in formats):
        # One fusion shared by every point format (their own fusion options are not passed).
        points = fuse_points(
            prediction,
            normals=bool(options.get("normals", False)) and "ply" in formats,
            **{key: options[key] for key in _FUSION_OPTIONS if key in options},
        )
    colmap_formats = sorted({f for name in formats for f in _COLMAP_FORMATS.get(name, ())})
    colmap_done = False
    for name in formats:
        exporter = _EXPORTERS[name]
        accepted = _exporter_options(exporter)
        kwargs = {key: value for key, value in options.items() if key in accepted}
        if "points" in inspect.signature(exporter).parameters:
            kwargs = {key: value for key, value in kwargs.items() if key not in _FUSION_OPTIONS}
            kwargs["points"] = points
        if name in _COLMAP_FORMATS:
            if colmap_done:
                continue
            kwargs["colmap_formats"] = colmap_formats
            colmap_done = True
        if name == "transforms_json" and "ply" in formats:
            kwargs["ply_file_path"] = PLY_NAME
        entries.extend(exporter(prediction, folder, **kwargs))
    return entries


def export_all(
    prediction: Prediction,
    folder: str | os.PathLike[str],
    formats: Sequence[str],
    **options: Any,
) -> Manifest:
    """Write ``formats`` of ``prediction`` into the new (or empty) ``folder`` and return the
    :class:`Manifest`; ``manifest.json`` is written last.

    Formats: ``depth_npy``, ``depth_png16``, ``depth_vis``, ``confidence_png``, ``ply``,
    ``glb``, ``cameras_json``, ``transforms_json``, ``colmap`` (text and binary),
    ``colmap_text``, ``colmap_binary``, ``npz``, ``gaussians_ply`` (3DGS PLY),
    ``gaussians_video`` (fly-through MP4 of the Gaussians: gsplat on CUDA, else a pure-torch
    renderer, slow on a CPU; never part of ``all``), or ``all``
    (every other format the prediction allows: without shared cameras the point cloud, GLB,
    transforms and COLMAP formats are skipped, without Gaussians the 3DGS PLY, and the
    manifest's notes say why; asking for one of them by name is then a ValueError). Options
    are the keyword options of the formats' exporters (``confidence_percentile``,
    ``max_points``, ``seed``, ``drop_sky``, ``normals``, ``ply_confidence``, ``frustums``,
    ``frustum_size``, ``gltf_cameras``, ``colormap``, ``side_by_side``, ``vis_format``,
    ``colmap_images``, ``compress``, ``gaussian_border_fraction``,
    ``gaussian_keep_nearest``, ``video_frames``); an option no chosen format uses is an
    error. The point cloud is fused once and shared by ``ply``, ``glb`` and ``colmap``.

    Everything is written into a hidden sibling folder that is renamed to ``folder`` at the end,
    so on any failure ``folder`` is left as it was (absent or empty).
    """
    folder = Path(folder)
    requested, skipped = _check_formats(prediction, formats)
    _check_options([*requested, *skipped], options)  # options of skipped formats are fine
    target = output_target(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        staging.chmod(0o777 & ~_current_umask())  # mkdtemp's folder is owner-only
        entries = _write_formats(prediction, staging, requested, options)
        document = manifest_document(prediction, entries, staging, requested, options)
        document["notes"].extend(f"format {k} skipped: {v}" for k, v in skipped.items())
        write_text_atomically(
            staging / MANIFEST_NAME,
            json.dumps(document, indent=2, allow_nan=False, default=_json_default),
        )
        output_target(folder)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = tuple(
        ManifestEntry(
            folder / entry.path.relative_to(staging), entry.role, entry.view, entry.details
        )
        for entry in entries
    )
    return Manifest(folder=folder, path=folder / MANIFEST_NAME, entries=final, document=document)
