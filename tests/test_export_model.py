"""End to end: a real pipeline Prediction (tests/conftest.py's random-weight da3-small) through
export_all, at input and at processing resolution, with a cropping resize method; every model
and scene file re-read by its independent reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_export_glb import validate
from test_export_scene import assert_unchanged, require, snapshot

from da3cog.export import export_all
from da3cog.export.npz import load_npz
from da3cog.pipeline import InferenceOptions


@pytest.mark.parametrize("resolution", ["input", "processing"])
def test_pipeline_prediction_exports(small_model, photo, resolution, tmp_path: Path) -> None:
    pycolmap = require("pycolmap")
    trimesh = require("trimesh")
    images = [photo("astronaut")[::4, ::4], photo("camera")[::4, ::3]]
    options = InferenceOptions(
        process_res=112, resize_method="upper_bound_crop", output_resolution=resolution
    )
    prediction = small_model.predict(images, options=options)
    before = snapshot(prediction)
    manifest = export_all(prediction, tmp_path / "out", ["all"], max_points=5000)
    assert_unchanged(prediction, before)

    reconstruction = pycolmap.Reconstruction()
    reconstruction.read_binary(str(tmp_path / "out" / "colmap" / "sparse" / "0"))
    assert reconstruction.num_images() == 2
    for index, view in enumerate(prediction.views):
        camera = reconstruction.cameras[index + 1]
        # The camera describes the part of the input the view covers, at input pixels.
        x0, y0, x1, y1 = view.crop_box
        assert (camera.height, camera.width) == (round(y1 - y0), round(x1 - x0))
    for point_id in list(reconstruction.point3D_ids())[::50]:
        point = reconstruction.points3D[point_id]
        assert point.track.length() >= 2
        for element in point.track.elements:
            image = reconstruction.images[element.image_id]
            observed = image.points2D[element.point2D_idx].xy
            assert np.abs(np.asarray(image.project_point(point.xyz)) - observed).max() < 0.5

    scene = trimesh.load(tmp_path / "out" / "scene.glb")
    assert (
        len(scene.geometry["points"].vertices) == manifest.by_role("glb_scene")[0].details["points"]
    )
    report = validate(tmp_path / "out" / "scene.glb", tmp_path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert_unchanged(load_npz(tmp_path / "out" / "prediction.npz"), prediction)
