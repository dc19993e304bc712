"""GLB scene: re-read with trimesh, validated by the Khronos glTF validator (npm gltf-validator,
installed by scripts/test.sh into .cache/npm), glTF axes, frustums and cameras."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_export_scene import assert_unchanged, make_prediction, require, snapshot

from da3cog.export.glb import OPENCV_TO_GLTF, export_glb, glb_bytes
from da3cog.export.points import fuse_points
from da3cog.geometry import invert_rigid_np

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR = Path(
    os.environ.get("GLTF_VALIDATOR", ROOT / ".cache" / "npm" / "node_modules" / "gltf-validator")
)
VALIDATE_JS = """
const fs = require("fs");
const validator = require(process.argv[2]);
validator
  .validateBytes(new Uint8Array(fs.readFileSync(process.argv[3])), { maxIssues: 200 })
  .then((report) => console.log(JSON.stringify(report)))
  .catch((error) => { console.error(String(error)); process.exit(2); });
"""


def _gltf_json(path: Path) -> dict:
    """The JSON chunk of a GLB (the structure trimesh hides)."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    chunk_length, chunk_type = struct.unpack_from("<II", data, 12)
    assert chunk_type == 0x4E4F534A
    return json.loads(data[20 : 20 + chunk_length])


def validate(path: Path, tmp_path: Path) -> dict:
    """The Khronos validator's report on ``path``."""
    node = shutil.which("node")
    required = os.environ.get("DA3COG_REQUIRE_EXPORT_TOOLS") == "1"
    if node is None or not (VALIDATOR / "package.json").exists():
        message = "node and npm gltf-validator (scripts/test.sh installs it into .cache/npm)"
        if required:
            pytest.fail(f"missing {message}")
        pytest.skip(f"needs {message}")
    script = tmp_path / "validate.js"
    script.write_text(VALIDATE_JS)
    result = subprocess.run(
        [node, str(script), str(VALIDATOR), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, names=["left", "mid dle", "right"], holes=True)


def test_glb_read_by_trimesh(prediction, tmp_path: Path) -> None:
    trimesh = require("trimesh")
    before = snapshot(prediction)
    (path,) = export_glb(prediction, tmp_path)
    assert path.name == "scene.glb"
    scene = trimesh.load(path)
    assert set(scene.geometry) == {
        "points",
        "frustum_0000_left",
        "frustum_0001_mid_dle",
        "frustum_0002_right",
    }
    cloud = fuse_points(prediction)
    points = scene.geometry["points"]
    assert isinstance(points, trimesh.PointCloud) and len(points.vertices) == len(cloud)
    # glTF axes: x, -y, -z of the world (OpenCV) frame; colours are the source pixels'.
    expected = cloud.xyz * np.array([1.0, -1.0, -1.0])
    np.testing.assert_allclose(points.vertices, expected, atol=1e-6)
    np.testing.assert_array_equal(points.colors[:, :3], cloud.rgb)
    assert (points.colors[:, 3] == 255).all()
    for index, view in enumerate(prediction.views):
        frustum = scene.geometry[f"frustum_{index:04d}_{['left', 'mid_dle', 'right'][index]}"]
        apex = OPENCV_TO_GLTF @ invert_rigid_np(view.extrinsics.astype(float))[:3, 3]
        vertices = np.asarray(frustum.vertices)
        # Apex of the pyramid at the camera centre, in glTF axes.
        assert np.isclose(vertices, apex, atol=1e-5).all(axis=1).any()
    assert_unchanged(prediction, before)


def test_glb_cameras_and_structure(prediction, tmp_path: Path) -> None:
    (path,) = export_glb(prediction, tmp_path)
    assert glb_bytes(prediction, fuse_points(prediction)) == path.read_bytes()
    document = _gltf_json(path)
    assert document["asset"]["version"] == "2.0"
    cameras = [node for node in document["nodes"] if "camera" in node]
    assert [node["name"] for node in cameras] == [
        "camera_0000_left",
        "camera_0001_mid_dle",
        "camera_0002_right",
    ]
    for node, view in zip(cameras, prediction.views, strict=True):
        camera_to_world = invert_rigid_np(view.extrinsics.astype(float))
        np.testing.assert_allclose(
            node["translation"], OPENCV_TO_GLTF @ camera_to_world[:3, 3], atol=1e-6
        )
        x, y, z, w = node["rotation"]
        rotation = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )
        # The glTF camera looks down its -Z: that is the OpenCV optical axis (+z) in glTF axes.
        forward = OPENCV_TO_GLTF @ camera_to_world[:3, :3] @ np.array([0.0, 0.0, 1.0])
        np.testing.assert_allclose(rotation @ np.array([0.0, 0.0, -1.0]), forward, atol=1e-6)
        perspective = document["cameras"][node["camera"]]["perspective"]
        fy = float(view.intrinsics[1, 1])
        assert perspective["yfov"] == pytest.approx(2 * np.arctan(view.height / (2 * fy)))
    primitives = [mesh["primitives"][0]["mode"] for mesh in document["meshes"]]
    assert primitives == [0, 1, 1, 1]  # POINTS, then LINES per frustum


def test_glb_passes_khronos_validator(prediction, tmp_path: Path) -> None:
    (path,) = export_glb(prediction, tmp_path)
    report = validate(path, tmp_path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]


@pytest.mark.parametrize(
    "options",
    [{}, {"frustums": False, "gltf_cameras": False}, {"confidence_percentile": 100.0}],
    ids=["default", "points-only", "few-points"],
)
def test_single_view_glb_is_valid(options, tmp_path: Path) -> None:
    single = make_prediction(views=1, size=(20, 30))
    (path,) = export_glb(single, tmp_path, **options)
    report = validate(path, tmp_path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    document = _gltf_json(path)
    assert ("cameras" in document) == options.get("gltf_cameras", True)


def test_glb_without_points_is_valid(tmp_path: Path) -> None:
    import dataclasses

    single = make_prediction(views=1, size=(20, 30))
    blank = dataclasses.replace(
        single,
        views=(dataclasses.replace(single.views[0], depth=np.zeros((20, 30), np.float32)),),
    )
    (path,) = export_glb(blank, tmp_path)
    document = _gltf_json(path)
    assert [mesh["name"] for mesh in document["meshes"]] == ["frustum_0000_view_0000"]
    report = validate(path, tmp_path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
