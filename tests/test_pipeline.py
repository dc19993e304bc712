"""da3cog.pipeline on a small random-weight checkpoint: input validation, the Prediction
contract (read-only arrays, shapes, intrinsics per output resolution, world frame),
determinism, mixed-size inputs, pose conditioning and progress reporting."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from da3cog.pipeline import DepthAnything3, InferenceOptions, Prediction

PROCESS_RES = 112
OPTIONS = InferenceOptions(process_res=PROCESS_RES)
Photo = Callable[[str], np.ndarray]
# Bounds on max|reduced - fp32| / std(fp32) of the depth with a bf16 / fp16 backbone, here (3
# views at 112 px, random weights, which amplify rounding) measured at 0.071-0.078 and
# 0.008-0.014.
TOLERANCE_BY_PRECISION = {"bf16": 0.2, "fp16": 0.05}


def look_at(centre: np.ndarray) -> np.ndarray:
    """World-to-camera ``(4, 4)`` of an OpenCV camera at ``centre`` looking at the origin,
    image "down" towards world -z."""
    forward = -centre / np.linalg.norm(centre)
    down = np.array([0.0, 0.0, -1.0])
    down = down - (down @ forward) * forward
    down /= np.linalg.norm(down)
    rotation = np.stack([np.cross(down, forward), down, forward])
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = rotation
    extrinsics[:3, 3] = -rotation @ centre
    return extrinsics


def ring_cameras(count: int = 4) -> np.ndarray:
    """World-to-camera ``(count, 4, 4)`` on an uneven ring (non-collinear centres) looking at
    the origin."""
    angles = np.deg2rad([0.0, 80.0, 170.0, 260.0, 300.0][:count])
    radii = np.array([3.0, 3.5, 2.8, 3.2, 3.0][:count])
    heights = 0.5 + 0.2 * np.arange(count)
    return np.stack(
        [
            look_at(np.array([r * np.cos(a), r * np.sin(a), h]))
            for r, a, h in zip(radii, angles, heights, strict=True)
        ]
    )


def input_intrinsics(images: list[np.ndarray]) -> np.ndarray:
    """Plausible ``(N, 3, 3)`` pixel intrinsics of the input images (off-centre principal point)."""
    matrices = []
    for image in images:
        height, width = image.shape[:2]
        focal = 1.2 * max(height, width)
        matrices.append([[focal, 0, width / 2 + 3.0], [0, focal, height / 2 - 2.0], [0, 0, 1]])
    return np.array(matrices, dtype=np.float64)


@pytest.fixture(scope="module")
def same_size_views(photo: Photo) -> list[np.ndarray]:
    """Four 512x512 RGB views (a greyscale one among them)."""
    astronaut = photo("astronaut")
    return [
        astronaut,
        photo("camera"),
        np.ascontiguousarray(astronaut[:, ::-1]),
        np.ascontiguousarray(astronaut[::-1]),
    ]


@pytest.fixture(scope="module")
def input_prediction(small_model: DepthAnything3, same_size_views: list[np.ndarray]) -> Prediction:
    return small_model.predict(same_size_views[:3], options=OPTIONS)


@pytest.fixture(scope="module")
def processing_prediction(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> Prediction:
    options = dataclasses.replace(OPTIONS, output_resolution="processing")
    return small_model.predict(same_size_views[:3], options=options)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def bad_request(name: str, views: list[np.ndarray]) -> dict[str, Any]:
    extrinsics = ring_cameras(3)
    intrinsics = input_intrinsics(views[:3])
    nan_extrinsics = extrinsics.copy()
    nan_extrinsics[1, 0, 3] = np.nan
    requests: dict[str, dict[str, Any]] = {
        "empty-list": {"images": []},
        "single-string": {"images": "astronaut.png"},
        "single-array": {"images": views[0]},
        "single-pil-image": {"images": Image.fromarray(views[0])},
        "not-iterable": {"images": 3},
        # Channels first: refused as such, not measured as an image 3 pixels tall.
        "channels-first": {"images": [np.zeros((3, 480, 640), dtype=np.uint8)]},
        "extrinsics-without-intrinsics": {"images": views[:3], "extrinsics": extrinsics},
        "intrinsics-without-extrinsics": {"images": views[:3], "intrinsics": intrinsics},
        "too-few-extrinsics": {
            "images": views[:3],
            "extrinsics": extrinsics[:2],
            "intrinsics": intrinsics,
        },
        "too-many-intrinsics": {
            "images": views[:2],
            "extrinsics": extrinsics[:2],
            "intrinsics": intrinsics,
        },
        "nan-extrinsics": {
            "images": views[:3],
            "extrinsics": nan_extrinsics,
            "intrinsics": intrinsics,
        },
        # The last view of a chunked run: refused before the first chunk, not in the last.
        "too-elongated-last-view": {
            "images": [*views[:3], np.zeros((2, 3000, 3), dtype=np.uint8)],
            "options": InferenceOptions(process_res=PROCESS_RES, chunk_size=2),
        },
    }
    return requests[name]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty-list", "non-empty list"),
        ("single-string", "non-empty list"),
        ("single-array", "non-empty list"),
        ("single-pil-image", "got one Image: put it in a list"),
        ("not-iterable", "non-empty list of paths, PIL images or arrays, got int"),
        ("channels-first", r"must have shape \(H, W\).*got \(3, 480, 640\)"),
        ("extrinsics-without-intrinsics", "needs intrinsics as well as extrinsics"),
        ("intrinsics-without-extrinsics", "give extrinsics too, or neither"),
        ("too-few-extrinsics", "got 2 extrinsics for 3 images"),
        ("too-many-intrinsics", r"intrinsics must have shape \(2, 3, 3\)"),
        ("nan-extrinsics", "NaN or infinite"),
        ("too-elongated-last-view", r"image 3 \(3000x2 pixels\) is too elongated"),
    ],
)
def test_bad_requests_fail_with_a_clear_message_before_the_network_runs(
    small_model: DepthAnything3, same_size_views: list[np.ndarray], name: str, message: str
) -> None:
    request = bad_request(name, same_size_views)
    messages: list[str] = []
    with pytest.raises(ValueError, match=message):
        small_model.predict(**request, progress=messages.append)
    assert not any(m.startswith("running") for m in messages)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"reference_strategy": "best"}, ValueError, "unknown reference-view strategy 'best'"),
        ({"output_resolution": "native"}, ValueError, "output_resolution must be one of input"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed must be an integer"),
        ({"loop_closure": "false"}, TypeError, "loop_closure must be true or false"),
        ({"infer_gaussians": 1}, TypeError, "infer_gaussians must be true or false"),
        # A manifest's numbers: whole ones only (4.0 would fail deep inside a running request).
        ({"chunk_size": 4.0}, TypeError, "chunk_size must be a whole number, 'auto' or None"),
        ({"chunk_size": "Auto"}, TypeError, "chunk_size must be a whole number"),
        ({"chunk_size": True}, TypeError, "chunk_size must be a whole number"),
        ({"chunk_size": 4, "chunk_overlap": 2.0}, TypeError, "chunk_overlap must be a whole"),
        ({"chunk_size": 1}, ValueError, "chunk size must be at least 2 views"),
        ({"time_budget": "5"}, TypeError, "time_budget must be a number of seconds"),
        # Refused when the options are made (a manifest's, before any model loads).
        ({"resize_method": "stretch"}, ValueError, "unknown process_res method 'stretch'"),
        ({"process_res": 5000}, ValueError, "between 14 and 4096 pixels, got 5000"),
        ({"process_res": 7}, ValueError, "between 14 and 4096 pixels, got 7"),
        ({"process_res": "336"}, TypeError, "process_res must be an integer"),
    ],
)
def test_inference_options_reject_unknown_values(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        InferenceOptions(**options)


def test_views_may_come_from_any_iterable_and_the_device_by_name(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    """A generator of views failed on len(); a device given by name failed on ``.type``."""
    by_name = DepthAnything3(small_model.loaded, "cpu")
    options = InferenceOptions(process_res=PROCESS_RES)
    listed = by_name.predict(same_size_views[:2], options=options)
    generated = by_name.predict((view for view in same_size_views[:2]), options=options)
    np.testing.assert_array_equal(generated.depth, listed.depth)


def test_numpy_whole_numbers_are_whole_numbers() -> None:
    """NumPy's integers are taken as the numbers they are, as Python's (which torch's
    random generators need)."""
    whole = {"chunk_size": np.int64(4), "chunk_overlap": np.int32(2), "seed": np.int64(7)}
    options = InferenceOptions(**whole, time_budget=np.int64(60))
    assert (options.chunk_size, options.chunk_overlap, options.seed) == (4, 2, 7)
    assert options.time_budget == 60.0 and type(options.time_budget) is float
    assert all(type(value) is int for value in (options.chunk_size, options.chunk_overlap))
    torch.Generator().manual_seed(options.seed)


def test_non_integer_process_res_is_a_type_error(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    with pytest.raises(TypeError, match="process_res must be an integer"):
        small_model.predict(same_size_views[:1], options=InferenceOptions(process_res=112.0))  # type: ignore[arg-type]


def test_missing_image_file_names_the_path(small_model: DepthAnything3, tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        small_model.predict([str(missing)], options=OPTIONS)


# --------------------------------------------------------------------------------------------
# The Prediction contract
# --------------------------------------------------------------------------------------------

ARRAY_FIELDS = ("depth", "confidence", "image", "extrinsics", "intrinsics")


def test_prediction_arrays_are_read_only(input_prediction: Prediction) -> None:
    for view in input_prediction.views:
        for name in ARRAY_FIELDS:
            array = getattr(view, name)
            assert not array.flags.writeable, name
            with pytest.raises(ValueError, match="read-only"):
                array[0, 0] = 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            view.depth = np.zeros((2, 2), dtype=np.float32)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        input_prediction.views = ()  # type: ignore[misc]


def test_prediction_metadata(input_prediction: Prediction, small_checkpoint: Path) -> None:
    assert len(input_prediction) == 3
    assert input_prediction.model_preset == "da3-small"
    assert input_prediction.model_id == str(small_checkpoint)
    assert input_prediction.is_metric is False
    assert input_prediction.pose_conditioned is False
    assert input_prediction.output_resolution == "input"
    assert input_prediction.processing_size == (PROCESS_RES, PROCESS_RES)
    assert input_prediction.notes == ()
    assert input_prediction.precision == "fp32"
    assert input_prediction.reference_view in (0, 1, 2)
    assert [view.name for view in input_prediction.views] == ["view_0000", "view_0001", "view_0002"]


def test_input_resolution_gives_each_view_its_input_size(
    input_prediction: Prediction, same_size_views: list[np.ndarray]
) -> None:
    for view, given in zip(input_prediction.views, same_size_views, strict=False):
        height, width = given.shape[:2]
        assert view.input_size == (height, width)
        assert view.crop_box == (0.0, 0.0, float(width), float(height))
        assert view.depth.shape == view.confidence.shape == (height, width)
        assert (view.height, view.width) == (height, width)
        assert view.depth.dtype == view.confidence.dtype == np.float32
        assert view.image.shape == (height, width, 3) and view.image.dtype == np.uint8
        expected = given if given.ndim == 3 else np.repeat(given[..., None], 3, axis=2)
        assert np.array_equal(view.image, expected)
        assert np.isfinite(view.depth).all() and (view.depth > 0).all()
        assert (view.confidence > 1).all()
    assert input_prediction.depth.shape == (3, 512, 512)
    assert input_prediction.confidence.shape == (3, 512, 512)


def test_processing_resolution_gives_the_processing_size(processing_prediction: Prediction) -> None:
    assert processing_prediction.output_resolution == "processing"
    for view in processing_prediction.views:
        assert view.depth.shape == view.confidence.shape == (PROCESS_RES, PROCESS_RES)
        assert view.image.shape == (PROCESS_RES, PROCESS_RES, 3)
        assert view.input_size == (512, 512)
    assert processing_prediction.depth.shape == (3, PROCESS_RES, PROCESS_RES)


def test_input_intrinsics_are_processing_intrinsics_scaled_to_the_input_size(
    input_prediction: Prediction, processing_prediction: Prediction
) -> None:
    for at_input, at_processing in zip(
        input_prediction.views, processing_prediction.views, strict=True
    ):
        scale_x = at_input.width / at_processing.width
        scale_y = at_input.height / at_processing.height
        expected = at_processing.intrinsics.astype(np.float64).copy()
        expected[0] *= scale_x
        expected[1] *= scale_y
        np.testing.assert_allclose(at_input.intrinsics, expected, rtol=1e-6)
        np.testing.assert_array_equal(at_input.intrinsics[2], [0, 0, 1])
        assert np.array_equal(at_input.extrinsics, at_processing.extrinsics)
        # Depth at the input size is a bilinear upsampling: no values outside the source range.
        assert at_processing.depth.min() - 1e-6 <= at_input.depth.min()
        assert at_input.depth.max() <= at_processing.depth.max() + 1e-6
        np.testing.assert_allclose(at_input.depth.mean(), at_processing.depth.mean(), rtol=0.02)


def test_first_view_is_the_world_frame_and_poses_are_rigid(input_prediction: Prediction) -> None:
    extrinsics = input_prediction.extrinsics
    assert extrinsics.shape == (3, 4, 4) and extrinsics.dtype == np.float32
    assert np.array_equal(extrinsics[0], np.eye(4, dtype=np.float32))
    for matrix in extrinsics:
        np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])
        rotation = matrix[:3, :3].astype(np.float64)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
        assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-4)
    assert input_prediction.intrinsics.shape == (3, 3, 3)
    assert (input_prediction.intrinsics[:, [0, 1], [0, 1]] > 0).all()


def test_predict_is_deterministic(
    small_model: DepthAnything3, same_size_views: list[np.ndarray], input_prediction: Prediction
) -> None:
    again = small_model.predict(same_size_views[:3], options=OPTIONS)
    for first, second in zip(input_prediction.views, again.views, strict=True):
        for name in ARRAY_FIELDS:
            assert np.array_equal(getattr(first, name), getattr(second, name)), name
    assert again.reference_view == input_prediction.reference_view


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_reduced_precision_backbone_runs_on_the_cpu_close_to_fp32_and_says_so(
    small_model: DepthAnything3,
    same_size_views: list[np.ndarray],
    processing_prediction: Prediction,
    precision: str,
) -> None:
    reduced = DepthAnything3(small_model.loaded, small_model.device, precision=precision)
    options = dataclasses.replace(OPTIONS, output_resolution="processing")
    prediction = reduced.predict(same_size_views[:3], options=options)
    assert prediction.precision == precision
    for exact, rounded in zip(processing_prediction.views, prediction.views, strict=True):
        error = np.abs(rounded.depth - exact.depth).max() / exact.depth.std()
        # It did run in the reduced dtype (not fp32), and stays near the float32 result.
        assert 0 < error < TOLERANCE_BY_PRECISION[precision], error


def test_unknown_precision_is_refused(small_model: DepthAnything3) -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        DepthAnything3(small_model.loaded, small_model.device, precision="int8")
    assert DepthAnything3(small_model.loaded, small_model.device).precision == "fp32"


def test_pose_from_rays_is_reproducible_with_a_seed(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    def run(seed: int) -> Prediction:
        options = dataclasses.replace(OPTIONS, pose_from_rays=True, seed=seed)
        return small_model.predict(same_size_views[:2], options=options)

    first, second = run(3), run(3)
    assert np.array_equal(first.extrinsics, second.extrinsics)
    assert np.array_equal(first.intrinsics, second.intrinsics)
    assert np.array_equal(first.depth, second.depth)
    assert np.array_equal(first.extrinsics[0], np.eye(4, dtype=np.float32))
    assert np.isfinite(first.extrinsics).all() and np.isfinite(first.intrinsics).all()
    assert (first.intrinsics[:, [0, 1], [0, 1]] != 0).all()


def test_reference_strategy_first_keeps_view_zero(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    options = dataclasses.replace(OPTIONS, reference_strategy="first")
    prediction = small_model.predict(same_size_views[:3], options=options)
    assert prediction.reference_view == 0


def test_files_and_pil_images_are_named_after_the_file(
    small_model: DepthAnything3, photo: Photo, tmp_path: Path
) -> None:
    from PIL import Image

    path = tmp_path / "chelsea_cat.png"
    Image.fromarray(photo("chelsea")).save(path)
    prediction = small_model.predict([str(path), Image.open(path)], options=OPTIONS)
    assert [view.name for view in prediction.views] == ["chelsea_cat", "chelsea_cat"]
    assert prediction.views[0].depth.shape == photo("chelsea").shape[:2]


# --------------------------------------------------------------------------------------------
# Mixed sizes
# --------------------------------------------------------------------------------------------


def test_mixed_size_inputs_work_per_view_but_not_stacked(
    small_model: DepthAnything3, photo: Photo
) -> None:
    """By default every view comes back whole at its own input size, whatever the others'
    shape; the view resized to the batch's shape says so (note, pixel aspect)."""
    astronaut, coffee = photo("astronaut"), photo("coffee")
    assert astronaut.shape[:2] == (512, 512) and coffee.shape[:2] == (400, 600)
    prediction = small_model.predict([astronaut, coffee], options=OPTIONS)
    with pytest.raises(ValueError, match="different sizes"):
        _ = prediction.depth
    with pytest.raises(ValueError, match="different sizes"):
        _ = prediction.confidence
    assert prediction.extrinsics.shape == (2, 4, 4)
    assert prediction.intrinsics.shape == (2, 3, 3)
    for view, given in zip(prediction.views, (astronaut, coffee), strict=True):
        assert view.crop_box == pytest.approx((0, 0, given.shape[1], given.shape[0]))
        assert view.depth.shape == view.image.shape[:2] == given.shape[:2]
        assert np.array_equal(view.image, given)
        assert np.isfinite(view.depth).all()
        assert view.input_size == given.shape[:2]
    # Ties go to the first view's shape: the wide coffee image was resized to a square.
    assert prediction.views[0].pixel_aspect == pytest.approx(1.0)
    assert prediction.views[1].pixel_aspect == pytest.approx(2 / 3, rel=0.05)
    (note,) = [n for n in prediction.notes if "another shape" in n]
    assert "resized whole" in note and "view_0001 (600x400" in note
    coffee_k = prediction.views[1].intrinsics
    assert coffee_k[0, 2] == pytest.approx(300, rel=0.02) and coffee_k[1, 2] == pytest.approx(
        200, rel=0.02
    )

    # Upstream's centre crop, on request: every view is cut to the smallest height and width
    # (the wide coffee image's), so the square astronaut loses its top and bottom.
    cropped = small_model.predict(
        [astronaut, coffee], options=dataclasses.replace(OPTIONS, mixed_shapes="crop")
    )
    for view, given in zip(cropped.views, (astronaut, coffee), strict=True):
        x0, y0, x1, y1 = view.crop_box
        assert 0 <= x0 < x1 <= given.shape[1] and 0 <= y0 < y1 <= given.shape[0]
        assert view.depth.shape == (round(y1) - round(y0), round(x1) - round(x0))
        assert np.array_equal(view.image, given[round(y0) : round(y1), round(x0) : round(x1)])
    assert cropped.views[1].depth.shape == (400, 600)
    assert cropped.views[0].depth.shape[1] == 512 and cropped.views[0].depth.shape[0] < 512
    (note,) = [n for n in cropped.notes if "another shape" in n]
    assert "centre-cropped" in note

    at_processing = small_model.predict(
        [astronaut, coffee], options=dataclasses.replace(OPTIONS, output_resolution="processing")
    )
    assert at_processing.depth.shape == (2, *at_processing.processing_size)


