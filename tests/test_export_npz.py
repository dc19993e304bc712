"""NPZ bundle: every array and flag of the Prediction, read with plain np.load and back into an
equal Prediction; per-view keys when views differ in size."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_export_scene import assert_unchanged, make_prediction, snapshot

from da3cog.export.npz import export_npz, load_npz


@pytest.mark.parametrize("compress", [True, False])
def test_stacked_bundle(compress: bool, tmp_path: Path) -> None:
    prediction = make_prediction(views=3, holes=True)
    before = snapshot(prediction)
    (path,) = export_npz(prediction, tmp_path, compress=compress)
    assert path.name == "prediction.npz"
    with zipfile.ZipFile(path) as archive:
        methods = {info.compress_type for info in archive.infolist()}
    assert methods == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}
    with np.load(path, allow_pickle=False) as bundle:  # no pickles needed
        assert str(bundle["layout"]) == "stacked"
        np.testing.assert_array_equal(bundle["depth"], prediction.depth)
        np.testing.assert_array_equal(bundle["confidence"], prediction.confidence)
        np.testing.assert_array_equal(
            bundle["images"], np.stack([v.image for v in prediction.views])
        )
        np.testing.assert_array_equal(bundle["extrinsics"], prediction.extrinsics)
        np.testing.assert_array_equal(bundle["intrinsics"], prediction.intrinsics)
        assert bundle["names"].tolist() == ["view_0000", "view_0001", "view_0002"]
        assert not bool(bundle["is_metric"]) and str(bundle["model_id"]) == "synthetic/room"
        assert bundle["notes"].tolist() == ["synthetic scene"]
    assert_unchanged(load_npz(path), prediction)
    assert load_npz(path).reference_view == 0
    assert_unchanged(prediction, before)


def test_the_bundle_keeps_the_precision_and_revision(tmp_path: Path) -> None:
    """The npz holds every flag of the prediction: precision and model revision came back
    as fp32 and None."""
    prediction = dataclasses.replace(make_prediction(), precision="bf16", model_revision="abc123")
    (path,) = export_npz(prediction, tmp_path)
    loaded = load_npz(path)
    assert (loaded.precision, loaded.model_revision) == ("bf16", "abc123")
    assert_unchanged(loaded, prediction)


def test_views_of_different_sizes_are_stored_per_view(tmp_path: Path) -> None:
    prediction = make_prediction(sizes=[(36, 48), (30, 40)], output_resolution="input")
    (path,) = export_npz(prediction, tmp_path)
    with np.load(path) as bundle:
        assert str(bundle["layout"]) == "per_view"
        assert "depth" not in bundle.files
        assert bundle["depth_0001"].shape == (30, 40)
        assert bundle["image_0000"].shape == (36, 48, 3)
        assert bundle["confidence_0001"].dtype == np.float32
    loaded = load_npz(path)
    assert_unchanged(loaded, prediction)
    assert loaded.output_resolution == "input" and loaded.processing_size == (36, 48)


def _upstream_writer():
    """Upstream's ``export_to_npz`` without its fire-and-forget thread (its decorator starts a
    Thread; the function itself is in the wrapper's closure)."""
    import importlib.util

    import depth_anything_3

    # By file: the package's export/__init__ imports its Gaussian exporter's dependencies.
    path = Path(depth_anything_3.__path__[0]) / "utils" / "export" / "npz.py"
    spec = importlib.util.spec_from_file_location("upstream_npz", path)
    assert spec is not None and spec.loader is not None
    upstream_npz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream_npz)
    (cell,) = upstream_npz.export_to_npz.__closure__
    return cell.cell_contents


def test_upstream_layout_reads_like_upstreams_own_file(tmp_path: Path) -> None:
    """``npz_upstream``: the keys, shapes and dtypes of upstream's export_to_npz, written by
    upstream's own writer from the same arrays, so a script made for upstream's files reads
    ours unchanged."""
    from depth_anything_3.specs import Prediction as UpstreamPrediction

    from da3cog.export.manifest import export_all

    prediction = make_prediction(views=3)
    before = snapshot(prediction)
    manifest = export_all(prediction, tmp_path / "ours", ["npz_upstream"])
    (entry,) = manifest.by_role("npz_upstream")
    assert entry.path.name == "prediction_upstream.npz"
    upstream = UpstreamPrediction(
        depth=prediction.depth,
        is_metric=0,
        conf=prediction.confidence,
        extrinsics=prediction.extrinsics[:, :3, :],
        intrinsics=prediction.intrinsics,
        processed_images=np.stack([v.image for v in prediction.views]),
    )
    _upstream_writer()(upstream, str(tmp_path / "upstream"))
    reference = tmp_path / "upstream" / "exports" / "npz" / "results.npz"
    with np.load(entry.path) as ours, np.load(reference) as theirs:
        assert sorted(ours.files) == sorted(theirs.files)
        for key in theirs.files:
            assert ours[key].shape == theirs[key].shape, key
            assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours["image"], theirs["image"])
        np.testing.assert_allclose(ours["depth"], theirs["depth"], atol=1e-6)
        np.testing.assert_allclose(ours["conf"], theirs["conf"], atol=0.005)
        np.testing.assert_array_equal(ours["extrinsics"], theirs["extrinsics"])
        np.testing.assert_array_equal(ours["intrinsics"], theirs["intrinsics"])
    assert "npz_upstream" not in export_all(prediction, tmp_path / "all", ["all"]).document[
        "formats"
    ]
    assert_unchanged(prediction, before)


def test_upstream_layout_needs_views_of_one_size(tmp_path: Path) -> None:
    from da3cog.export.manifest import export_all

    mixed = make_prediction(sizes=[(36, 48), (30, 40)])
    with pytest.raises(ValueError, match="output_resolution='processing'"):
        export_all(mixed, tmp_path, ["npz_upstream"])
