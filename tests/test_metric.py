"""Single-view, metric and nested models in the pipeline (ViT-S stand-ins from ``small_zoo``):
the Prediction contract without cameras, metric depth only with a focal length (user
intrinsics, EXIF, else relative with a reason), depth that keeps its meaning across processing
resolutions, all-sky and sky-free images, and EXIF focal parsing on real JPEGs."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin
from small_zoo import METRIC_SMALL, MONO_SMALL, NESTED_SMALL, load_small, small_model
from torch import nn

from da3cog.export.cameras import cameras_document, transforms_document
from da3cog.io import exif_focal
from da3cog.model.backbone import BackboneOutput
from da3cog.model.dpt_head import DPTOutput
from da3cog.model.network import NetworkOutput
from da3cog.pipeline import DepthAnything3, InferenceOptions, Prediction
from da3cog.weights import LoadedModel

PROCESS_RES = 126
# Photos of different shapes, centre-cropped to one (square pixels): these tests are about the
# metric scaling, compared view by view at the processing size.
OPTIONS = InferenceOptions(
    process_res=PROCESS_RES, output_resolution="processing", mixed_shapes="crop"
)


def _scale_notes(prediction) -> list[str]:
    """The prediction's notes but the one saying how views of other shapes were handled."""
    return [note for note in prediction.notes if "views of another shape" not in note]


Photo = Callable[[str], np.ndarray]
Zoo = Callable[[str], tuple[Path, nn.Module]]

EXIF_IFD = 0x8769


def write_jpeg(
    path: Path, image: np.ndarray, orientation: int | None = None, **tags: object
) -> Path:
    """A real JPEG with EXIF: ``tags`` by name (``FocalLength=4.2``...) go to the Exif IFD."""
    Image.fromarray(image).save(path, exif=exif_block(orientation, **tags), quality=95)
    return path


def exif_block(orientation: int | None = None, **tags: object) -> Image.Exif:
    """EXIF with an orientation and ``tags`` by name (``FocalLength=4.2``...) in its IFD."""
    numbers = {
        "FocalLength": 0x920A,
        "FocalLengthIn35mmFilm": 0xA405,
        "PixelXDimension": 0xA002,
        "PixelYDimension": 0xA003,
        "FocalPlaneXResolution": 0xA20E,
        "FocalPlaneYResolution": 0xA20F,
        "FocalPlaneResolutionUnit": 0xA210,
    }
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    details = exif.get_ifd(EXIF_IFD)
    for name, value in tags.items():
        details[numbers[name]] = (
            TiffImagePlugin.IFDRational(value) if isinstance(value, float) else value
        )
    return exif


@pytest.fixture(scope="module")
def metric_model(small_zoo_checkpoint: Zoo) -> DepthAnything3:
    folder, _ = small_zoo_checkpoint("metric-small")
    return small_model(folder, METRIC_SMALL)


@pytest.fixture(scope="module")
def mono_model(small_zoo_checkpoint: Zoo) -> DepthAnything3:
    """The mono stand-in on the metric stand-in's weights: its depth is the canonical output."""
    folder, _ = small_zoo_checkpoint("metric-small")
    return small_model(folder, MONO_SMALL)


@pytest.fixture(scope="module")
def nested_model(small_zoo_checkpoint: Zoo) -> DepthAnything3:
    folder, _ = small_zoo_checkpoint("nested-small")
    return small_model(folder, NESTED_SMALL)


def focal_processing(prediction: Prediction) -> np.ndarray:
    """Each view's mean focal length in pixels of the processing image."""
    intrinsics = prediction.intrinsics
    assert intrinsics is not None
    return (intrinsics[:, 0, 0] + intrinsics[:, 1, 1]) / 2


# --------------------------------------------------------------------------------------------
# EXIF focal lengths
# --------------------------------------------------------------------------------------------