# --------------------------------------------------------------------------------------------
# Pose conditioning
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posed_prediction(small_model: DepthAnything3, same_size_views: list[np.ndarray]) -> Prediction:
    return small_model.predict(
        same_size_views,
        extrinsics=ring_cameras(4),
        intrinsics=input_intrinsics(same_size_views),
        options=OPTIONS,
    )


def test_pose_conditioned_prediction_returns_the_input_cameras(
    posed_prediction: Prediction, same_size_views: list[np.ndarray]
) -> None:
    assert posed_prediction.pose_conditioned
    assert posed_prediction.notes == ()
    assert posed_prediction.reference_view is None  # posed views keep their order
    assert np.array_equal(posed_prediction.extrinsics, ring_cameras(4).astype(np.float32))
    # The input intrinsics come back in input pixels (up to float32 rounding).
    np.testing.assert_allclose(
        posed_prediction.intrinsics, input_intrinsics(same_size_views), rtol=1e-5
    )
    assert np.isfinite(posed_prediction.depth).all() and (posed_prediction.depth > 0).all()


def test_pose_conditioned_depth_is_in_the_unit_of_the_input_cameras(
    small_model: DepthAnything3, same_size_views: list[np.ndarray], posed_prediction: Prediction
) -> None:
    """Doubling every input translation describes the same scene in half-size units: depth in
    those units doubles (the network sees the same normalised cameras)."""
    doubled = ring_cameras(4)
    doubled[:, :3, 3] *= 2.0
    intrinsics = input_intrinsics(same_size_views)
    prediction = small_model.predict(
        same_size_views, extrinsics=doubled, intrinsics=intrinsics, options=OPTIONS
    )
    np.testing.assert_allclose(prediction.depth, 2.0 * posed_prediction.depth, rtol=1e-4)

    # Without alignment depth keeps the network's own unit; alignment divides it by one scale.
    raw = small_model.predict(
        same_size_views,
        extrinsics=ring_cameras(4),
        intrinsics=intrinsics,
        options=dataclasses.replace(OPTIONS, align_to_input_scale=False),
    )
    ratio = posed_prediction.depth / raw.depth
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)
    assert abs(ratio.flat[0] - 1.0) > 1e-2
    # The poses come back as given, in another unit than depth: the note says so.
    np.testing.assert_allclose(raw.extrinsics, ring_cameras(4), atol=1e-6)
    assert any("not the unit of the given extrinsics" in note for note in raw.notes), raw.notes


