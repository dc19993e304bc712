"""Point cloud PLY: re-read with plyfile (and trimesh), points reproject into their source pixels
through cameras.json, confidence filtering, the point cap and normals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_export_scene import assert_unchanged, make_prediction, require, snapshot

from da3cog.export.cameras import export_cameras_json
from da3cog.export.ply import export_ply
from da3cog.export.points import confidence_threshold, fuse_points


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, holes=True)


def _read(path: Path) -> np.ndarray:
    plyfile = require("plyfile")
    data = plyfile.PlyData.read(str(path))
    assert data.header.splitlines()[1] == "format binary_little_endian 1.0"
    return data["vertex"].data


def test_ply_fields_and_reprojection(prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    (path,) = export_ply(prediction, tmp_path)
    camera_path = export_cameras_json(prediction, tmp_path)
    assert path.name == "point_cloud.ply"
    vertex = _read(path)
    assert vertex.dtype.names == ("x", "y", "z", "red", "green", "blue", "confidence")
    assert [vertex.dtype[name].str for name in vertex.dtype.names] == [
        "<f4", "<f4", "<f4", "|u1", "|u1", "|u1", "<f4"
    ]  # fmt: skip
    # The source view and pixel of every point: the same fusion, same order.
    cloud = fuse_points(prediction)
    assert len(vertex) == len(cloud) > 0
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1).astype(np.float64)
    np.testing.assert_array_equal(
        np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1), cloud.rgb
    )

    cameras = json.loads(camera_path.read_text())["views"]
    for index, view in enumerate(prediction.views):
        chosen = cloud.view == index
        K = np.array(cameras[index]["K"])
        world_to_camera = np.array(cameras[index]["world_to_camera"])
        camera = xyz[chosen] @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
        projected = camera @ K.T
        uv = projected[:, :2] / projected[:, 2:]
        centres = cloud.pixel[chosen] + 0.5
        assert np.abs(uv - centres).max() < 0.5  # lands in its own source pixel
        assert np.abs(uv - centres).max() < 1e-3  # ... at its centre, to float32 rounding
        col, row = cloud.pixel[chosen].T
        np.testing.assert_allclose(camera[:, 2], view.depth[row, col], rtol=1e-5)
        np.testing.assert_array_equal(
            np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1)[chosen],
            view.image[row, col],
        )
    assert_unchanged(prediction, before)


def test_confidence_filter_drops_lowest_40_percent(prediction) -> None:
    threshold = confidence_threshold(prediction, 40.0)
    valid = [np.isfinite(v.depth) & (v.depth > 0) for v in prediction.views]
    total = sum(int(mask.sum()) for mask in valid)
    cloud = fuse_points(prediction, max_points=None)
    assert len(cloud) == pytest.approx(0.6 * total, abs=2)
    assert (cloud.confidence >= threshold).all()
    everything = fuse_points(prediction, confidence_percentile=0.0, max_points=None)
    assert len(everything) == total  # only the holes (depth 0 / NaN) go
    with pytest.raises(ValueError, match="confidence_percentile"):
        fuse_points(prediction, confidence_percentile=140.0)


def test_point_cap_is_a_seeded_subsample(prediction, tmp_path: Path) -> None:
    full = fuse_points(prediction, max_points=None)
    capped = fuse_points(prediction, max_points=500, seed=7)
    again = fuse_points(prediction, max_points=500, seed=7)
    other = fuse_points(prediction, max_points=500, seed=8)
    assert len(capped) == 500
    np.testing.assert_array_equal(capped.xyz, again.xyz)
    assert not np.array_equal(capped.xyz, other.xyz)
    # A subset of the full cloud, in its order.
    full_keys = {(int(v), int(c), int(r)) for v, (c, r) in zip(full.view, full.pixel, strict=True)}
    keys = [(int(v), int(c), int(r)) for v, (c, r) in zip(capped.view, capped.pixel, strict=True)]
    assert set(keys) <= full_keys and keys == sorted(keys, key=lambda k: (k[0], k[2], k[1]))
    # Exactly the uncapped cloud's points drawn by the seed (only those are back-projected).
    drawn = np.sort(np.random.default_rng(7).choice(len(full), 500, replace=False))
    for field in ("xyz", "rgb", "confidence", "view", "pixel"):
        np.testing.assert_array_equal(getattr(capped, field), getattr(full, field)[drawn])
    (path,) = export_ply(prediction, tmp_path, max_points=500, seed=7)
    assert len(_read(path)) == 500
    with pytest.raises(ValueError, match="max_points"):
        fuse_points(prediction, max_points=0)


def test_normals_face_their_camera(prediction, tmp_path: Path) -> None:
    (path,) = export_ply(prediction, tmp_path, normals=True, ply_confidence=False)
    vertex = _read(path)
    assert vertex.dtype.names == ("x", "y", "z", "nx", "ny", "nz", "red", "green", "blue")
    normals = np.stack([vertex["nx"], vertex["ny"], vertex["nz"]], -1)
    lengths = np.linalg.norm(normals, axis=-1)
    determined = lengths > 0
    assert determined.mean() > 0.9
    np.testing.assert_allclose(lengths[determined], 1.0, atol=1e-5)
    # First view is the world frame: its camera centre is the origin.
    cloud = fuse_points(prediction, normals=True)
    first = (cloud.view == 0) & determined
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1)[first]
    assert ((normals[first] * -xyz).sum(-1) > 0).all()
    # Flat walls: most normals are axis-aligned (the room and the cube are boxes).
    assert (np.abs(normals[determined]).max(-1) > 0.99).mean() > 0.8


def test_trimesh_reads_the_ply(prediction, tmp_path: Path) -> None:
    trimesh = require("trimesh")
    (path,) = export_ply(prediction, tmp_path, max_points=1000)
    cloud = trimesh.load(path)
    assert len(cloud.vertices) == 1000
    np.testing.assert_allclose(cloud.vertices, fuse_points(prediction, max_points=1000).xyz)


def test_single_view_and_empty_cloud(tmp_path: Path) -> None:
    single = make_prediction(views=1)
    (path,) = export_ply(single, tmp_path / "one")
    assert len(_read(path)) == pytest.approx(0.6 * single.views[0].depth.size, abs=2)
    blank = dataclasses.replace(
        single,
        views=(dataclasses.replace(single.views[0], depth=np.zeros((36, 48), np.float32)),),
    )
    (path,) = export_ply(blank, tmp_path / "none")
    assert len(_read(path)) == 0


def test_header_says_how_to_view_it_upright(prediction, tmp_path: Path) -> None:
    plyfile = require("plyfile")
    (path,) = export_ply(prediction, tmp_path)
    comments = " ".join(plyfile.PlyData.read(path).comments)
    assert "OpenCV axes (x right, y down, z forward)" in comments
    assert "rotate 180 degrees about x (y -> -y, z -> -z)" in comments
