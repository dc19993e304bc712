"""3DGS PLY (``gaussians_ply``): the layout re-read by plyfile and by PlayCanvas's splat-transform
(npm, installed by scripts/test.sh into .cache/npm), every value round trip, upstream's trimming
(checked against upstream's own ``save_gaussian_ply``), export_all's handling of predictions
with and without Gaussians, and a real Gaussian-head prediction end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_scene import add_gaussians, assert_unchanged, make_prediction, require, snapshot

from da3cog.export import export_all
from da3cog.export.gaussians import (
    export_gaussians_ply,
    gaussian_keep_mask,
    gaussian_ply_fields,
    gaussian_view_depths,
    gaussians_ply_files,
)
from da3cog.export.manifest import manifest_schema
from da3cog.pipeline import Gaussians, Prediction

ROOT = Path(__file__).resolve().parents[1]
SPLAT_TRANSFORM = Path(
    os.environ.get(
        "SPLAT_TRANSFORM",
        ROOT / ".cache" / "npm" / "node_modules" / "@playcanvas" / "splat-transform",
    )
)
FIELDS = [
    *("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"),
    *(f"f_rest_{i}" for i in range(24)),
    *("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"),
]


@pytest.fixture(scope="module")
def prediction() -> Prediction:
    return add_gaussians(make_prediction(views=3, size=(36, 48), names=["a", "b", "c"]))


def read_vertices(path: Path) -> np.ndarray:
    plyfile = require("plyfile")
    return plyfile.PlyData.read(str(path))["vertex"].data


def columns(vertices: np.ndarray, *names: str) -> np.ndarray:
    return np.stack([vertices[name] for name in names], axis=1)


def splat_transform_csv(path: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """splat-transform's reading of the PLY at ``path``, written back as CSV: column name ->
    ``(N,)`` float64 values."""
    node = shutil.which("node")
    cli = SPLAT_TRANSFORM / "bin" / "cli.mjs"
    if node is None or not cli.is_file():
        message = "node and npm @playcanvas/splat-transform (scripts/test.sh installs it)"
        if os.environ.get("DA3COG_REQUIRE_EXPORT_TOOLS") == "1":
            pytest.fail(f"missing {message}")
        pytest.skip(f"needs {message}")
    target = tmp_path / f"{path.stem}.splat-transform.csv"
    result = subprocess.run(
        [node, str(cli), "--quiet", "--overwrite", str(path), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with target.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, values = rows[0], np.array(rows[1:], dtype=np.float64).reshape(-1, len(rows[0]))
    return {name: values[:, index] for index, name in enumerate(header)}


def expected_mask(
    prediction: Prediction, border_fraction: float, keep_nearest: float
) -> tuple[np.ndarray, dict[str, int]]:
    """The kept Gaussians computed independently, the way upstream's ``save_gaussian_ply``
    does (torch, per view), with our validity rule."""
    gaussians = prediction.gaussians
    views, height, width = gaussians.grid
    means = torch.from_numpy(gaussians.means.astype(np.float64)).reshape(views, height, width, 3)
    kept, counts = [], {"border": 0, "far": 0, "invalid": 0}
    for index, view in enumerate(prediction.views):
        extrinsics = torch.from_numpy(view.extrinsics.astype(np.float64))
        depth = means[index] @ extrinsics[2, :3] + extrinsics[2, 3]
        inside = torch.zeros(height, width, dtype=torch.bool)
        trim_h, trim_w = int(border_fraction * height), int(border_fraction * width)
        inside[trim_h : height - trim_h, trim_w : width - trim_w] = True
        near = torch.ones_like(inside)
        if keep_nearest < 1:
            near = depth <= torch.quantile(depth[depth.isfinite()], keep_nearest)
        scales = torch.from_numpy(np.array(gaussians.scales)).reshape(views, height, width, 3)[
            index
        ]
        valid = (depth > 0) & (scales > 0).all(-1)
        for name in ("means", "rotations", "harmonics", "opacities"):
            array = torch.from_numpy(np.array(getattr(gaussians, name))).reshape(
                views, height, width, -1
            )
            valid &= array[index].isfinite().all(-1)
        counts["border"] += int((~inside).sum())
        counts["far"] += int((inside & ~near).sum())
        counts["invalid"] += int((inside & near & ~valid).sum())
        kept.append((inside & near & valid).reshape(-1))
    return torch.cat(kept).numpy(), counts


def check_values(vertices: np.ndarray, gaussians: Gaussians, keep: np.ndarray) -> None:
    """Every PLY value against the Gaussians it came from (3DGS conventions)."""
    np.testing.assert_array_equal(columns(vertices, "x", "y", "z"), gaussians.means[keep])
    np.testing.assert_array_equal(columns(vertices, "nx", "ny", "nz"), 0.0)
    np.testing.assert_allclose(
        np.exp(columns(vertices, "scale_0", "scale_1", "scale_2").astype(np.float64)),
        gaussians.scales[keep],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        1 / (1 + np.exp(-vertices["opacity"].astype(np.float64))),
        gaussians.opacities[keep],
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        columns(vertices, "rot_0", "rot_1", "rot_2", "rot_3"), gaussians.rotations[keep]
    )
    harmonics = gaussians.harmonics[keep]
    np.testing.assert_array_equal(
        columns(vertices, "f_dc_0", "f_dc_1", "f_dc_2"), harmonics[..., 0]
    )
    # f_rest: the 8 higher coefficients of red, then of green, then of blue.
    rest = columns(vertices, *(f"f_rest_{i}" for i in range(24))).reshape(-1, 3, 8)
    np.testing.assert_array_equal(rest, harmonics[..., 1:])


# ---------------------------------------------------------------------------------------------
# Layout and values
# ---------------------------------------------------------------------------------------------


def test_layout_and_values_round_trip(prediction: Prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    (path,) = export_gaussians_ply(prediction, tmp_path)
    assert path == tmp_path / "gaussians.ply"
    assert gaussian_ply_fields() == FIELDS
    header = path.read_bytes().split(b"end_header\n")[0].decode("ascii")
    assert header.startswith("ply\nformat binary_little_endian 1.0\n")
    assert "comment da3cog synthetic/room (synthetic)" in header
    vertices = read_vertices(path)
    assert list(vertices.dtype.names) == FIELDS
    assert all(vertices.dtype[name] == np.dtype("<f4") for name in FIELDS)
    keep, _ = expected_mask(prediction, 8 / 256, 0.9)
    assert len(vertices) == keep.sum() > 0
    check_values(vertices, prediction.gaussians, keep)
    # Nothing but the header and the float32 records.
    assert (
        path.stat().st_size == len(header) + len("end_header\n") + len(vertices) * len(FIELDS) * 4
    )
    assert_unchanged(prediction, before)


def test_read_by_splat_transform(prediction: Prediction, tmp_path: Path) -> None:
    (path,) = export_gaussians_ply(prediction, tmp_path)
    vertices = read_vertices(path)
    read = splat_transform_csv(path, tmp_path)
    assert set(read) == set(FIELDS)
    assert len(read["x"]) == len(vertices)
    for name in FIELDS:
        # CSV holds each float32 in decimal; it reads back to the same float32.
        np.testing.assert_array_equal(read[name].astype(np.float32), vertices[name], err_msg=name)


def test_trimming_counts(prediction: Prediction, tmp_path: Path) -> None:
    total = len(prediction.gaussians)
    views, height, width = prediction.gaussians.grid
    for index, (border, nearest) in enumerate(
        [(8 / 256, 0.9), (0.0, 0.9), (8 / 256, 1.0), (0.0, 1.0), (0.1, 0.5)]
    ):
        (entry,) = gaussians_ply_files(
            prediction,
            tmp_path / str(index),
            gaussian_border_fraction=border,
            gaussian_keep_nearest=nearest,
        )
        keep, counts = expected_mask(prediction, border, nearest)
        vertices = read_vertices(entry.path)
        assert len(vertices) == entry.details["gaussians"] == keep.sum()
        assert entry.details["removed"] == counts
        assert entry.details["total"] == total
        assert (entry.details["border_fraction"], entry.details["keep_nearest"]) == (
            border,
            nearest,
        )
        assert entry.role == "gaussian_splats" and entry.view is None
        check_values(vertices, prediction.gaussians, keep)
        trim_h, trim_w = int(border * height), int(border * width)
        assert counts["border"] == total - views * (height - 2 * trim_h) * (width - 2 * trim_w)
        if nearest == 1.0:
            assert counts["far"] == 0
        else:  # at most the farthest (1 - nearest) of each view's Gaussians go
            assert counts["far"] <= (1 - nearest) * total + views
    with_nothing_trimmed = gaussian_keep_mask(prediction, border_fraction=0.0, keep_nearest=1.0)
    assert with_nothing_trimmed[0].all()
    assert with_nothing_trimmed[1] == {"border": 0, "far": 0, "invalid": 0}


def test_invalid_gaussians_are_left_out(prediction: Prediction, tmp_path: Path) -> None:
    """A zero scale, a centre behind its camera or a NaN has no valid PLY form."""
    gaussians = prediction.gaussians
    _, height, width = gaussians.grid
    centre = (height // 2) * width + width // 2
    broken = {key: np.array(getattr(gaussians, key)) for key in ("means", "scales", "harmonics")}
    broken["scales"][centre, 1] = 0.0
    broken["means"][centre + 1] = [0.0, 0.0, -1.0]  # view 0's camera is the identity
    broken["harmonics"][centre + 2, 2, 4] = np.nan
    for array in broken.values():
        array.flags.writeable = False
    damaged = dataclasses.replace(prediction, gaussians=dataclasses.replace(gaussians, **broken))
    (entry,) = gaussians_ply_files(damaged, tmp_path, gaussian_keep_nearest=1.0)
    assert entry.details["removed"]["invalid"] == 3
    vertices = read_vertices(entry.path)
    assert len(vertices) == len(gaussians) - entry.details["removed"]["border"] - 3
    for name in FIELDS:
        assert np.isfinite(vertices[name]).all()


def test_a_view_without_finite_gaussians_is_left_out_quietly(prediction: Prediction) -> None:
    """Every Gaussian of view 1 at NaN: that view has no nearest 90% (all of it is left out as
    invalid), the others keep theirs, and no warning is raised."""
    gaussians = prediction.gaussians
    views, height, width = gaussians.grid
    means = np.array(gaussians.means)
    means.reshape(views, height * width, 3)[1] = np.nan
    broken = dataclasses.replace(prediction, gaussians=dataclasses.replace(gaussians, means=means))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep, removed = gaussian_keep_mask(broken, border_fraction=0.0, keep_nearest=0.9)
    keep = keep.reshape(views, -1)
    assert not keep[1].any() and removed["invalid"] == height * width
    expected, _ = gaussian_keep_mask(prediction, border_fraction=0.0, keep_nearest=0.9)
    others = [0, *range(2, views)]
    np.testing.assert_array_equal(keep[others], expected.reshape(views, -1)[others])


def test_no_gaussian_left_writes_an_empty_ply(prediction: Prediction, tmp_path: Path) -> None:
    """Every Gaussian invalid (an overflow's NaN): a PLY of no vertices, not numpy's "cannot
    reshape array of size 0"."""
    gaussians = prediction.gaussians
    means = np.full_like(np.asarray(gaussians.means), np.nan)
    broken = dataclasses.replace(prediction, gaussians=dataclasses.replace(gaussians, means=means))
    (entry,) = gaussians_ply_files(broken, tmp_path)
    assert entry.details["gaussians"] == 0
    assert len(read_vertices(entry.path)) == 0


def test_a_model_id_in_another_script_is_escaped_in_the_header(
    prediction: Prediction, tmp_path: Path
) -> None:
    """A checkpoint folder's name is the model id, written in the PLY header's comments: a
    folder called "modèle" failed every PLY export (the header is ASCII)."""
    named = dataclasses.replace(prediction, model_id="/home/zoë/modèle-gs")
    (entry,) = gaussians_ply_files(named, tmp_path)
    header = entry.path.read_bytes().split(b"end_header")[0]
    assert b"/home/zo\\xeb/mod\\xe8le-gs" in header
    assert len(read_vertices(entry.path)) == entry.details["gaussians"]


def test_depths_are_each_views_camera_z(prediction: Prediction) -> None:
    depths = gaussian_view_depths(prediction.gaussians, prediction)
    for view, depth in zip(prediction.views, depths, strict=True):
        np.testing.assert_allclose(depth, view.depth, rtol=1e-5)


def test_same_file_as_upstreams_save_gaussian_ply(prediction: Prediction, tmp_path: Path) -> None:
    """Upstream's own writer (depth-anything-3 0.1.1, ``export_to_gs_ply``'s settings but with
    every SH band, which is what we write) given our per-view Gaussian depths: the same
    Gaussians, fields and values."""
    from depth_anything_3.specs import Gaussians as UpstreamGaussians
    from depth_anything_3.utils.gsply_helpers import save_gaussian_ply

    gaussians = prediction.gaussians
    upstream = UpstreamGaussians(
        means=torch.from_numpy(gaussians.means.copy())[None],
        scales=torch.from_numpy(gaussians.scales.copy())[None],
        rotations=torch.from_numpy(gaussians.rotations.copy())[None],
        harmonics=torch.from_numpy(gaussians.harmonics.copy())[None],
        opacities=torch.from_numpy(gaussians.opacities.copy())[None],
    )
    depths = torch.from_numpy(gaussian_view_depths(gaussians, prediction))[..., None]
    theirs_path = tmp_path / "upstream.ply"
    save_gaussian_ply(
        upstream,
        str(theirs_path),
        ctx_depth=depths,
        shift_and_scale=False,
        save_sh_dc_only=False,
        gs_views_interval=1,
        inv_opacity=True,
        prune_by_depth_percent=0.9,
        prune_border_gs=True,
    )
    (ours_path,) = export_gaussians_ply(prediction, tmp_path / "ours")
    ours, theirs = read_vertices(ours_path), read_vertices(theirs_path)
    assert list(theirs.dtype.names) == list(ours.dtype.names)
    assert len(ours) == len(theirs) > 0
    for name in FIELDS:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# export_all
# ---------------------------------------------------------------------------------------------


def test_all_includes_gaussians_when_the_prediction_has_them(
    prediction: Prediction, tmp_path: Path
) -> None:
    jsonschema = require("jsonschema")
    before = snapshot(prediction)
    manifest = export_all(prediction, tmp_path / "out", ["all"], max_points=500)
    jsonschema.Draft202012Validator(manifest_schema()).validate(manifest.document)
    (entry,) = manifest.by_role("gaussian_splats")
    assert entry.path == tmp_path / "out" / "gaussians.ply"
    assert entry.details["sh_degree"] == 2 and entry.details["grid"] == {
        "views": 3,
        "height": 36,
        "width": 48,
    }
    assert len(read_vertices(entry.path)) == entry.details["gaussians"]
    assert not any("skipped" in note for note in manifest.document["notes"])
    document = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (row,) = [f for f in document["files"] if f["role"] == "gaussian_splats"]
    assert row["path"] == "gaussians.ply" and row["removed"] == entry.details["removed"]
    assert_unchanged(prediction, before)


def test_options_reach_the_gaussian_exporter(prediction: Prediction, tmp_path: Path) -> None:
    manifest = export_all(
        prediction,
        tmp_path / "out",
        ["gaussians_ply", "npz"],
        gaussian_border_fraction=0.0,
        gaussian_keep_nearest=1.0,
    )
    (entry,) = manifest.by_role("gaussian_splats")
    assert entry.details["gaussians"] == len(prediction.gaussians)
    assert manifest.document["options"] == {
        "gaussian_border_fraction": 0.0,
        "gaussian_keep_nearest": 1.0,
    }
    with pytest.raises(ValueError, match="gaussian_keep_nearest not used by format"):
        export_all(prediction, tmp_path / "npz", ["npz"], gaussian_keep_nearest=0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gaussian_border_fraction": 0.5}, r"gaussian_border_fraction must be within \[0, 0.5\)"),
        ({"gaussian_border_fraction": -0.1}, "gaussian_border_fraction"),
        ({"gaussian_keep_nearest": 0.0}, r"gaussian_keep_nearest must be within \(0, 1\]"),
        ({"gaussian_keep_nearest": 1.5}, "gaussian_keep_nearest"),
    ],
)
def test_bad_trimming_options_write_nothing(
    prediction: Prediction, tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        export_all(prediction, tmp_path / "out", ["depth_npy", "gaussians_ply"], **options)
    assert list(tmp_path.iterdir()) == []


def test_without_gaussians_all_skips_and_by_name_is_refused(tmp_path: Path) -> None:
    plain = make_prediction(views=2)
    manifest = export_all(plain, tmp_path / "all", ["all"])
    assert not manifest.by_role("gaussian_splats")
    (note,) = [n for n in manifest.document["notes"] if n.startswith("format gaussians_ply")]
    assert "skipped: the prediction has no 3D Gaussians" in note
    with pytest.raises(ValueError, match="format gaussians_ply cannot be exported") as error:
        export_all(plain, tmp_path / "named", ["depth_npy", "gaussians_ply"])
    for text in ("infer_gaussians=True", "with a Gaussian head: giant, nested"):
        assert text in str(error.value)
    with pytest.raises(ValueError, match="infer_gaussians"):
        export_gaussians_ply(plain, tmp_path / "direct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all"]


# ---------------------------------------------------------------------------------------------
# A real Gaussian-head prediction (the giant's head on a ViT-S stand-in, random weights)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_prediction(small_zoo_checkpoint: Callable, photo: Callable) -> Prediction:
    from small_zoo import SMALL_GS, small_model

    from da3cog.pipeline import InferenceOptions

    model = small_model(small_zoo_checkpoint("small-gs")[0], SMALL_GS)
    views = [photo("astronaut")[::4, ::4], photo("coffee")[::4, ::4]]
    return model.predict(views, options=InferenceOptions(process_res=140, infer_gaussians=True))


def test_model_gaussians_end_to_end(model_prediction: Prediction, tmp_path: Path) -> None:
    before = snapshot(model_prediction)
    manifest = export_all(model_prediction, tmp_path / "out", ["all"], max_points=2000)
    (entry,) = manifest.by_role("gaussian_splats")
    keep, counts = expected_mask(model_prediction, 8 / 256, 0.9)
    assert entry.details["removed"] == counts
    assert entry.details["gaussians"] == keep.sum() > 0
    vertices = read_vertices(entry.path)
    check_values(vertices, model_prediction.gaussians, keep)
    read = splat_transform_csv(entry.path, tmp_path)
    assert len(read["x"]) == entry.details["gaussians"]
    np.testing.assert_array_equal(read["opacity"].astype(np.float32), vertices["opacity"])
    assert_unchanged(model_prediction, before)


def test_gaussians_of_one_posed_view_whose_scale_is_undetermined(
    small_zoo_checkpoint: Callable, photo: Callable
) -> None:
    """One posed view fixes no unit: depth keeps the network's, the note says so, and the
    Gaussians are placed in that unit (the note's text was once stored as the unit)."""
    from small_zoo import SMALL_GS, small_model

    from da3cog.pipeline import InferenceOptions

    model = small_model(small_zoo_checkpoint("small-gs")[0], SMALL_GS)
    view = photo("astronaut")[::4, ::4]
    height, width = view.shape[:2]
    intrinsics = np.array([[[100.0, 0, width / 2], [0, 100.0, height / 2], [0, 0, 1]]])
    prediction = model.predict(
        [view],
        extrinsics=np.eye(4)[None],
        intrinsics=intrinsics,
        options=InferenceOptions(process_res=140, infer_gaussians=True),
    )
    assert prediction.notes[-1].endswith("depth keeps the network's relative unit")
    assert prediction.gaussians is not None
    assert np.isfinite(np.asarray(prediction.gaussians.means)).any()
