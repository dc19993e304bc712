"""export_all: format and option validation, fresh folders, the manifest (validated against its
schema, written last), a shared point cloud, and all-or-nothing output."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export_scene import assert_unchanged, make_prediction, require, snapshot

import da3cog.export.files as files
from da3cog.export import FORMATS, export_all
from da3cog.export.manifest import manifest_schema

ROLES = {
    "depth_npy",
    "confidence_npy",
    "depth_png16",
    "depth_vis",
    "confidence_png",
    "point_cloud",
    "glb_scene",
    "cameras_json",
    "image",
    "transforms_json",
    "colmap_text",
    "colmap_binary",
    "colmap_image",
    "npz",
}


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, names=["a", "b", "c"], holes=True)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_all_formats_and_manifest(prediction, tmp_path: Path) -> None:
    jsonschema = require("jsonschema")
    before = snapshot(prediction)
    folder = tmp_path / "out"
    manifest = export_all(prediction, folder, ["all"])
    document = json.loads((folder / "manifest.json").read_text())
    jsonschema.Draft202012Validator(manifest_schema()).validate(document)
    assert document == manifest.document
    listed = {entry["path"] for entry in document["files"]}
    assert listed | {"manifest.json"} == _files(folder)  # every file listed, nothing else there
    assert len(listed) == len(document["files"])  # unique names
    assert {entry["role"] for entry in document["files"]} == ROLES
    assert manifest.paths[-1] == folder / "manifest.json"
    assert all(path.is_file() for path in manifest.paths)
    for entry in manifest.by_role("depth_png16"):
        with Image.open(entry.path) as image:
            assert float(image.text["depth_scale"]) == entry.details["scale"]
        (row,) = [f for f in document["files"] if f["path"] == entry.path.name]
        assert row["scale"] == entry.details["scale"] and row["view"] == entry.view
    assert [e.path.name for e in manifest.by_role("depth_png16")] == [
        "depth_0000_a.png",
        "depth_0001_b.png",
        "depth_0002_c.png",
    ]
    # One fused cloud shared by the PLY, the GLB and the COLMAP model (which keeps the points
    # seen by two or more views).
    counts = {e["role"]: e["points"] for e in document["files"] if "points" in e}
    assert counts["point_cloud"] == counts["glb_scene"] >= counts["colmap_binary"] > 0
    # Everything but the 3DGS PLY: the synthetic prediction has no Gaussians.
    # The synthetic cameras' principal points are off-centre, which glTF cameras cannot show.
    # The COLMAP model leaves out the points one view alone sees.
    notes = document["notes"]
    assert notes[0] == "synthetic scene" and len(notes) == 4
    assert notes[1].startswith("glTF cameras have no principal point: the camera nodes of a, b")
    assert "fewer than 2 views and are left out of the COLMAP model" in notes[2]
    assert notes[3].startswith("format gaussians_ply skipped: the prediction has no")
    assert_unchanged(prediction, before)


def test_manifest_is_written_last(prediction, tmp_path: Path, monkeypatch) -> None:
    order = []
    original = files.write_atomically

    def recording(path, write):
        order.append(path.name)
        return original(path, write)

    monkeypatch.setattr(files, "write_atomically", recording)
    export_all(prediction, tmp_path / "out", ["glb", "cameras_json", "depth_png16"])
    assert order[-1] == "manifest.json" and len(order) == 6


def test_options_reach_their_exporters(prediction, tmp_path: Path) -> None:
    manifest = export_all(
        prediction,
        tmp_path / "out",
        ["ply", "glb", "colmap_binary", "depth_vis"],
        max_points=321,
        seed=5,
        normals=True,
        colormap="viridis",
        side_by_side=False,
        frustums=False,
        colmap_images=False,
    )
    plyfile = require("plyfile")
    vertex = plyfile.PlyData.read(str(tmp_path / "out" / "point_cloud.ply"))["vertex"].data
    assert len(vertex) == 321 and "nx" in vertex.dtype.names
    counts = {e.role: e.details["points"] for e in manifest.entries if "points" in e.details}
    assert counts["point_cloud"] == counts["glb_scene"] == 321 >= counts["colmap_binary"] > 0
    assert not manifest.by_role("colmap_text") and not manifest.by_role("colmap_image")
    assert len(manifest.by_role("colmap_binary")) == 3
    vis = np.asarray(Image.open(manifest.by_role("depth_vis")[0].path))
    assert vis.shape == (36, 48, 3)
    assert manifest.document["options"]["colormap"] == "viridis"


@pytest.mark.parametrize(
    ("formats", "message"),
    [
        (["ply", "obj"], r"unknown export format\(s\) \['obj'\]: valid formats are depth_npy, "),
        ([], "no export format given"),
    ],
)
def test_bad_formats_are_refused_before_writing(prediction, formats, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message) as error:
        export_all(prediction, tmp_path / "out", formats)
    for name in FORMATS:
        assert name in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_option_is_refused(prediction, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"colormap not used by format\(s\) npz; .*compress"):
        export_all(prediction, tmp_path / "out", ["npz"], colormap="turbo")
    with pytest.raises(ValueError, match="max_point"):
        export_all(prediction, tmp_path / "out", ["ply"], max_point=3)
    assert list(tmp_path.iterdir()) == []


def test_folder_must_be_new_or_empty(prediction, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_all(prediction, busy, ["npz"])
    assert _files(busy) == {"keep.txt"}
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = export_all(prediction, empty, ["npz"])
    assert _files(empty) == {"prediction.npz", "manifest.json"}
    assert manifest.folder == empty


def test_the_working_directory_is_refused(prediction, tmp_path: Path, monkeypatch) -> None:
    """Written beside the folder and renamed onto it: the working directory itself would be
    replaced (it was staged inside itself and refused as not empty)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is the working directory"):
        export_all(prediction, Path("."), ["npz"])
    assert not any(tmp_path.iterdir())