def test_exif_35mm_equivalent_focal_is_taken_over_the_diagonal(tmp_path: Path) -> None:
    image = np.zeros((300, 400, 3), np.uint8)
    path = write_jpeg(tmp_path / "a.jpg", image, FocalLengthIn35mmFilm=28, FocalLength=4.2)
    focal = exif_focal(path)
    assert not isinstance(focal, str)
    expected = 28 * 500 / math.hypot(36, 24)  # the image diagonal is 500 px
    assert focal.fx == pytest.approx(expected) and focal.fy == pytest.approx(expected)
    assert focal.tags == "FocalLengthIn35mmFilm"


@pytest.mark.parametrize(("unit", "millimetres"), [(None, 25.4), (2, 25.4), (3, 10.0)])
def test_exif_focal_length_with_the_sensor_density(
    tmp_path: Path, unit: int | None, millimetres: float
) -> None:
    """FocalPlane*Resolution count pixels per unit at the captured size (PixelXDimension),
    so a downscaled file (400 of 4000 pixels) scales the focal length too."""
    image = np.zeros((300, 400, 3), np.uint8)
    tags: dict[str, object] = {
        "FocalLength": 5.0,
        "FocalPlaneXResolution": 6000.0,
        "FocalPlaneYResolution": 5000.0,
        "PixelXDimension": 4000,
        "PixelYDimension": 3000,
    }
    if unit is not None:
        tags["FocalPlaneResolutionUnit"] = unit
    focal = exif_focal(write_jpeg(tmp_path / "b.jpg", image, **tags))
    assert not isinstance(focal, str)
    assert focal.fx == pytest.approx(5.0 * 6000 / millimetres * 400 / 4000)
    assert focal.fy == pytest.approx(5.0 * 5000 / millimetres * 300 / 3000)
    assert focal.tags == "FocalLength + FocalPlaneResolution"


def test_exif_focal_follows_the_orientation(tmp_path: Path) -> None:
    """Orientation 6 displays the stored image transposed: x and y focal lengths swap."""
    stored = np.zeros((300, 400, 3), np.uint8)
    path = write_jpeg(
        tmp_path / "c.jpg",
        stored,
        orientation=6,
        FocalLength=5.0,
        FocalPlaneXResolution=200.0,
        FocalPlaneYResolution=100.0,
        FocalPlaneResolutionUnit=4,
    )
    focal = exif_focal(path)
    assert not isinstance(focal, str)
    assert (focal.fx, focal.fy) == pytest.approx((500.0, 1000.0))
    with Image.open(path) as opened:
        assert exif_focal(opened) == focal  # a PIL image gives the same


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({}, "no usable FocalLengthIn35mmFilm or FocalLength tag"),
        ({"FocalLength": 4.2}, "without a usable sensor size"),
        ({"FocalLengthIn35mmFilm": 0}, "no usable"),
        (
            {
                "FocalLength": 4.2,
                "FocalPlaneXResolution": 10.0,
                "FocalPlaneYResolution": 10.0,
                "FocalPlaneResolutionUnit": 9,
            },
            "without a usable sensor size",
        ),
    ],
)
def test_exif_without_a_usable_focal_says_why(tmp_path: Path, tags: dict, reason: str) -> None:
    path = write_jpeg(tmp_path / "d.jpg", np.zeros((30, 40, 3), np.uint8), **tags)
    result = exif_focal(path)
    assert isinstance(result, str) and reason in result


