"""COLMAP sparse model: read back by pycolmap (text and binary), same cameras as cameras.json,
points with tracks that reproject onto their 2D points, input-size scaling for predictions at
processing resolution and for cropped views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export_scene import assert_unchanged, make_prediction, require, snapshot

from da3cog.export.cameras import export_cameras_json
from da3cog.export.colmap import colmap_files, export_colmap
from da3cog.export.points import fuse_points


def _read(folder: Path, kind: str):
    pycolmap = require("pycolmap")
    reconstruction = pycolmap.Reconstruction()
    getattr(reconstruction, f"read_{kind}")(str(folder / "colmap" / "sparse" / "0"))
    return reconstruction


def _check_tracks(reconstruction, sample: int = 400) -> None:
    """Every sampled 3D point has one observation whose 2D point names it back and onto which
    it projects (pycolmap's own projection) within 0.5 px."""
    ids = sorted(reconstruction.point3D_ids())
    for point_id in ids[:: max(1, len(ids) // sample)]:
        point = reconstruction.points3D[point_id]
        (element,) = point.track.elements
        image = reconstruction.images[element.image_id]
        observed = image.points2D[element.point2D_idx]
        assert observed.point3D_id == point_id
        projected = image.project_point(point.xyz)
        assert np.abs(np.asarray(projected) - observed.xy).max() < 0.5


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, names=["n0", "n1", "n2"])


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_colmap_model_matches_cameras_json(prediction, kind, tmp_path: Path) -> None:
    before = snapshot(prediction)
    export_colmap(prediction, tmp_path)
    cameras = json.loads(export_cameras_json(prediction, tmp_path).read_text())["views"]
    reconstruction = _read(tmp_path, kind)
    assert reconstruction.num_cameras() == reconstruction.num_images() == 3
    assert reconstruction.num_points3D() == len(fuse_points(prediction))
    for index, camera_json in enumerate(cameras):
        image = reconstruction.images[index + 1]
        camera = reconstruction.cameras[image.camera_id]
        assert image.name == f"image_{index:04d}_n{index}.png"
        assert camera.model.name == "PINHOLE"
        assert (camera.width, camera.height) == (camera_json["width"], camera_json["height"])
        np.testing.assert_allclose(camera.calibration_matrix(), camera_json["K"], rtol=1e-7)
        pose = image.cam_from_world().matrix()
        np.testing.assert_allclose(pose, np.array(camera_json["world_to_camera"])[:3], atol=1e-6)
        # Every fused point of this view is one of its 2D points.
        assert image.num_points2D() == int((fuse_points(prediction).view == index).sum())
        written = np.asarray(Image.open(tmp_path / "colmap" / "images" / image.name))
        np.testing.assert_array_equal(written, prediction.views[index].image)
    _check_tracks(reconstruction)
    assert_unchanged(prediction, before)


def test_text_and_binary_agree(prediction, tmp_path: Path) -> None:
    export_colmap(prediction, tmp_path, max_points=700, seed=3)
    text, binary = _read(tmp_path, "text"), _read(tmp_path, "binary")
    assert text.num_points3D() == binary.num_points3D() == 700
    for point_id in text.point3D_ids():
        a, b = text.points3D[point_id], binary.points3D[point_id]
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-7)
        np.testing.assert_array_equal(a.color, b.color)
    for image_id in text.reg_image_ids():
        xy_text = np.array([p.xy for p in text.images[image_id].points2D])
        xy_binary = np.array([p.xy for p in binary.images[image_id].points2D])
        np.testing.assert_allclose(xy_text, xy_binary, atol=1e-6)


def test_processing_resolution_is_scaled_to_input_size(tmp_path: Path) -> None:
    """Views at processing size 36x40; inputs 72x96 of which view 1 covers x 8..88 (a crop)."""
    prediction = make_prediction(
        views=2,
        size=(36, 40),
        output_resolution="processing",
        input_sizes=[(72, 80), (72, 96)],
        crop_boxes=[(0.0, 0.0, 80.0, 72.0), (8.0, 0.0, 88.0, 72.0)],
    )
    before = snapshot(prediction)
    entries = colmap_files(prediction, tmp_path)
    notes = {note for entry in entries for note in entry.details.get("notes", [])}
    assert any("processing resolution" in note for note in notes)
    assert any("upsampled from 40x36" in note for note in notes)
    # Each image note names that image's file, as the manifest lists it.
    for entry in entries:
        for note in entry.details.get("notes", []):
            if "upsampled" in note:
                relative = entry.path.relative_to(tmp_path).as_posix()
                assert note.startswith(f"{relative}: "), (note, relative)
    reconstruction = _read(tmp_path, "binary")
    for index, view in enumerate(prediction.views):
        camera = reconstruction.cameras[index + 1]
        assert (camera.height, camera.width) == view.input_size
        x0 = view.crop_box[0]
        K = view.intrinsics.astype(np.float64)
        expected = [[2 * K[0, 0], 0, 2 * K[0, 2] + x0], [0, 2 * K[1, 1], 2 * K[1, 2]], [0, 0, 1]]
        np.testing.assert_allclose(camera.calibration_matrix(), expected, rtol=1e-6)
        image = Image.open(tmp_path / "colmap" / "images" / reconstruction.images[index + 1].name)
        assert image.size == (view.input_size[1], view.input_size[0])
    _check_tracks(reconstruction)
    # 2D points are the source pixel centres mapped onto the input image.
    cloud = fuse_points(prediction)
    image = reconstruction.images[2]
    xy = np.array([p.xy for p in image.points2D])
    expected = (cloud.pixel[cloud.view == 1] + 0.5) * 2.0 + np.array([8.0, 0.0])
    np.testing.assert_allclose(xy, expected, atol=1e-5)
    assert_unchanged(prediction, before)


def test_cropped_input_resolution_view_is_offset(tmp_path: Path) -> None:
    prediction = make_prediction(
        views=1, size=(36, 48), input_sizes=[(40, 56)], crop_boxes=[(4.2, 2.0, 52.2, 38.0)]
    )
    entries = colmap_files(prediction, tmp_path, colmap_formats=["text"])
    assert {entry.path.suffix for entry in entries} == {".txt", ".png"}
    reconstruction = _read(tmp_path, "text")
    camera = reconstruction.cameras[1]
    K = prediction.views[0].intrinsics.astype(np.float64)
    assert (camera.width, camera.height) == (56, 40)
    np.testing.assert_allclose(camera.params, [K[0, 0], K[1, 1], K[0, 2] + 4, K[1, 2] + 2])
    canvas = np.asarray(Image.open(tmp_path / "colmap" / "images" / "image_0000_view_0000.png"))
    np.testing.assert_array_equal(canvas[2:38, 4:52], prediction.views[0].image)
    assert not canvas[:2].any() and not canvas[:, :4].any()
    _check_tracks(reconstruction)


def test_single_view_and_bad_formats(tmp_path: Path) -> None:
    single = make_prediction(views=1)
    export_colmap(single, tmp_path, colmap_images=False, colmap_formats=("binary",))
    assert sorted(p.name for p in (tmp_path / "colmap" / "sparse" / "0").iterdir()) == [
        "cameras.bin",
        "images.bin",
        "points3D.bin",
    ]
    assert not (tmp_path / "colmap" / "images").exists()
    assert _read(tmp_path, "binary").num_images() == 1
    with pytest.raises(ValueError, match="colmap_formats"):
        export_colmap(single, tmp_path / "bad", colmap_formats=("json",))
    assert not (tmp_path / "bad").exists()


def test_failure_removes_the_whole_model(prediction, tmp_path: Path, monkeypatch) -> None:
    """The second image fails: no model file, no image and no colmap/ folder remain."""
    calls = {"count": 0}
    original = Image.Image.save

    def flaky(self, fp, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise OSError("disk full")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky)
    with pytest.raises(OSError, match="disk full"):
        export_colmap(prediction, tmp_path)
    assert list(tmp_path.iterdir()) == []
