"""COLMAP sparse model: read back by pycolmap (text and binary), same cameras as cameras.json,
multi-view tracks that reproject onto their 2D points and respect occlusion, bundle adjustment
by pycolmap on them, input-pixel cameras for predictions at processing resolution and for
cropped views."""

from __future__ import annotations

import dataclasses
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
    """Every sampled 3D point is seen by two or more images; each observation's 2D point names
    it back and the point projects onto it (pycolmap's own projection) within 0.5 px."""
    ids = sorted(reconstruction.point3D_ids())
    assert ids, "no points"
    for point_id in ids[:: max(1, len(ids) // sample)]:
        point = reconstruction.points3D[point_id]
        assert point.track.length() >= 2
        for element in point.track.elements:
            image = reconstruction.images[element.image_id]
            observed = image.points2D[element.point2D_idx]
            assert observed.point3D_id == point_id
            projected = image.project_point(point.xyz)
            assert np.abs(np.asarray(projected) - observed.xy).max() < 0.5


def _tracks(prediction, **options):
    from da3cog.export.colmap import build_tracks, colmap_camera

    cameras = [colmap_camera(prediction, i) for i in range(len(prediction))]
    return build_tracks(prediction, fuse_points(prediction), cameras, **options)


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, names=["n0", "n1", "n2"])


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_colmap_model_matches_cameras_json(prediction, kind, tmp_path: Path) -> None:
    before = snapshot(prediction)
    export_colmap(prediction, tmp_path)
    cameras = json.loads(export_cameras_json(prediction, tmp_path).read_text())["views"]
    reconstruction = _read(tmp_path, kind)
    tracks = _tracks(prediction)
    assert reconstruction.num_cameras() == reconstruction.num_images() == 3
    assert reconstruction.num_points3D() == len(tracks.points) > 0
    for index, camera_json in enumerate(cameras):
        image = reconstruction.images[index + 1]
        camera = reconstruction.cameras[image.camera_id]
        assert image.name == f"image_{index:04d}_n{index}.png"
        assert camera.model.name == "PINHOLE"
        assert (camera.width, camera.height) == (camera_json["width"], camera_json["height"])
        np.testing.assert_allclose(camera.calibration_matrix(), camera_json["K"], rtol=1e-7)
        pose = image.cam_from_world().matrix()
        np.testing.assert_allclose(pose, np.array(camera_json["world_to_camera"])[:3], atol=1e-6)
        # Every observation in this view is one of its 2D points.
        assert image.num_points2D() == int((tracks.view == index).sum())
        written = np.asarray(Image.open(tmp_path / "colmap" / "images" / image.name))
        np.testing.assert_array_equal(written, prediction.views[index].image)
    _check_tracks(reconstruction)
    assert_unchanged(prediction, before)


def test_text_and_binary_agree(prediction, tmp_path: Path) -> None:
    export_colmap(prediction, tmp_path, max_points=700, seed=3)
    text, binary = _read(tmp_path, "text"), _read(tmp_path, "binary")
    assert 0 < text.num_points3D() == binary.num_points3D() <= 700
    for point_id in text.point3D_ids():
        a, b = text.points3D[point_id], binary.points3D[point_id]
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-7)
        np.testing.assert_array_equal(a.color, b.color)
        assert [(e.image_id, e.point2D_idx) for e in a.track.elements] == [
            (e.image_id, e.point2D_idx) for e in b.track.elements
        ]
    for image_id in text.reg_image_ids():
        xy_text = np.array([p.xy for p in text.images[image_id].points2D])
        xy_binary = np.array([p.xy for p in binary.images[image_id].points2D])
        np.testing.assert_allclose(xy_text, xy_binary, atol=1e-6)