def test_arrays_and_png_files_carry_no_exif_focal(tmp_path: Path) -> None:
    image = np.zeros((30, 40, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "e.png")
    assert isinstance(exif_focal(tmp_path / "e.png"), str)
    assert exif_focal(image) == "an array carries no EXIF"


# --------------------------------------------------------------------------------------------
# Single-view models: no cameras, said plainly
# --------------------------------------------------------------------------------------------


def test_mono_prediction_says_no_cameras_were_estimated(
    mono_model: DepthAnything3, photo: Photo
) -> None:
    prediction = mono_model.predict([photo("astronaut"), photo("coffee")], options=OPTIONS)
    assert not prediction.cameras_estimated
    assert prediction.extrinsics is None and prediction.intrinsics is None
    assert prediction.intrinsics_source is None
    assert prediction.confidence is None
    assert not prediction.is_metric and prediction.focal_source is None
    for view in prediction.views:
        assert view.extrinsics is None and view.intrinsics is None and view.confidence is None
        assert view.sky is not None and view.sky.dtype == bool and not view.sky.flags.writeable
        assert view.sky.shape == view.depth.shape
        assert view.sky.any() and not view.sky.all()
    # Sky pixels hold one far value: the 99th percentile of the non-sky depth of all views.
    sky, depth = prediction.sky, prediction.depth
    (far,) = np.unique(depth[sky])
    assert far == pytest.approx(np.quantile(depth[~sky], 0.99), rel=1e-5)
    document = cameras_document(prediction)
    assert all(v["K"] is None and v["world_to_camera"] is None for v in document["views"])
    with pytest.raises(ValueError, match=r"transforms\.json needs cameras"):
        transforms_document(prediction)


def test_sky_mask_at_input_resolution(mono_model: DepthAnything3, photo: Photo) -> None:
    prediction = mono_model.predict([photo("coffee")], options=InferenceOptions(process_res=112))
    view = prediction.views[0]
    assert view.sky is not None and view.sky.shape == view.depth.shape == (400, 600)
    assert view.sky.any() and not view.sky.all()


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"extrinsics": np.eye(4)[None], "intrinsics": np.eye(3)[None]}, "takes no camera poses"),
        ({"options": InferenceOptions(pose_from_rays=True)}, "estimates no poses"),
        (
            {"options": InferenceOptions(infer_gaussians=True)},
            "no Gaussian head; models with one: giant, nested",
        ),
    ],
)
def test_single_view_models_refuse_what_they_cannot_do(
    mono_model: DepthAnything3, photo: Photo, request_kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mono_model.predict([photo("astronaut")], **request_kwargs)


def test_gaussians_need_a_gaussian_head(small_model: DepthAnything3, photo: Photo) -> None:
    with pytest.raises(ValueError, match="small has no Gaussian head; models with one: giant"):
        small_model.predict([photo("astronaut")], options=InferenceOptions(infer_gaussians=True))


def test_mono_reports_given_intrinsics(mono_model: DepthAnything3, photo: Photo) -> None:
    image = photo("astronaut")
    intrinsics = np.array([[[600.0, 0, 250], [0, 610, 260], [0, 0, 1]]])
    prediction = mono_model.predict(
        [image], intrinsics=intrinsics, options=InferenceOptions(process_res=PROCESS_RES)
    )
    assert prediction.intrinsics_source == "user intrinsics" and not prediction.is_metric
    np.testing.assert_allclose(prediction.views[0].intrinsics, intrinsics[0], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Metric depth: metres only with a focal length
# --------------------------------------------------------------------------------------------


def test_metric_depth_with_user_intrinsics_is_canonical_times_focal_over_300(
    metric_model: DepthAnything3, mono_model: DepthAnything3, photo: Photo
) -> None:
    images = [photo("astronaut"), photo("chelsea")]
    intrinsics = np.array(
        [[[700.0, 0, 256], [0, 700, 256], [0, 0, 1]], [[350.0, 0, 225], [0, 360, 150], [0, 0, 1]]]
    )
    metric = metric_model.predict(images, intrinsics=intrinsics, options=OPTIONS)
    canonical = mono_model.predict(images, intrinsics=intrinsics, options=OPTIONS)
    assert metric.is_metric and metric.focal_source == "user intrinsics"
    assert metric.intrinsics_source == "user intrinsics" and not _scale_notes(metric)
    focal = focal_processing(metric)
    np.testing.assert_allclose(
        metric.depth, canonical.depth * focal[:, None, None] / 300, rtol=1e-6
    )


def test_metric_depth_with_exif_focal(
    metric_model: DepthAnything3, mono_model: DepthAnything3, photo: Photo, tmp_path: Path
) -> None:
    paths = [
        write_jpeg(tmp_path / "one.jpg", photo("astronaut"), FocalLengthIn35mmFilm=35),
        write_jpeg(tmp_path / "two.jpg", photo("chelsea"), FocalLengthIn35mmFilm=50),
    ]
    metric = metric_model.predict(paths, options=OPTIONS)
    canonical = mono_model.predict(paths, options=OPTIONS)
    assert metric.is_metric and metric.focal_source == "exif"
    assert metric.intrinsics_source == "exif" and canonical.intrinsics_source == "exif"
    astronaut_focal = 35 * math.hypot(512, 512) / math.hypot(36, 24)
    scale = metric.processing_size[1] / 512
    assert focal_processing(metric)[0] == pytest.approx(astronaut_focal * scale, rel=1e-5)
    focal = focal_processing(metric)
    np.testing.assert_allclose(
        metric.depth, canonical.depth * focal[:, None, None] / 300, rtol=1e-6
    )


def test_metric_depth_without_a_focal_is_reported_relative_with_the_reason(
    metric_model: DepthAnything3,
    mono_model: DepthAnything3,
    photo: Photo,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One view with an EXIF focal and one array: not every view has a focal length, so no
    view is called metric; depth stays the canonical output."""
    images = [
        write_jpeg(tmp_path / "one.jpg", photo("astronaut"), FocalLengthIn35mmFilm=35),
        photo("chelsea"),
    ]
    with caplog.at_level(logging.WARNING, logger="da3cog.pipeline"):
        prediction = metric_model.predict(images, options=OPTIONS)
    assert not prediction.is_metric and prediction.focal_source is None
    assert prediction.intrinsics is None
    (note,) = _scale_notes(prediction)
    assert "needs a focal length" in note and "view_0001: an array carries no EXIF" in note
    assert note in caplog.text
    canonical = mono_model.predict(images, options=OPTIONS)
    np.testing.assert_array_equal(prediction.depth, canonical.depth)


def test_metric_depth_in_chunks_takes_exif_as_one_pass_does(
    metric_model: DepthAnything3, photo: Photo, tmp_path: Path
) -> None:
    """Four views in chunks of two, the first two with an EXIF focal: EXIF is used for all
    views or none, as in one pass, not by the chunks whose views happen to have it (the
    first chunk made the whole prediction claim EXIF focal lengths while its depth was
    called relative); the reason names the view as the request does."""
    images = [
        write_jpeg(tmp_path / "one.jpg", photo("astronaut"), FocalLengthIn35mmFilm=35),
        write_jpeg(tmp_path / "two.jpg", photo("astronaut"), FocalLengthIn35mmFilm=50),
        photo("chelsea"),
        photo("coffee")[:, :400],
    ]
    one_pass = metric_model.predict(images, options=OPTIONS)
    chunked = metric_model.predict(
        images, options=dataclasses.replace(OPTIONS, chunk_size=2, chunk_overlap=1)
    )
    # Single-view predictions need no shared views to align: the chunks share none (the
    # overlap asked for would only predict views twice).
    assert [v.chunk for v in chunked.views] == [0, 0, 1, 1]
    assert any("2 chunks of 2 views sharing 0" in note for note in chunked.notes), chunked.notes
    for found in (one_pass, chunked):
        assert not found.is_metric
        assert (found.focal_source, found.intrinsics_source) == (None, None)
        assert all(v.intrinsics is None for v in found.views)
        (note,) = [n for n in found.notes if "needs a focal length" in n]
        assert "view_0002: an array carries no EXIF" in note, note
    # Outside the sky (whose depth is a percentile of the batch's, upstream's rule), the
    # same depth: the chunks are the same single-view predictions.
    for a, b in zip(one_pass.views, chunked.views, strict=True):
        ground = ~np.asarray(a.sky, dtype=bool)
        np.testing.assert_array_equal(np.asarray(a.depth)[ground], np.asarray(b.depth)[ground])


class IdealCanonicalNetwork(nn.Module):
    """Stands in for a perfect metric network looking at a wall ``distance`` metres away
    through a camera with ``focal_per_pixel`` x image width focal length: it answers with the
    canonical depth ``300 x distance / focal`` in pixels of the image it is given, as the
    metric model was trained to."""

    def __init__(self, distance: float, focal_per_pixel: float) -> None:
        super().__init__()
        self.distance = distance
        self.focal_per_pixel = focal_per_pixel
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.seen_widths: list[int] = []

    def forward(self, images: torch.Tensor, *args: object, **kwargs: object) -> NetworkOutput:
        batch, views, _, height, width = images.shape
        self.seen_widths.append(width)
        canonical = 300 * self.distance / (self.focal_per_pixel * width)
        depth = torch.full((batch, views, height, width), canonical)
        zeros = torch.zeros(batch * views, height, width)
        return NetworkOutput(
            depth=depth,
            depth_conf=None,
            extrinsics=None,
            intrinsics=None,
            rays=None,
            ray_conf=None,
            head=DPTOutput(zeros, zeros),
            backbone=BackboneOutput((), (), None),
            sky=torch.zeros(batch, views, height, width),
        )


def test_metric_depth_does_not_change_with_the_processing_resolution(photo: Photo) -> None:
    """Upstream #191: metres must come from the focal length in pixels of the image the
    network saw. The same image with a known focal length at two processing resolutions gives
    the same metres (while the canonical output halves)."""
    network = IdealCanonicalNetwork(distance=2.5, focal_per_pixel=1.2)
    model = DepthAnything3(LoadedModel(network, METRIC_SMALL, "ideal", Path(".")))
    image = photo("astronaut")  # 512 x 512
    intrinsics = np.array([[[1.2 * 512, 0, 256], [0, 1.2 * 512, 256], [0, 0, 1]]])
    depths = []
    for process_res in (252, 504):
        prediction = model.predict(
            [image], intrinsics=intrinsics, options=InferenceOptions(process_res=process_res)
        )
        assert prediction.is_metric and prediction.views[0].depth.shape == (512, 512)
        depths.append(prediction.depth)
    assert network.seen_widths == [252, 504]
    np.testing.assert_allclose(depths[0], 2.5, rtol=1e-6)
    np.testing.assert_allclose(depths[1], 2.5, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Nested models in the pipeline
# --------------------------------------------------------------------------------------------


def test_nested_prediction_is_metric_with_the_predicted_focal(
    nested_model: DepthAnything3, photo: Photo
) -> None:
    prediction = nested_model.predict([photo("astronaut"), photo("coffee")], options=OPTIONS)
    assert prediction.is_metric and prediction.focal_source == "predicted"
    assert prediction.cameras_estimated and prediction.intrinsics_source == "predicted"
    assert prediction.metric_scale is not None and prediction.metric_scale > 0
    assert prediction.sky is not None and prediction.sky.any()
    assert prediction.confidence is not None
    assert np.all(prediction.confidence[prediction.sky] == 1.0)


def test_posed_nested_prediction_is_in_the_unit_of_the_poses(
    nested_model: DepthAnything3, photo: Photo
) -> None:
    from test_pipeline import input_intrinsics, ring_cameras

    images = [photo("astronaut"), photo("camera"), photo("astronaut")[::-1].copy()]
    prediction = nested_model.predict(
        images,
        extrinsics=ring_cameras(3),
        intrinsics=input_intrinsics(images),
        options=OPTIONS,
    )
    assert not prediction.is_metric and prediction.focal_source is None
    assert prediction.intrinsics_source == "user intrinsics"
    assert any("unit of the given extrinsics" in note for note in prediction.notes)


def test_posed_nested_prediction_left_in_metres_is_not_called_metric(
    nested_model: DepthAnything3, photo: Photo
) -> None:
    """Depth left in metres beside the given poses in their own unit (align_to_input_scale
    off, or poses that fix no scale): is_metric said metres for both, and the exports'
    units said metres for point clouds placed with poses in another unit."""
    from test_pipeline import input_intrinsics, ring_cameras

    images = [photo("astronaut"), photo("camera"), photo("astronaut")[::-1].copy()]
    kept = dataclasses.replace(OPTIONS, align_to_input_scale=False)
    tripod = ring_cameras(3)
    tripod[:, :3, 3] = 0.0  # one camera centre: no scale to read
    for extrinsics, options in ((ring_cameras(3), kept), (tripod, OPTIONS)):
        prediction = nested_model.predict(
            images, extrinsics=extrinsics, intrinsics=input_intrinsics(images), options=options
        )
        assert not prediction.is_metric and prediction.focal_source is None
        assert any(note.startswith("is_metric is False") for note in prediction.notes)
        np.testing.assert_allclose(prediction.extrinsics[:, :3], extrinsics[:, :3], atol=1e-6)


# --------------------------------------------------------------------------------------------
# All-sky and sky-free images (upstream asserts on an all-sky image for nested models)
# --------------------------------------------------------------------------------------------


def force_sky(head: nn.Module, sky: bool) -> None:
    """Make a sky head answer 'all sky' or 'no sky' whatever the image."""
    last = head.scratch.sky_output_conv2[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1e3 if sky else -1e3)


@pytest.mark.parametrize("sky", [True, False])
def test_single_view_all_sky_and_sky_free_images(
    small_zoo_checkpoint: Zoo, photo: Photo, sky: bool
) -> None:
    folder, _ = small_zoo_checkpoint("metric-small")
    network = load_small(folder, METRIC_SMALL)
    force_sky(network.head, sky)
    model = DepthAnything3(LoadedModel(network, METRIC_SMALL, "forced", folder))
    intrinsics = np.array([[[600.0, 0, 256], [0, 600, 256], [0, 0, 1]]])
    prediction = model.predict([photo("astronaut")], intrinsics=intrinsics, options=OPTIONS)
    assert prediction.sky is not None and bool(prediction.sky.all()) == sky
    assert not prediction.sky.any() or sky
    assert prediction.is_metric and np.all(np.isfinite(prediction.depth))
    # Nothing to fill from (all sky) or nothing to fill (no sky): depth keeps its variation.
    assert prediction.depth.std() > 0


@pytest.mark.parametrize("sky", [True, False])
def test_nested_all_sky_and_sky_free_images(
    small_zoo_checkpoint: Zoo, photo: Photo, sky: bool
) -> None:
    folder, upstream = small_zoo_checkpoint("nested-small")
    network = load_small(folder, NESTED_SMALL)
    force_sky(network.da3_metric.head, sky)
    model = DepthAnything3(LoadedModel(network, NESTED_SMALL, "forced", folder))
    prediction = model.predict([photo("astronaut")], options=OPTIONS)
    assert prediction.sky is not None and bool(prediction.sky.all()) == sky
    assert np.all(np.isfinite(prediction.depth))
    if sky:
        assert not prediction.is_metric and prediction.metric_scale is None
        assert any("too few non-sky pixels" in note for note in prediction.notes)
        forced = copy.deepcopy(upstream)
        force_sky(forced.da3_metric.head, sky=True)
        images = model.network.da3.backbone.pretrained.pos_embed.new_zeros(1, 1, 3, 126, 126)
        with pytest.raises(AssertionError, match="Insufficient non-sky pixels"):
            forced(images)
    else:
        assert prediction.is_metric and prediction.metric_scale is not None
        assert not prediction.notes
