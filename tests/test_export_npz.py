"""NPZ bundle: every array and flag of the Prediction, read with plain np.load and back into an
equal Prediction; per-view keys when views differ in size."""

from __future__ import annotations

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
