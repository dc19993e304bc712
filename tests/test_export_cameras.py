"""cameras.json (validated against its shipped JSON schema with jsonschema) and the
nerfstudio-style transforms.json with its images."""

from __future__ import annotations

import copy
import json
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
