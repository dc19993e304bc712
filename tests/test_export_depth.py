"""Depth exporters: float32 .npy, 16-bit PNG with its scale, colour visualisation, confidence PNG;
each file re-read with numpy / PIL / imageio."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image
from test_export_scene import assert_unchanged, make_prediction, snapshot

from da3cog.export.colormap import COLORMAPS, apply_colormap
from da3cog.export.depth import (
    colorize_depth,
    export_confidence_png,
    export_depth_npy,
    export_depth_png16,
    export_depth_vis,
    read_depth_png16,
)


@pytest.fixture(scope="module")
def prediction():
    return make_prediction(views=3, names=["a b", "IMG_0042", "ünïcode"], holes=True)


def test_depth_npy_round_trip(prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    paths = export_depth_npy(prediction, tmp_path)
    assert [p.name for p in paths] == [
        "depth_0000_a_b.npy",
        "confidence_0000_a_b.npy",
        "depth_0001_IMG_0042.npy",
        "confidence_0001_IMG_0042.npy",
        "depth_0002_ünïcode.npy",
        "confidence_0002_ünïcode.npy",
    ]
    for index, view in enumerate(prediction.views):
        depth, confidence = np.load(paths[2 * index]), np.load(paths[2 * index + 1])
        assert depth.dtype == np.float32 and confidence.dtype == np.float32
        np.testing.assert_array_equal(depth, view.depth)
        np.testing.assert_array_equal(confidence, view.confidence)
    assert_unchanged(prediction, before)
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temporary file left behind


def test_depth_png16_round_trip_within_one_step(prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    paths = export_depth_png16(prediction, tmp_path)
    assert [p.name for p in paths] == [
        "depth_0000_a_b.png",
        "depth_0001_IMG_0042.png",
        "depth_0002_ünïcode.png",
    ]
    for path, view in zip(paths, prediction.views, strict=True):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "I;16"
            scale = float(image.text["depth_scale"])  # the tEXt chunk
            assert "depth_scale" in image.text and "0" in image.text["depth_encoding"]
        values = iio.imread(path)  # an independent decoder
        assert values.dtype == np.uint16 and values.shape == view.depth.shape
        valid = np.isfinite(view.depth) & (view.depth > 0)
        assert values.max() == 65535  # the largest depth uses the full range
        assert (values[~valid] == 0).all() and (values[valid] >= 1).all()
        error = np.abs(values[valid] * scale - view.depth[valid])
        assert error.max() <= 0.5 * scale * (1 + 1e-6)
        assert scale == pytest.approx(np.nanmax(view.depth) / 65535)
        depth, read_scale = read_depth_png16(path)
        assert read_scale == scale and np.isnan(depth[~valid]).all()
    assert not prediction.views[0].depth[:3, :4].any()  # the holes are there
    assert_unchanged(prediction, before)


def test_depth_vis_side_by_side(prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    paths = export_depth_vis(prediction, tmp_path)
    assert paths[1].name == "depth_vis_0001_IMG_0042.png"
    for path, view in zip(paths, prediction.views, strict=True):
        picture = iio.imread(path)
        assert picture.shape == (view.height, 2 * view.width, 3) and picture.dtype == np.uint8
        np.testing.assert_array_equal(picture[:, : view.width], view.image)
        np.testing.assert_array_equal(picture[:, view.width :], colorize_depth(view.depth))
    alone = export_depth_vis(prediction, tmp_path / "alone", colormap="viridis", side_by_side=False)
    assert iio.imread(alone[0]).shape == (*prediction.views[0].depth.shape, 3)
    jpegs = export_depth_vis(prediction, tmp_path / "jpg", vis_format="jpg")
    assert jpegs[2].name == "depth_vis_0002_ünïcode.jpg"
    with Image.open(jpegs[2]) as image:
        assert image.format == "JPEG" and image.size == (2 * prediction.views[2].width, 36)
    with pytest.raises(ValueError, match="vis_format"):
        export_depth_vis(prediction, tmp_path / "bad", vis_format="gif")
    assert not (tmp_path / "bad").exists()
    assert_unchanged(prediction, before)


def test_a_jpeg_too_wide_is_refused_before_any_file(tmp_path: Path) -> None:
    """A JPEG is at most 65,500 pixels a side: a 33,000-pixel-wide view side by side failed
    in the encoder ("broken data stream"); it is refused naming the view and the way out."""
    wide = make_prediction(views=1, size=(4, 33_000))
    with pytest.raises(ValueError, match=r"66000x4.*vis_format='png' or side_by_side=False"):
        export_depth_vis(wide, tmp_path / "wide", vis_format="jpg")
    assert not (tmp_path / "wide").exists()
    alone = export_depth_vis(wide, tmp_path / "alone", vis_format="jpg", side_by_side=False)
    assert len(alone) == 1


def test_colorize_depth_is_inverse_depth_in_percentile_range() -> None:
    depth = np.linspace(1.0, 10.0, 200, dtype=np.float32).reshape(10, 20)
    depth[0, 0] = 0.0
    colours = colorize_depth(depth, "turbo")
    assert (colours[0, 0] == 0).all()  # invalid: black
    near, far = apply_colormap(np.array([1.0])), apply_colormap(np.array([0.0]))
    np.testing.assert_array_equal(colours[0, 1], near[0])  # nearest pixels: top of the range
    np.testing.assert_array_equal(colours[-1, -1], far[0])
    # Monotone along the colormap: the viridis lightness (sum of RGB) rises with 1 / depth.
    lightness = colorize_depth(depth, "viridis").astype(int).sum(-1).ravel()[1:]
    assert (np.diff(lightness) <= 2).all()


def test_colormaps_match_their_endpoints() -> None:
    assert set(COLORMAPS) == {"turbo", "viridis"}
    ends = apply_colormap(np.array([0.0, 1.0]), "viridis")
    np.testing.assert_array_equal(ends, [[0x44, 0x01, 0x54], [0xFD, 0xE7, 0x25]])
    assert apply_colormap(np.array([np.nan, -3.0, 7.0]), "turbo").shape == (3, 3)
    with pytest.raises(ValueError, match="turbo, viridis"):
        apply_colormap(np.zeros(2), "jet")


def test_unknown_colormap_writes_nothing(prediction, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown colormap"):
        export_depth_vis(prediction, tmp_path, colormap="jet")
    assert not any(tmp_path.iterdir())


def test_confidence_png(prediction, tmp_path: Path) -> None:
    before = snapshot(prediction)
    paths = export_confidence_png(prediction, tmp_path)
    assert paths[0].name == "confidence_0000_a_b.png"
    for path, view in zip(paths, prediction.views, strict=True):
        with Image.open(path) as image:
            assert image.mode == "L"
            low = float(image.text["confidence_low"])
            high = float(image.text["confidence_high"])
            grey = np.asarray(image)
        expected = np.clip((view.confidence - low) / (high - low), 0, 1) * 255
        assert np.abs(grey - expected).max() <= 0.5 + 1e-3
    assert_unchanged(prediction, before)


def test_failure_mid_way_leaves_no_file(prediction, tmp_path: Path, monkeypatch) -> None:
    """The third PNG fails after writing some bytes: no PNG, no temporary file remains."""
    calls = {"count": 0}
    original = Image.Image.save

    def flaky(self, fp, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError("disk full")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky)
    with pytest.raises(OSError, match="disk full"):
        export_depth_png16(prediction, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_views_written_in_parallel_are_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-view images are encoded several at once: the files come back in view order, and
    when one view's encoding fails the views written beside it are removed too."""
    import da3cog.export.depth as depth

    many = make_prediction(views=12)
    paths = export_depth_vis(many, tmp_path / "ok")
    assert [p.name[:19] for p in paths] == [f"depth_vis_{i:04d}_view" for i in range(12)]
    assert sorted((tmp_path / "ok").iterdir()) == sorted(paths)

    original = depth.colorize_depth
    failing = many.views[7].depth

    def colorize(values, *args, **kwargs):
        if values is failing:
            raise RuntimeError("encoder crashed on view 7")
        return original(values, *args, **kwargs)

    monkeypatch.setattr(depth, "colorize_depth", colorize)
    with pytest.raises(RuntimeError, match="view 7"):
        export_depth_vis(many, tmp_path / "failed")
    assert not (tmp_path / "failed").exists() or not any((tmp_path / "failed").iterdir())
