"""cameras.json (validated against its shipped JSON schema with jsonschema) and the
nerfstudio-style transforms.json with its images."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export_scene import assert_unchanged, make_prediction, require, snapshot

from da3cog.export.cameras import (
    cameras_document,
    cameras_schema,
    export_cameras_json,
    export_transforms_json,
)


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, names=["one", "two", "three"])


def test_cameras_json_matches_its_schema(prediction, tmp_path: Path) -> None:
    jsonschema = require("jsonschema")
    before = snapshot(prediction)
    path = export_cameras_json(prediction, tmp_path)
    document = json.loads(path.read_text())
    schema = cameras_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)
    for entry, view in zip(document["views"], prediction.views, strict=True):
        np.testing.assert_array_equal(np.array(entry["K"], np.float32), view.intrinsics)
        np.testing.assert_array_equal(
            np.array(entry["world_to_camera"], np.float32), view.extrinsics
        )
        product = np.array(entry["camera_to_world"]) @ np.array(entry["world_to_camera"])
        np.testing.assert_allclose(product, np.eye(4), atol=1e-6)
    assert_unchanged(prediction, before)


def test_cameras_json_says_which_chunk_made_each_view(prediction, tmp_path: Path) -> None:
    """A chunked prediction's cameras.json names each view's chunk and its alignment residual
    (null for the first chunk), and still matches the schema; a single pass has neither key."""
    jsonschema = require("jsonschema")
    records = [(0, None), (0, None), (1, 0.0125)]
    chunked = dataclasses.replace(
        prediction,
        views=tuple(
            dataclasses.replace(view, chunk=chunk, alignment_residual=residual)
            for view, (chunk, residual) in zip(prediction.views, records, strict=True)
        ),
    )
    document = json.loads(export_cameras_json(chunked, tmp_path).read_text())
    jsonschema.Draft202012Validator(cameras_schema()).validate(document)
    assert [(v["chunk"], v["alignment_residual"]) for v in document["views"]] == records
    single = cameras_document(prediction)["views"]
    assert not any("chunk" in view or "alignment_residual" in view for view in single)
    document["views"][2]["alignment_residual"] = -0.1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, cameras_schema(), cls=jsonschema.Draft202012Validator)
    # A residual that is not a number is null (NaN was written as a bare NaN, not JSON).
    last = dataclasses.replace(chunked.views[2], alignment_residual=math.nan)
    unknown = dataclasses.replace(chunked, views=(*chunked.views[:2], last))
    text = export_cameras_json(unknown, tmp_path / "nan").read_text()
    document = json.loads(text, parse_constant=pytest.fail)
    assert document["views"][2]["alignment_residual"] is None


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["views"][0].pop("K"),
        lambda d: d["views"][1]["K"].pop(),
        lambda d: d["views"][0]["world_to_camera"][3].__setitem__(0, 0.5),
        lambda d: d["views"][0]["K"][0].__setitem__(0, -1.0),
        lambda d: d.__setitem__("output_resolution", "full"),
        lambda d: d["views"][2].__setitem__("width", 0),
        lambda d: d.__setitem__("extra", 1),
    ],
    ids=["no-K", "K-2-rows", "bottom-row", "negative-fx", "resolution", "width", "extra-key"],
)
def test_schema_rejects_broken_documents(prediction, break_it) -> None:
    jsonschema = require("jsonschema")
    document = copy.deepcopy(cameras_document(prediction))
    break_it(document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, cameras_schema(), cls=jsonschema.Draft202012Validator)


def test_formats_without_skew_say_they_dropped_it(prediction, tmp_path: Path) -> None:
    """A user's intrinsics with a skew: transforms.json (nerfstudio's cameras have none) says
    it was dropped, naming the view, as the COLMAP export does; predicted intrinsics have no
    skew and no note."""
    from da3cog.export.cameras import transforms_json_files

    skewed = []
    for view in prediction.views:
        intrinsics = np.array(view.intrinsics)
        intrinsics[0, 1] = 8.0 if view.name == "two" else 0.0
        skewed.append(dataclasses.replace(view, intrinsics=intrinsics))
    entries = transforms_json_files(
        dataclasses.replace(prediction, views=tuple(skewed)), tmp_path / "skewed"
    )
    (notes,) = [e.details["notes"] for e in entries if e.role == "transforms_json"]
    assert len(notes) == 1 and "skew is dropped for two:" in notes[0], notes
    plain = transforms_json_files(prediction, tmp_path / "plain")
    assert not any("notes" in e.details for e in plain)


def test_transforms_json_says_when_nerfstudio_cannot_scale_the_poses(
    prediction, tmp_path: Path
) -> None:
    """One view, or cameras at one centre (a tripod): nerfstudio's parser divides by the
    largest translation, then 0, and failed with no word from the export."""
    from da3cog.export.cameras import transforms_json_files

    def notes(found) -> list[str]:
        (entry,) = [e for e in found if e.role == "transforms_json"]
        return entry.details.get("notes", [])

    tripod = []
    for view in prediction.views:
        extrinsics = np.array(view.extrinsics)
        extrinsics[:3, 3] = -extrinsics[:3, :3] @ np.array([1.0, 2.0, 3.0])  # centre (1, 2, 3)
        tripod.append(dataclasses.replace(view, extrinsics=extrinsics))
    for case, name in (
        (dataclasses.replace(prediction, views=prediction.views[:1]), "lone"),
        (dataclasses.replace(prediction, views=tuple(tripod)), "tripod"),
    ):
        (note,) = notes(transforms_json_files(case, tmp_path / name))
        assert "auto-scale-poses False" in note
    assert notes(transforms_json_files(prediction, tmp_path / "moving")) == []


def test_transforms_json(prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    paths = export_transforms_json(prediction, tmp_path)
    assert [p.name for p in paths] == [
        "image_0000_one.png",
        "image_0001_two.png",
        "image_0002_three.png",
        "transforms.json",
    ]
    document = json.loads((tmp_path / "transforms.json").read_text())
    cameras = cameras_document(prediction)["views"]
    assert document["camera_model"] == "OPENCV"
    for frame, camera, view in zip(document["frames"], cameras, prediction.views, strict=True):
        image = np.asarray(Image.open(tmp_path / frame["file_path"]))
        np.testing.assert_array_equal(image, view.image)
        assert (frame["w"], frame["h"]) == (view.width, view.height)
        K = np.array(camera["K"])
        assert (frame["fl_x"], frame["fl_y"], frame["cx"], frame["cy"]) == pytest.approx(
            (K[0, 0], K[1, 1], K[0, 2], K[1, 2])
        )
        # OpenGL camera axes: the same centre; camera +y is world "up" of OpenCV's -y, and the
        # camera looks down its -z, the OpenCV optical axis.
        opengl = np.array(frame["transform_matrix"])
        opencv = np.array(camera["camera_to_world"])
        np.testing.assert_allclose(opengl[:3, 3], opencv[:3, 3], atol=1e-6)
        np.testing.assert_allclose(opengl[:3, 0], opencv[:3, 0], atol=1e-6)
        np.testing.assert_allclose(opengl[:3, 1], -opencv[:3, 1], atol=1e-6)
        np.testing.assert_allclose(-opengl[:3, 2], opencv[:3, 2], atol=1e-6)
        assert np.linalg.det(opengl[:3, :3]) == pytest.approx(1.0, abs=1e-5)
    assert_unchanged(prediction, before)


def test_transforms_json_projects_like_nerfstudio(prediction, tmp_path: Path) -> None:
    """A point on a pixel's ray, seen through nerfstudio's convention (OpenGL camera, pixel
    centres at +0.5), lands back on that pixel."""
    export_transforms_json(prediction, tmp_path)
    frame = json.loads((tmp_path / "transforms.json").read_text())["frames"][1]
    view = prediction.views[1]
    row, col = 10, 17
    depth = float(view.depth[row, col])
    c2w = np.array(frame["transform_matrix"])
    # nerfstudio: direction = [(u - cx) / fx, -(v - cy) / fy, -1] in the camera, u = col + 0.5.
    direction = np.array(
        [
            (col + 0.5 - frame["cx"]) / frame["fl_x"],
            -(row + 0.5 - frame["cy"]) / frame["fl_y"],
            -1.0,
        ]
    )
    point = c2w[:3, :3] @ (direction * depth) + c2w[:3, 3]
    camera = view.extrinsics.astype(float)[:3, :3] @ point + view.extrinsics.astype(float)[:3, 3]
    assert camera[2] == pytest.approx(depth, rel=1e-5)
    uv = (view.intrinsics.astype(float) @ camera)[:2] / camera[2]
    np.testing.assert_allclose(uv, [col + 0.5, row + 0.5], atol=1e-3)


# nerfstudio 1.1's nerfstudio_dataparser and splatfacto's initial points, as documented and
# coded there: a file without "applied_transform" but with colmap/sparse/0 beside it is taken as
# COLMAP-derived and its points get this axis swap.
NERFSTUDIO_COLMAP_GUESS = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]], dtype=float)


def nerfstudio_initial_points(folder: Path) -> np.ndarray:
    """The points splatfacto starts from, in the frame of the frames' transform_matrix, by
    nerfstudio's rules: ``ply_file_path`` read as is; else the COLMAP points3D converted with
    ``applied_transform`` (or the COLMAP guess when the file has none)."""
    plyfile = require("plyfile")
    meta = json.loads((folder / "transforms.json").read_text())
    if "ply_file_path" in meta:
        vertices = plyfile.PlyData.read(folder / meta["ply_file_path"])["vertex"]
        return np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1).astype(float)
    pycolmap = require("pycolmap")
    reconstruction = pycolmap.Reconstruction(str(folder / "colmap" / "sparse" / "0"))
    points = np.array([p.xyz for p in reconstruction.points3D.values()])
    applied = np.array(meta.get("applied_transform", NERFSTUDIO_COLMAP_GUESS), dtype=float)
    return points @ applied[:3, :3].T + applied[:3, 3]


@pytest.mark.parametrize("with_ply", [True, False])
def test_nerfstudio_starts_from_points_in_front_of_the_cameras(
    prediction, tmp_path: Path, with_ply: bool
) -> None:
    """transforms.json beside a COLMAP model (and the PLY): the points nerfstudio would start
    splatfacto from lie in front of the cameras and on their pixels' rays (within 2% of the
    depth), with or without ``ply_file_path``; ``applied_transform`` is the identity."""
    from da3cog.export.manifest import export_all

    formats = ["transforms_json", "colmap", *(["ply"] if with_ply else [])]
    export_all(prediction, tmp_path, formats)
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert meta["applied_transform"] == np.eye(4)[:3].tolist()
    assert ("ply_file_path" in meta) == with_ply
    points = nerfstudio_initial_points(tmp_path)
    frame = meta["frames"][0]
    c2w = np.array(frame["transform_matrix"])
    in_camera = (points - c2w[:3, 3]) @ c2w[:3, :3]  # OpenGL camera: in front means z < 0
    assert (in_camera[:, 2] < 0).mean() > 0.5
    # Every depth pixel of view 0, through nerfstudio's ray model, has a point nearby.
    from scipy.spatial import cKDTree

    view = prediction.views[0]
    rows, cols = np.nonzero(np.isfinite(view.depth) & (view.depth > 0))
    pick = slice(None, None, 7)
    rows, cols = rows[pick], cols[pick]
    depth = view.depth[rows, cols].astype(float)
    directions = np.stack(
        [
            (cols + 0.5 - frame["cx"]) / frame["fl_x"],
            -(rows + 0.5 - frame["cy"]) / frame["fl_y"],
            -np.ones_like(depth),
        ],
        axis=1,
    )
    on_rays = (directions * depth[:, None]) @ c2w[:3, :3].T + c2w[:3, 3]
    distance, _ = cKDTree(points).query(on_rays)
    assert np.median(distance / depth) < 0.02


def test_without_applied_transform_nerfstudio_would_swap_the_axes(
    prediction, tmp_path: Path
) -> None:
    """The check above can fail: the same files minus ``applied_transform`` (as written before)
    put the COLMAP points where nerfstudio's guess sends them, off the rays."""
    from da3cog.export.manifest import export_all

    export_all(prediction, tmp_path, ["transforms_json", "colmap"])
    meta = json.loads((tmp_path / "transforms.json").read_text())
    del meta["applied_transform"]
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    swapped = nerfstudio_initial_points(tmp_path)
    export_all(prediction, tmp_path / "right", ["transforms_json", "colmap"])
    right = nerfstudio_initial_points(tmp_path / "right")
    assert swapped.shape == right.shape
    assert np.abs(swapped - right).max() > 0.1 * np.abs(right).max()