def test_failure_leaves_nothing(prediction, tmp_path: Path, monkeypatch) -> None:
    """The GLB writer dies half-way through its file: no output folder, no staging folder."""
    import da3cog.export.glb as glb

    def broken(*args, **kwargs):
        raise RuntimeError("GLB writer crashed")

    monkeypatch.setattr(glb, "glb_parts", broken)
    before = snapshot(prediction)
    with pytest.raises(RuntimeError, match="crashed"):
        export_all(prediction, tmp_path / "out", ["depth_png16", "ply", "glb", "npz"])
    assert list(tmp_path.iterdir()) == []
    assert_unchanged(prediction, before)


def test_failure_inside_a_file_leaves_nothing(prediction, tmp_path: Path, monkeypatch) -> None:
    """A write that fails after putting bytes on disk (e.g. disk full) leaves no partial file."""
    original = files.write_atomically

    def half_then_fail(path, write):
        if path.name == "scene.glb":

            def partial(target: Path) -> None:
                target.write_bytes(b"glTF\x02\x00")
                raise OSError("No space left on device")

            return original(path, partial)
        return original(path, write)

    monkeypatch.setattr(files, "write_atomically", half_then_fail)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="No space"):
        export_all(prediction, empty, ["cameras_json", "glb"])
    assert list(tmp_path.iterdir()) == [empty] and list(empty.iterdir()) == []


def test_single_view_and_processing_resolution(tmp_path: Path) -> None:
    single = make_prediction(
        views=1,
        size=(28, 42),
        output_resolution="processing",
        input_sizes=[(56, 84)],
    )
    before = snapshot(single)
    manifest = export_all(single, tmp_path / "out", ["all"])
    assert {entry.role for entry in manifest.entries} == ROLES
    assert any("processing resolution" in note for note in manifest.document["notes"])
    assert_unchanged(single, before)


def test_pooled_percentiles_are_exact_then_taken_of_an_even_sample(monkeypatch) -> None:
    """Shared percentiles over every view (the confidence PNGs' range, the point clouds'
    confidence filter): exact as np.percentile of all finite values up to PERCENTILE_SAMPLE
    of them, past that of every k-th, so at most that many are held."""
    import da3cog.export.points as points

    rng = np.random.default_rng(8)
    parts = [rng.gamma(2.0, size=(30, 40)).astype(np.float32) for _ in range(7)]
    parts[2][0, :5] = np.nan
    parts[4][3, 3] = np.inf
    finite = np.concatenate([p[np.isfinite(p)] for p in parts])
    exact = points.pooled_percentile(lambda: iter(parts), (2.0, 98.0))
    np.testing.assert_array_equal(exact, np.percentile(finite, (2.0, 98.0)))
    monkeypatch.setattr(points, "PERCENTILE_SAMPLE", 1000)
    stride = -(-len(finite) // 1000)
    sampled = points.pooled_percentile(lambda: iter(parts), (2.0, 98.0))
    np.testing.assert_array_equal(sampled, np.percentile(finite[::stride], (2.0, 98.0)))
    assert points.pooled_percentile(lambda: iter([np.full(3, np.nan)]), 50.0) is None


def test_exports_of_spilled_views_hold_one_view_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """A chunked run's views spilled to memory-mapped files: the exports that take every
    view at once (the NPZ's stacked maps, the shared confidence range of the PNGs, the point
    cloud's confidence filter) read them one at a time and take percentiles of at most
    PERCENTILE_SAMPLE values (here 4096, as if the views were many and large), so the memory
    they take on the heap does not grow with the views (it grew by about 30 bytes a pixel:
    every view's maps copied back)."""
    import tracemalloc

    import da3cog.export.points as points
    from da3cog.chunked import spill_view

    monkeypatch.setattr(points, "PERCENTILE_SAMPLE", 4096)

    def peak(views: int) -> int:
        prediction = make_prediction(views=views, size=(120, 160))
        spilled = dataclasses.replace(
            prediction, views=tuple(spill_view(v, tmp_path) for v in prediction.views)
        )
        out = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"
        tracemalloc.start()
        try:
            formats = ["npz", "npz_upstream", "confidence_png", "ply"]
            export_all(spilled, out, formats, max_points=500)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(8)  # one-off costs (imports inside the exporters) out of the way
    small, large = peak(8), peak(24)
    growth = (large - small) / (16 * 120 * 160)
    assert growth < 1.0, f"{growth:.2f} bytes a pixel"