def test_processing_resolution_is_scaled_to_input_size(tmp_path: Path) -> None:
    """Views at processing size 36x40; inputs 72x80 and 72x96, of which view 1 covers x 8..88
    (a crop): each camera describes the covered part at input pixels (72x80 both)."""
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
    assert any("upsampled from 40x36 to 80x72" in note for note in notes)
    # Each image note names that image's file, as the manifest lists it.
    for entry in entries:
        for note in entry.details.get("notes", []):
            if "upsampled" in note:
                relative = entry.path.relative_to(tmp_path).as_posix()
                assert note.startswith(f"{relative}: "), (note, relative)
    reconstruction = _read(tmp_path, "binary")
    for index, view in enumerate(prediction.views):
        camera = reconstruction.cameras[index + 1]
        assert (camera.height, camera.width) == (72, 80)
        K = view.intrinsics.astype(np.float64)
        expected = [[2 * K[0, 0], 0, 2 * K[0, 2]], [0, 2 * K[1, 1], 2 * K[1, 2]], [0, 0, 1]]
        np.testing.assert_allclose(camera.calibration_matrix(), expected, rtol=1e-6)
        image = Image.open(tmp_path / "colmap" / "images" / reconstruction.images[index + 1].name)
        assert image.size == (80, 72)
    _check_tracks(reconstruction)
    # A point's source observation is its pixel centre, scaled onto the camera's image.
    tracks = _tracks(prediction)
    cloud = fuse_points(prediction)
    first = np.concatenate([[0], np.cumsum(tracks.lengths)[:-1]])
    np.testing.assert_allclose(
        tracks.xy[first], (cloud.pixel[tracks.points] + 0.5) * 2.0, atol=1e-9
    )
    assert_unchanged(prediction, before)


