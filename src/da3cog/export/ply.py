"""The fused point cloud as a binary little-endian PLY (numpy only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from da3cog.export.files import ManifestEntry, all_or_nothing, json_number, returning_paths
from da3cog.export.points import (
    DEFAULT_CONFIDENCE_PERCENTILE,
    DEFAULT_MAX_POINTS,
    DEFAULT_SEED,
    PointCloud,
    fuse_points,
)
from da3cog.pipeline import Prediction

PLY_NAME = "point_cloud.ply"


def ply_header(
    count: int, properties: Sequence[tuple[str, str]], comments: Sequence[str] = ()
) -> bytes:
    """The ASCII header of a binary little-endian PLY with ``count`` vertices whose
    ``properties`` are ``(PLY type, name)`` pairs in file order; each comment on one line."""
    lines = [
        "ply",
        "format binary_little_endian 1.0",
        *(f"comment {' '.join(line.split())}" for line in comments),
        f"element vertex {count}",
        *(f"property {kind} {name}" for kind, name in properties),
        "end_header",
    ]
    # The header is ASCII: a comment's other characters (a checkpoint folder's name is the
    # model id) are escaped, not an error.
    return ("\n".join(lines) + "\n").encode("ascii", errors="backslashreplace")


def ply_bytes(
    points: PointCloud, *, confidence: bool = True, comments: tuple[str, ...] = ()
) -> bytes:
    """A binary little-endian PLY with vertex ``x y z`` (float), ``nx ny nz`` (float, when the
    cloud has normals), ``red green blue`` (uchar) and ``confidence`` (float, when asked for and
    the model predicts confidence)."""
    fields: list[tuple[str, str, np.ndarray]] = [
        ("x", "<f4", points.xyz[:, 0]),
        ("y", "<f4", points.xyz[:, 1]),
        ("z", "<f4", points.xyz[:, 2]),
    ]
    if points.normals is not None:
        fields += [
            (name, "<f4", points.normals[:, axis]) for axis, name in enumerate(("nx", "ny", "nz"))
        ]
    fields += [
        (name, "u1", points.rgb[:, axis]) for axis, name in enumerate(("red", "green", "blue"))
    ]
    if confidence and points.confidence is not None:
        fields.append(("confidence", "<f4", points.confidence))
    record = np.empty(len(points), dtype=[(name, kind) for name, kind, _ in fields])
    for name, _, values in fields:
        record[name] = values
    ply_type = {"<f4": "float", "u1": "uchar"}
    properties = [(ply_type[kind], name) for name, kind, _ in fields]
    return ply_header(len(points), properties, comments) + record.tobytes()


def point_cloud_files(
    prediction: Prediction,
    folder: Path,
    *,
    confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE,
    max_points: int | None = DEFAULT_MAX_POINTS,
    seed: int = DEFAULT_SEED,
    normals: bool = False,
    ply_confidence: bool = True,
    drop_sky: bool = True,
    points: PointCloud | None = None,
) -> list[ManifestEntry]:
    """Write ``point_cloud.ply``: all views fused in the world frame (see
    :func:`da3cog.export.points.fuse_points`; ``points`` reuses a cloud already fused)."""
    if points is None:
        points = fuse_points(
            prediction,
            confidence_percentile=confidence_percentile,
            max_points=max_points,
            seed=seed,
            normals=normals,
            drop_sky=drop_sky,
        )
    elif normals and points.normals is None:
        raise ValueError("normals=True needs a point cloud fused with normals=True")
    if not normals and points.normals is not None:
        points = dataclasses.replace(points, normals=None)
    unit = "metres" if prediction.is_metric else "relative units"
    comments = (
        f"da3cog {prediction.model_id} ({prediction.model_preset}), {len(prediction)} view(s)",
        "frame: world of cameras.json, OpenCV axes (x right, y down, z forward), " + unit,
        "viewing: a Y-up viewer shows this upside down; rotate 180 degrees about x "
        "(y -> -y, z -> -z) to see it upright",
        f"confidence threshold {points.confidence_threshold!r}",
    )
    payload = ply_bytes(points, confidence=ply_confidence, comments=comments)
    with all_or_nothing() as batch:
        batch.write(
            folder / PLY_NAME,
            lambda target: target.write_bytes(payload),
            "point_cloud",
            points=len(points),
            confidence_threshold=json_number(points.confidence_threshold),
            normals=points.normals is not None,
            frame="world, OpenCV axes",
            viewing="y down: rotate 180 degrees about x (y -> -y, z -> -z) in a Y-up viewer",
        )
    return batch.entries


export_ply = returning_paths(point_cloud_files, "export_ply")