def test_posed_depth_does_not_depend_on_where_the_world_origin_is(
    small_model: DepthAnything3, same_size_views: list[np.ndarray], posed_prediction: Prediction
) -> None:
    """The same rig with its world origin 500 km away (UTM-style geo coordinates) describes
    the same cameras: depth must not change. Anchored in float32 (upstream's way) the
    relative poses lost about 0.03 units to rounding on a rig 3 units across."""
    far = ring_cameras(4)
    # World-to-camera of a world shifted by -offset: t' = t - R @ offset.
    offset = np.array([512_345.25, 4_012_678.5, 87.0])
    far[:, :3, 3] -= far[:, :3, :3] @ offset
    prediction = small_model.predict(
        same_size_views,
        extrinsics=far,
        intrinsics=input_intrinsics(same_size_views),
        options=OPTIONS,
    )
    np.testing.assert_allclose(prediction.depth, posed_prediction.depth, rtol=1e-4)


def test_a_single_posed_view_notes_that_the_scale_is_undetermined(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    prediction = small_model.predict(
        same_size_views[:1],
        extrinsics=ring_cameras(1)[:, :3],  # 3x4 extrinsics are accepted
        intrinsics=input_intrinsics(same_size_views[:1]),
        options=OPTIONS,
    )
    assert prediction.pose_conditioned
    assert len(prediction.notes) == 1
    assert "do not determine a scale" in prediction.notes[0]
    assert prediction.notes[0].endswith("depth keeps the network's relative unit")
    assert np.isfinite(prediction.depth).all() and (prediction.depth > 0).all()
    assert np.array_equal(prediction.extrinsics, ring_cameras(1).astype(np.float32))


def test_two_posed_views_give_finite_depth_and_say_the_encoder_sees_their_unit(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    """Upstream's pose normalisation divides by the median camera distance from view 0,
    floored at 0.1: for two views that median is view 0's own 0, so the encoder sees the
    baseline in tenths of the poses' unit (metres and millimetres give different inputs).
    Kept for parity, and said."""
    intrinsics = input_intrinsics(same_size_views[:2])
    prediction = small_model.predict(
        same_size_views[:2], extrinsics=ring_cameras(2), intrinsics=intrinsics, options=OPTIONS
    )
    assert len(prediction.notes) == 1, prediction.notes
    assert prediction.notes[0].startswith(
        "the cameras' median distance from view 0 is under 0.1 in the unit of the given poses "
        "(always so for two views"
    ), prediction.notes
    assert np.isfinite(prediction.depth).all() and (prediction.depth > 0).all()
    in_millimetres = ring_cameras(2)
    in_millimetres[:, :3, 3] *= 1000.0
    millimetres = small_model.predict(
        same_size_views[:2], extrinsics=in_millimetres, intrinsics=intrinsics, options=OPTIONS
    )
    ratio = millimetres.depth / prediction.depth
    assert not np.allclose(ratio, 1000.0, rtol=1e-4)  # what the note warns of


def test_collinear_posed_views_give_finite_depth(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    extrinsics = np.tile(np.eye(4), (3, 1, 1))
    extrinsics[:, :3, 3] = [[0.0, 0, 0], [-0.5, 0, 0], [-1.25, 0, 0]]  # a sideways dolly
    prediction = small_model.predict(
        same_size_views[:3],
        extrinsics=extrinsics,
        intrinsics=input_intrinsics(same_size_views[:3]),
        options=OPTIONS,
    )
    assert prediction.notes == ()
    assert np.isfinite(prediction.depth).all() and (prediction.depth > 0).all()
    assert np.array_equal(prediction.extrinsics, extrinsics.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def test_progress_callback_receives_each_stage(
    small_model: DepthAnything3, same_size_views: list[np.ndarray]
) -> None:
    messages: list[str] = []
    small_model.predict(same_size_views[:2], options=OPTIONS, progress=messages.append)
    assert messages[0] == "decoding 2 image(s)"
    assert "preprocessing" in messages
    assert any(m.startswith("running da3-small on 2 view(s)") for m in messages)
    assert "postprocessing" in messages
    assert messages[-1].startswith("done in ")


def test_crop_methods_map_back_to_the_input_pixels_exactly(
    small_model: DepthAnything3, photo: Photo
) -> None:
    """With a crop resize method the input-resolution view covers the cropped region; its
    intrinsics are the processing intrinsics mapped exactly through the resize and crop, and
    its depth is the processing depth sampled at the input pixel centres."""
    from da3cog.io import prepare_images

    coffee = photo("coffee")
    options = {"process_res": 112, "resize_method": "upper_bound_crop"}
    at_input = small_model.predict([coffee], options=InferenceOptions(**options))
    at_processing = small_model.predict(
        [coffee], options=InferenceOptions(**options, output_resolution="processing")
    )
    geometry = prepare_images([coffee], 112, "upper_bound_crop").views[0]
    view = at_input.views[0]
    left, top = (
        math.ceil(geometry.input_crop_box[0] - 1e-6),
        math.ceil(geometry.input_crop_box[1] - 1e-6),
    )
    expected = geometry.intrinsics_to_input(at_processing.views[0].intrinsics.astype(np.float64))
    expected[0, 2] -= left
    expected[1, 2] -= top
    np.testing.assert_allclose(view.intrinsics, expected, rtol=1e-6)
    assert view.image.shape[:2] == view.depth.shape
    np.testing.assert_array_equal(
        view.image, coffee[top : top + view.height, left : left + view.width]
    )
    # A pixel centre of the input maps to processing coordinates through scale and offset.
    row, col = view.height // 2, view.width // 3
    u = (col + left + 0.5) * geometry.scale_x - geometry.offset_x - 0.5
    v = (row + top + 0.5) * geometry.scale_y - geometry.offset_y - 0.5
    source = at_processing.views[0].depth
    c0, r0 = int(np.floor(u)), int(np.floor(v))
    fu, fv = u - c0, v - r0
    bilinear = (
        source[r0, c0] * (1 - fu) * (1 - fv)
        + source[r0, c0 + 1] * fu * (1 - fv)
        + source[r0 + 1, c0] * (1 - fu) * fv
        + source[r0 + 1, c0 + 1] * fu * fv
    )
    assert view.depth[row, col] == pytest.approx(bilinear, rel=1e-5)


def test_an_input_resolution_view_covers_the_whole_pixels_its_crop_box_names(
    small_model: DepthAnything3,
) -> None:
    """A crop whose edges fall between input pixels: the view's image and maps are the
    whole pixels inside, and crop_box names exactly those (it gave the fractional edges, so
    view pixel u was input pixel x0 + u off by up to a pixel)."""
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in ((91, 137, 3), (150, 101, 3))]
    options = InferenceOptions(
        process_res=70, resize_method="lower_bound_crop", mixed_shapes="crop"
    )
    prediction = small_model.predict([images[0], images[1], images[0]], options=options)
    for view, given in zip(prediction.views, [images[0], images[1], images[0]], strict=True):
        x0, y0, x1, y1 = view.crop_box
        assert all(float(edge).is_integer() for edge in view.crop_box), view.crop_box
        assert view.depth.shape == (y1 - y0, x1 - x0)
        assert np.array_equal(view.image, given[int(y0) : int(y1), int(x0) : int(x1)])
    processing = small_model.predict(
        [images[0], images[1], images[0]],
        options=dataclasses.replace(options, output_resolution="processing"),
    )
    fractional = sum(
        not float(edge).is_integer() for view in processing.views for edge in view.crop_box
    )
    assert fractional, "the case has a crop edge between pixels"