def test_cropped_input_resolution_view_is_its_own_image(tmp_path: Path) -> None:
    """The COLMAP image of a cropped view is the crop the camera describes (no black bands)."""
    prediction = make_prediction(
        views=2,
        size=(36, 48),
        input_sizes=[(40, 56), (40, 56)],
        crop_boxes=[(4.2, 2.0, 52.2, 38.0)] * 2,
    )
    entries = colmap_files(prediction, tmp_path, colmap_formats=["text"])
    assert {entry.path.suffix for entry in entries} == {".txt", ".png"}
    reconstruction = _read(tmp_path, "text")
    camera = reconstruction.cameras[1]
    K = prediction.views[0].intrinsics.astype(np.float64)
    assert (camera.width, camera.height) == (48, 36)
    np.testing.assert_allclose(camera.params, [K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
    written = np.asarray(Image.open(tmp_path / "colmap" / "images" / "image_0000_view_0000.png"))
    np.testing.assert_array_equal(written, prediction.views[0].image)
    _check_tracks(reconstruction)


def test_tracks_span_views_and_respect_occlusion() -> None:
    """In the synthetic room (exact depth), most points are seen by several views; a point is
    never observed where the view's depth says something nearer hides it."""
    prediction = make_prediction(views=3)
    tracks = _tracks(prediction)
    assert tracks.lengths.min() >= 2 and tracks.lengths.mean() > 2.0
    # Move view 1's surface 20% nearer: its depth now hides every point, so none is observed
    # there except the ones it is the source of.
    import dataclasses

    nearer = dataclasses.replace(
        prediction.views[1], depth=np.asarray(prediction.views[1].depth) * 0.8
    )
    occluded = dataclasses.replace(
        prediction, views=(prediction.views[0], nearer, prediction.views[2])
    )
    tracks = _tracks(occluded)
    cloud = fuse_points(occluded)
    seen_in_1 = tracks.points[tracks.point[tracks.view == 1]]
    assert (cloud.view[seen_in_1] == 1).all()


def test_tracks_are_bounded_and_taken_from_the_nearest_views_first() -> None:
    """Twelve views that all see the room: a point is looked for in the views nearest its
    source first and observed in at most max_track_length of them, so the observations
    grow with the points, not points x views; each still starts at its source view and
    reprojects as before (the uncapped tracks restricted to the same views)."""
    prediction = make_prediction(views=12)
    everywhere = _tracks(prediction, max_track_length=12)
    capped = _tracks(prediction, max_track_length=4)
    assert everywhere.lengths.max() > 4 and capped.lengths.max() == 4
    assert len(capped.point) <= 4 * len(capped.points) < len(everywhere.point)
    cloud = fuse_points(prediction)
    source_of = cloud.view[capped.points][capped.point]
    first = np.concatenate([[0], np.cumsum(capped.lengths)[:-1]])
    assert (capped.view[first] == source_of[first]).all()
    near = np.abs(capped.view - source_of).mean()
    far = np.abs(everywhere.view - cloud.view[everywhere.points][everywhere.point]).mean()
    assert near < far
    # Every capped observation is one of the uncapped ones, at the same place.
    full = {
        (int(everywhere.points[p]), int(v)): tuple(xy)
        for p, v, xy in zip(everywhere.point, everywhere.view, everywhere.xy, strict=True)
    }
    for p, v, xy in zip(capped.point, capped.view, capped.xy, strict=True):
        assert full[(int(capped.points[p]), int(v))] == tuple(xy)
    with pytest.raises(ValueError, match="max_track_length must be at least"):
        _tracks(prediction, max_track_length=1)


def test_tracks_take_time_in_proportion_to_the_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring of 120 cameras: points near an image's edge never fill their track, and were
    looked for in every other view (views x views projections: 28,560 here, 33 s for 400
    views). A point is now given up after MAX_TRACK_MISSES views that do not see it."""
    from test_export_scene import _rotation_y, make_view

    from da3cog.export import colmap

    count = 120
    views = []
    for index in range(count):
        rotation = _rotation_y(360.0 * index / count)  # camera-to-world
        extrinsics = np.eye(4)
        extrinsics[:3, :3] = rotation.T
        extrinsics[:3, 3] = -rotation.T @ np.array([0.0, -0.5, 2.0])
        views.append(make_view(index, 12, 16, extrinsics=extrinsics))
    prediction = dataclasses.replace(make_prediction(views=1), views=tuple(views))
    calls = []
    project = colmap.project_points

    def counted(*args: object) -> object:
        calls.append(1)
        return project(*args)

    monkeypatch.setattr(colmap, "project_points", counted)
    tracks = _tracks(prediction)
    assert len(calls) <= count * (colmap.MAX_TRACK_LENGTH + colmap.MAX_TRACK_MISSES)
    assert np.median(tracks.lengths) >= 2


def test_a_colmap_models_memory_is_what_the_estimate_counts_a_tracked_point(
    tmp_path: Path,
) -> None:
    """The served model's estimate counts each point of a COLMAP model at
    TRACKED_POINT_BYTES (its track included) beside the outputs' per-pixel cost: an export
    of 30 views that all see the room (tracks as long as they may be) stays within it, and
    would not within the plain point cost."""
    import tracemalloc

    from da3cog import memory

    prediction = make_prediction(views=30, size=(60, 80))
    points = 40_000
    tracemalloc.start()
    try:
        export_colmap(prediction, tmp_path, max_points=points, colmap_images=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pixels = sum(view.depth.size for view in prediction.views)
    outputs = memory.OUTPUT_BYTES_PER_PIXEL * pixels
    assert outputs + memory.POINT_BYTES * points < peak, peak
    assert peak <= outputs + memory.TRACKED_POINT_BYTES * points, peak


def test_bundle_adjustment_runs_and_pulls_a_perturbed_camera_back(tmp_path: Path) -> None:
    """pycolmap's bundle adjustment on the exported model of an exact scene (it refuses
    one-view tracks): with camera 2 moved off its pose, the adjusted pose returns towards the
    truth (compared after a similarity alignment of all camera centres: BA's gauge is free)."""
    from da3cog.geometry import umeyama

    pycolmap = require("pycolmap")
    truth = make_prediction(views=4)
    export_colmap(truth, tmp_path, colmap_formats=("binary",), max_points=4000)
    reconstruction = _read(tmp_path, "binary")
    assert reconstruction.compute_mean_track_length() > 2
    image = reconstruction.images[3]
    pose = image.cam_from_world()
    frame = reconstruction.frames[image.frame_id]
    frame.rig_from_world = pycolmap.Rigid3d(
        pose.rotation, pose.translation + np.array([0.08, -0.05, 0.06])
    )
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = False
    options.refine_principal_point = False
    options.refine_extra_params = False

    true_centres = np.stack(
        [-v.extrinsics[:3, :3].T.astype(float) @ v.extrinsics[:3, 3] for v in truth.views]
    )

    def error_of_camera_2() -> float:
        found = np.stack(
            [reconstruction.images[i + 1].projection_center() for i in range(len(truth.views))]
        )
        fit = umeyama(found, true_centres)
        aligned = fit.scale * found @ fit.rotation.T + fit.translation
        return float(np.linalg.norm(aligned[2] - true_centres[2]))

    before = error_of_camera_2()
    pycolmap.bundle_adjustment(reconstruction, options)
    after = error_of_camera_2()
    assert before > 0.02 and after < 0.2 * before, (before, after)


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
