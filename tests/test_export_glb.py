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
    for index, view in enumerate(prediction.views):
        frustum = scene.geometry[f"frustum_{index:04d}_{['left', 'mid_dle', 'right'][index]}"]
        apex = OPENCV_TO_GLTF @ invert_rigid_np(view.extrinsics.astype(float))[:3, 3]
        vertices = np.asarray(frustum.vertices)
        # Apex of the pyramid at the camera centre, in glTF axes.
        assert np.isclose(vertices, apex, atol=1e-5).all(axis=1).any()
    assert_unchanged(prediction, before)


def _attribute(path: Path, mesh_name: str, attribute: str) -> np.ndarray:
    """A vertex attribute of a mesh, decoded from the GLB's binary chunk as stored."""
    data = path.read_bytes()
    document = _gltf_json(path)
    json_length = struct.unpack_from("<I", data, 12)[0]
    binary = data[20 + json_length + 8 :]
    (mesh,) = [m for m in document["meshes"] if m["name"] == mesh_name]
    accessor = document["accessors"][mesh["primitives"][0]["attributes"][attribute]]
    view = document["bufferViews"][accessor["bufferView"]]
    dtype = {5126: np.float32, 5121: np.uint8, 5123: np.uint16}[accessor["componentType"]]
    width = {"VEC3": 3, "VEC4": 4}[accessor["type"]]
    values = np.frombuffer(binary, dtype, accessor["count"] * width, view["byteOffset"])
    values = values.reshape(-1, width)
    if accessor.get("normalized"):
        return values / np.iinfo(dtype).max
    return values


def test_glb_colours_are_linear_as_gltf_defines_them(prediction, tmp_path: Path) -> None:
    """glTF 2.0: COLOR_0 is linear RGB (viewers encode it to sRGB for display). Stored as the
    photo's sRGB bytes, a spec-following viewer shows the scene washed out; stored linear, a
    viewer's sRGB encoding gives the photo's bytes back."""
    (path,) = export_glb(prediction, tmp_path)
    cloud = fuse_points(prediction)
    colours = _attribute(path, "points", "COLOR_0")
    assert colours.shape == (len(cloud), 4) and (colours[:, 3] == 1).all()
    linear = colours[:, :3]
    displayed = np.where(
        linear <= 0.0031308, linear * 12.92, 1.055 * np.power(linear, 1 / 2.4) - 0.055
    )
    np.testing.assert_allclose(displayed * 255, cloud.rgb, atol=0.51)
    mid_grey = np.array([[128, 128, 128]], np.uint8)
    from da3cog.export.glb import srgb_to_linear

    assert srgb_to_linear(mid_grey)[0, 0] == pytest.approx(0.2158605, abs=1e-6)
    assert "linear RGB" in _manifest_details(path)["colours"]


def _manifest_details(path: Path) -> dict:
    from da3cog.export.manifest import export_all

    manifest = export_all(make_prediction(views=2), path.parent / "with_manifest", ["glb"])
    (entry,) = manifest.by_role("glb_scene")
    return entry.details


def test_off_centre_principal_points_are_noted(tmp_path: Path) -> None:
    """glTF cameras cannot carry a principal point: the manifest names the views whose camera
    node is shown through the image centre instead (here cy is 1.5 px above the centre)."""
    import dataclasses

    from da3cog.export.manifest import export_all

    shifted = make_prediction(views=2)
    (entry,) = export_all(shifted, tmp_path / "shifted", ["glb"]).by_role("glb_scene")
    (note,) = [n for n in entry.details["notes"] if "no principal point" in n]
    assert "view_0000, view_0001" in note

    def centred(view):
        intrinsics = np.array(view.intrinsics, copy=True)
        intrinsics[:2, 2] = view.width / 2, view.height / 2
        return dataclasses.replace(view, intrinsics=intrinsics)

    exact = dataclasses.replace(shifted, views=tuple(centred(v) for v in shifted.views))
    (entry,) = export_all(exact, tmp_path / "centred", ["glb"]).by_role("glb_scene")
    assert not any("no principal point" in n for n in entry.details.get("notes", []))


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
