"""Predictions of models without some outputs (single-view mono / metric: no poses, maybe no
intrinsics, no confidence; models with a sky mask): every exporter either handles them or
refuses with a clear ValueError before writing anything."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_export_glb import validate
from test_export_scene import assert_unchanged, make_prediction, require, snapshot

from da3cog.export import export_all
from da3cog.export.cameras import cameras_schema, export_cameras_json
from da3cog.export.depth import colorize_depth, export_confidence_png
from da3cog.export.npz import export_npz, load_npz
from da3cog.export.ply import export_ply
from da3cog.export.points import fuse_points
from da3cog.pipeline import Prediction


def _strip(
    prediction: Prediction,
    *,
    drop_poses: bool = True,
    drop_intrinsics: bool = False,
    drop_confidence: bool = False,
    **flags,
) -> Prediction:
    """The prediction as a model without poses / intrinsics / confidence would give it."""
    views = tuple(
        dataclasses.replace(
            view,
            extrinsics=None if drop_poses else view.extrinsics,
            intrinsics=None if drop_intrinsics else view.intrinsics,
            confidence=None if drop_confidence else view.confidence,
        )
        for view in prediction.views
    )
    return dataclasses.replace(prediction, views=views, **flags)


def _with_sky(prediction: Prediction) -> Prediction:
    """The top third of every view is sky, its depth a far placeholder."""
    views = []
    for view in prediction.views:
        sky = np.zeros(view.depth.shape, bool)
        sky[: view.height // 3] = True
        depth = np.where(sky, np.float32(1000.0), view.depth).astype(np.float32)
        depth.flags.writeable = False
        sky.flags.writeable = False
        views.append(dataclasses.replace(view, depth=depth, sky=sky))
    return dataclasses.replace(prediction, views=tuple(views))


def test_single_view_without_pose_or_confidence(tmp_path: Path) -> None:
    jsonschema = require("jsonschema")
    mono = _strip(
        make_prediction(views=1),
        drop_confidence=True,
        cameras_estimated=False,
        intrinsics_source="exif",
    )
    before = snapshot(mono)
    manifest = export_all(mono, tmp_path / "out", ["all"])
    roles = {entry.role for entry in manifest.entries}
    assert {"point_cloud", "glb_scene", "colmap_binary", "transforms_json"} <= roles
    assert "confidence_png" not in roles and "confidence_npy" not in roles
    assert any("confidence_png skipped" in note for note in manifest.document["notes"])
    # Its camera frame is the world frame; no confidence filter, so every pixel is a point.
    cloud = fuse_points(mono)
    assert cloud.confidence is None and len(cloud) == mono.views[0].depth.size
    plyfile = require("plyfile")
    vertex = plyfile.PlyData.read(str(tmp_path / "out" / "point_cloud.ply"))["vertex"].data
    assert "confidence" not in vertex.dtype.names and len(vertex) == len(cloud)
    cameras = json.loads((tmp_path / "out" / "cameras.json").read_text())
    jsonschema.Draft202012Validator(cameras_schema()).validate(cameras)
    assert cameras["views"][0]["world_to_camera"] is None
    assert cameras["cameras_estimated"] is False and cameras["intrinsics_source"] == "exif"
    pycolmap = require("pycolmap")
    model = pycolmap.Reconstruction()
    model.read_binary(str(tmp_path / "out" / "colmap" / "sparse" / "0"))
    np.testing.assert_allclose(model.images[1].cam_from_world().matrix(), np.eye(4)[:3])
    assert validate(tmp_path / "out" / "scene.glb", tmp_path)["issues"]["numErrors"] == 0
    loaded = load_npz(tmp_path / "out" / "prediction.npz")
    assert loaded.views[0].extrinsics is None and loaded.views[0].confidence is None
    assert loaded.cameras_estimated is False and loaded.intrinsics_source == "exif"
    assert_unchanged(mono, before)


def test_views_without_poses_are_not_fused(tmp_path: Path) -> None:
    unposed = _strip(make_prediction(views=2), cameras_estimated=False)
    manifest = export_all(unposed, tmp_path / "all", ["all"])
    roles = {entry.role for entry in manifest.entries}
    assert not roles & {"point_cloud", "glb_scene", "transforms_json", "colmap_binary"}
    assert {"depth_png16", "cameras_json", "npz", "confidence_png"} <= roles
    skipped = [note for note in manifest.document["notes"] if "skipped" in note]
    assert len(skipped) == 5 and sum("no camera poses" in note for note in skipped) == 4
    assert any(note.startswith("format gaussians_ply skipped") for note in skipped)
    with pytest.raises(ValueError, match="format glb cannot be exported: the views have no"):
        export_all(unposed, tmp_path / "glb", ["depth_png16", "glb"])
    with pytest.raises(ValueError, match="a point cloud needs cameras"):
        export_ply(unposed, tmp_path / "ply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all"]


def test_views_without_intrinsics(tmp_path: Path) -> None:
    bare = _strip(make_prediction(views=1), drop_intrinsics=True, intrinsics_source=None)
    path = export_cameras_json(bare, tmp_path)
    assert json.loads(path.read_text())["views"][0]["K"] is None
    with pytest.raises(ValueError, match="has no intrinsics"):
        fuse_points(bare)
    manifest = export_all(bare, tmp_path / "out", ["all"])
    assert not manifest.by_role("point_cloud")
    assert_unchanged(load_npz(tmp_path / "out" / "prediction.npz"), bare)
    with pytest.raises(ValueError, match="no confidence"):
        export_confidence_png(_strip(bare, drop_confidence=True), tmp_path / "c")


def test_sky_is_left_out_of_points_and_ranges(tmp_path: Path) -> None:
    prediction = _with_sky(make_prediction(views=2))
    cloud = fuse_points(prediction, confidence_percentile=0.0, max_points=None)
    assert (cloud.pixel[:, 1] >= prediction.views[0].height // 3).all()
    with_sky = fuse_points(prediction, confidence_percentile=0.0, max_points=None, drop_sky=False)
    assert len(with_sky) == sum(v.depth.size for v in prediction.views)
    # The visualisation's range comes from the ground, not the far placeholder.
    view = prediction.views[0]
    ranged = colorize_depth(view.depth, sky=view.sky)
    plain = colorize_depth(np.where(view.sky, np.nan, view.depth).astype(np.float32))
    np.testing.assert_array_equal(ranged[~view.sky], plain[~view.sky])
    (path,) = export_npz(prediction, tmp_path)
    loaded = load_npz(path)
    np.testing.assert_array_equal(loaded.views[1].sky, prediction.views[1].sky)
    assert_unchanged(loaded, prediction)
    manifest = export_all(prediction, tmp_path / "out", ["depth_png16", "ply"], drop_sky=False)
    total = sum(v.depth.size for v in prediction.views)
    assert manifest.by_role("point_cloud")[0].details["points"] == pytest.approx(0.6 * total, abs=2)
    assert "sky" in manifest.by_role("depth_png16")[0].details


def test_all_accepts_options_of_skipped_formats(tmp_path: Path) -> None:
    unposed = _strip(make_prediction(views=2), cameras_estimated=False)
    manifest = export_all(unposed, tmp_path / "out", ["all"], frustums=False, max_points=10)
    assert not manifest.by_role("glb_scene")
    with pytest.raises(ValueError, match="frustums not used"):
        export_all(unposed, tmp_path / "npz", ["npz"], frustums=False)
