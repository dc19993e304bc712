"""Image loading and preprocessing: parity with the DA3 reference, geometry, error paths."""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from _torchvision_shim import install_torchvision_shim
from PIL import Image, features

from da3cog.io import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_SIZE,
    PROCESS_METHODS,
    PreparedBatch,
    ViewGeometry,
    image_name,
    load_image,
    prepare_images,
)

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")
RESIZE_METHODS = tuple(method for method in PROCESS_METHODS if method.endswith("_resize"))
CROP_METHODS = tuple(method for method in PROCESS_METHODS if method.endswith("_crop"))


@functools.cache
def photo(name: str) -> np.ndarray:
    """A real ``(H, W, 3)`` uint8 photo from scikit-image's bundled data."""
    if name == "motorcycle":
        left, _right, _disparity = skimage.data.stereo_motorcycle()
        return left
    return getattr(skimage.data, name)()


def make_intrinsics(images: Sequence[np.ndarray]) -> np.ndarray:
    """Plausible ``(N, 3, 3)`` float64 intrinsics, with skew and an off-centre principal point."""
    matrices = []
    for image in images:
        height, width = image.shape[:2]
        longest = max(height, width)
        matrices.append(
            [
                [1.2 * longest, 0.3, width / 2 + 3.25],
                [0.0, 1.1 * longest, height / 2 - 1.75],
                [0.0, 0.0, 1.0],
            ]
        )
    return np.array(matrices, dtype=np.float64)


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    install_torchvision_shim()
    # The oracle is a test dependency (.ci/run installs it): its absence is a failure, not a skip.
    return importlib.import_module("depth_anything_3.utils.io.input_processor")


def run_reference(
    reference: ModuleType,
    images: Sequence[np.ndarray],
    process_res: int,
    method: str,
    intrinsics: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    processor = reference.InputProcessor()
    tensor, _extrinsics, adjusted = processor(
        image=list(images),
        intrinsics=None if intrinsics is None else intrinsics.copy(),
        process_res=process_res,
        process_res_method=method,
        num_workers=1,
        sequential=True,
    )
    return tensor, adjusted


def assert_matches_reference(
    reference: ModuleType,
    images: Sequence[np.ndarray],
    process_res: int,
    method: str,
    intrinsics: np.ndarray | None,
) -> PreparedBatch:
    expected_images, expected_intrinsics = run_reference(
        reference, images, process_res, method, intrinsics
    )
    batch = prepare_images(
        images, process_res=process_res, method=method, intrinsics=intrinsics, mixed_shapes="crop"
    )

    assert batch.images.dtype == torch.float32
    assert batch.images.shape == expected_images.shape
    assert torch.equal(batch.images, expected_images)

    if intrinsics is None:
        assert batch.intrinsics is None
        assert expected_intrinsics is None
    else:
        assert batch.intrinsics is not None and expected_intrinsics is not None
        assert batch.intrinsics.dtype == torch.float32
        torch.testing.assert_close(batch.intrinsics, expected_intrinsics, rtol=1e-6, atol=1e-4)

    assert_batch_consistent(batch)
    return batch


def assert_batch_consistent(batch: PreparedBatch) -> None:
    """``rgb``, ``images`` and ``views`` describe the same processed pixels."""
    count, channels, height, width = batch.images.shape
    assert channels == 3
    assert height % PATCH_SIZE == 0 and width % PATCH_SIZE == 0
    assert batch.rgb.dtype == np.uint8
    assert batch.rgb.shape == (count, height, width, 3)
    assert batch.num_views == count
    assert batch.processing_size == (height, width)
    assert all(view.processing_size == (height, width) for view in batch.views)

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    renormalised = torch.from_numpy(batch.rgb).permute(0, 3, 1, 2).float().div(255)
    assert torch.equal(renormalised.sub(mean).div(std), batch.images)


# --------------------------------------------------------------------------------------------
# Parity with the reference InputProcessor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_res", [504, 140])
@pytest.mark.parametrize("method", PROCESS_METHODS)
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_single_photo_matches_reference(
    reference: ModuleType, name: str, method: str, process_res: int
) -> None:
    images = [photo(name)]
    assert_matches_reference(reference, images, process_res, method, make_intrinsics(images))


@pytest.mark.parametrize("with_intrinsics", [True, False])
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_upsampling_matches_reference(
    reference: ModuleType, method: str, with_intrinsics: bool
) -> None:
    images = [photo("chelsea")]  # 300x451, so 700 enlarges it with every method
    intrinsics = make_intrinsics(images) if with_intrinsics else None
    batch = assert_matches_reference(reference, images, 700, method, intrinsics)
    assert batch.views[0].scale_x > 1.0


@pytest.mark.parametrize("process_res", [504, 140, 700])
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_mixed_sizes_match_reference(
    reference: ModuleType, method: str, process_res: int, caplog: pytest.LogCaptureFixture
) -> None:
    images = [photo(name) for name in PHOTO_NAMES]
    with caplog.at_level(logging.WARNING, logger="da3cog.io.preprocess"):
        batch = assert_matches_reference(
            reference, images, process_res, method, make_intrinsics(images)
        )
    assert "centre-cropping" in caplog.text
    assert any(view.offset_x > 0 or view.offset_y > 0 for view in batch.views)


@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_mixed_sizes_without_intrinsics_match_reference(reference: ModuleType, method: str) -> None:
    images = [photo(name) for name in PHOTO_NAMES]
    assert_matches_reference(reference, images, 504, method, None)


@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_same_size_batch_matches_reference(
    reference: ModuleType, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    images = [photo("coffee"), np.ascontiguousarray(photo("coffee")[::-1])]
    intrinsics = make_intrinsics(images)
    with caplog.at_level(logging.WARNING, logger="da3cog.io.preprocess"):
        assert_matches_reference(reference, images, 504, method, intrinsics)
    assert "centre-cropping" not in caplog.text


def test_float32_intrinsics_match_reference(reference: ModuleType) -> None:
    images = [photo("rocket"), photo("astronaut")]
    intrinsics = make_intrinsics(images).astype(np.float32)
    assert_matches_reference(reference, images, 140, "upper_bound_crop", intrinsics)


def test_process_res_equal_to_side_skips_boundary_resize(reference: ModuleType) -> None:
    images = [photo("astronaut")]  # 512x512
    batch = assert_matches_reference(reference, images, 512, "upper_bound_crop", None)
    view = batch.views[0]
    assert (view.scale_x, view.scale_y) == (1.0, 1.0)
    assert view.processing_size == (504, 504)
    assert (view.offset_x, view.offset_y) == (4.0, 4.0)
    assert np.array_equal(batch.rgb[0], photo("astronaut")[4:508, 4:508])


# --------------------------------------------------------------------------------------------
# ViewGeometry
# --------------------------------------------------------------------------------------------


def gaussian_blob_image(height: int, width: int, centre_u: float, centre_v: float) -> np.ndarray:
    """uint8 RGB image of one Gaussian spot centred at continuous pixel coords (u, v)."""
    u = np.arange(width) + 0.5
    v = np.arange(height) + 0.5
    squared = (u[None, :] - centre_u) ** 2 + (v[:, None] - centre_v) ** 2
    intensity = np.round(255.0 * np.exp(-squared / (2 * 6.0**2))).astype(np.uint8)
    return np.repeat(intensity[:, :, None], 3, axis=2)


@pytest.mark.parametrize("process_res", [140, 700])
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_geometry_maps_input_pixels_to_processed_pixels(method: str, process_res: int) -> None:
    centre_u, centre_v = 231.3, 141.8
    image = gaussian_blob_image(300, 460, centre_u, centre_v)
    batch = prepare_images([image], process_res=process_res, method=method)
    view = batch.views[0]

    weights = batch.rgb[0, :, :, 0].astype(np.float64)
    height, width = weights.shape
    found_u = float((weights * (np.arange(width) + 0.5)[None, :]).sum() / weights.sum())
    found_v = float((weights * (np.arange(height) + 0.5)[:, None]).sum() / weights.sum())

    assert found_u == pytest.approx(centre_u * view.scale_x - view.offset_x, abs=0.1)
    assert found_v == pytest.approx(centre_v * view.scale_y - view.offset_y, abs=0.1)
    mapped = view.input_to_processing_matrix @ np.array([centre_u, centre_v, 1.0])
    assert mapped[:2] == pytest.approx([found_u, found_v], abs=0.1)


@pytest.mark.parametrize("process_res", [504, 140, 700])
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_geometry_is_consistent_with_the_resize_done(method: str, process_res: int) -> None:
    images = [photo(name) for name in PHOTO_NAMES]
    batch = prepare_images(images, process_res=process_res, method=method, mixed_shapes="crop")
    assert_batch_consistent(batch)
    for image, view in zip(images, batch.views, strict=True):
        input_height, input_width = image.shape[:2]
        assert view.input_size == (input_height, input_width)
        resized_width = round(input_width * view.scale_x)
        resized_height = round(input_height * view.scale_y)
        assert resized_width * input_height == pytest.approx(
            resized_height * input_width, rel=0.05
        ), "the aspect ratio is kept up to rounding"
        if method.endswith("_resize"):
            assert resized_width % PATCH_SIZE == 0 and resized_height % PATCH_SIZE == 0
        bound = max if method.startswith("upper_bound") else min
        boundary_side = bound(resized_width, resized_height)
        assert abs(boundary_side - process_res) <= PATCH_SIZE // 2
        proc_height, proc_width = view.processing_size
        assert view.offset_x.is_integer() and view.offset_y.is_integer()
        assert 0 <= view.offset_x <= resized_width - proc_width
        assert 0 <= view.offset_y <= resized_height - proc_height

        x0, y0, x1, y1 = view.input_crop_box
        assert 0.0 <= x0 < x1 <= input_width + 1e-9
        assert 0.0 <= y0 < y1 <= input_height + 1e-9
        assert (x1 - x0) * view.scale_x == pytest.approx(proc_width)
        assert (y1 - y0) * view.scale_y == pytest.approx(proc_height)


def test_crop_box_is_whole_image_without_cropping() -> None:
    image = np.zeros((280, 420, 3), dtype=np.uint8)
    view = prepare_images([image], process_res=504, method="upper_bound_resize").views[0]
    assert view.processing_size == (336, 504)
    assert (view.offset_x, view.offset_y) == (0.0, 0.0)
    assert view.input_crop_box == pytest.approx((0.0, 0.0, 420.0, 280.0))


@pytest.fixture
def cropped_view() -> ViewGeometry:
    portrait = np.ascontiguousarray(photo("coffee").transpose(1, 0, 2))
    images = [photo("coffee"), portrait, photo("chelsea")]
    batch = prepare_images(images, process_res=504, method="upper_bound_crop", mixed_shapes="crop")
    view = batch.views[2]
    assert view.offset_x > 0 and view.offset_y > 0
    return view


def test_intrinsics_round_trip_numpy(cropped_view: ViewGeometry) -> None:
    single = make_intrinsics([photo("astronaut")])[0]
    processed = cropped_view.intrinsics_to_processing(single)
    assert processed.shape == (3, 3) and processed.dtype == np.float64
    np.testing.assert_allclose(cropped_view.intrinsics_to_input(processed), single, rtol=1e-12)
    np.testing.assert_allclose(processed, cropped_view.input_to_processing_matrix @ single)

    stacked = make_intrinsics([photo(name) for name in PHOTO_NAMES])
    processed_stack = cropped_view.intrinsics_to_processing(stacked)
    assert processed_stack.shape == stacked.shape
    np.testing.assert_allclose(
        processed_stack[1], cropped_view.intrinsics_to_processing(stacked[1])
    )
    np.testing.assert_allclose(
        cropped_view.intrinsics_to_input(processed_stack), stacked, rtol=1e-12
    )


def test_intrinsics_round_trip_torch(cropped_view: ViewGeometry) -> None:
    stacked = torch.from_numpy(make_intrinsics([photo(name) for name in PHOTO_NAMES]))
    processed = cropped_view.intrinsics_to_processing(stacked)
    assert isinstance(processed, torch.Tensor) and processed.dtype == torch.float64
    torch.testing.assert_close(cropped_view.intrinsics_to_input(processed), stacked)

    single32 = stacked[0].float()
    processed32 = cropped_view.intrinsics_to_processing(single32)
    assert processed32.dtype == torch.float32
    torch.testing.assert_close(cropped_view.intrinsics_to_input(processed32), single32)


def test_intrinsics_transforms_do_not_modify_their_input(cropped_view: ViewGeometry) -> None:
    original = make_intrinsics([photo("astronaut")])[0]
    kept = original.copy()
    cropped_view.intrinsics_to_processing(original)
    cropped_view.intrinsics_to_input(original)
    assert np.array_equal(original, kept)


def test_integer_intrinsics_become_float(cropped_view: ViewGeometry) -> None:
    integer = np.array([[500, 0, 256], [0, 500, 256], [0, 0, 1]])
    processed = cropped_view.intrinsics_to_processing(integer)
    assert processed.dtype == np.float64
    assert processed[0, 0] == pytest.approx(500 * cropped_view.scale_x)
    assert processed[0, 2] == pytest.approx(256 * cropped_view.scale_x - cropped_view.offset_x)


def test_batch_intrinsics_follow_view_geometry() -> None:
    images = [photo("chelsea"), photo("motorcycle")]
    intrinsics = make_intrinsics(images)
    batch = prepare_images(
        images, process_res=140, method="lower_bound_crop", intrinsics=intrinsics
    )
    assert batch.intrinsics is not None
    for index, view in enumerate(batch.views):
        back = view.intrinsics_to_input(batch.intrinsics[index].double().numpy())
        np.testing.assert_allclose(back, intrinsics[index], rtol=1e-5)


def test_intrinsics_transform_rejects_wrong_shape(cropped_view: ViewGeometry) -> None:
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        cropped_view.intrinsics_to_processing(np.eye(4))


def test_view_geometry_is_frozen(cropped_view: ViewGeometry) -> None:
    with pytest.raises(AttributeError):
        cropped_view.scale_x = 2.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# prepare_images input handling and validation
# --------------------------------------------------------------------------------------------


def test_prepare_images_accepts_paths_and_pil(tmp_path: Path) -> None:
    path = tmp_path / "coffee.png"
    Image.fromarray(photo("coffee")).save(path)
    from_array = prepare_images([photo("coffee")], process_res=140)
    from_path = prepare_images([path], process_res=140)
    from_pil = prepare_images([Image.fromarray(photo("coffee"))], process_res=140)
    assert torch.equal(from_array.images, from_path.images)
    assert torch.equal(from_array.images, from_pil.images)


def test_prepare_images_converts_grey_and_rgba_arrays() -> None:
    grey = photo("coffee")[:, :, 1]
    rgba = np.dstack([photo("coffee"), np.full(grey.shape, 7, dtype=np.uint8)])
    grey_batch = prepare_images([grey], process_res=140)
    assert np.array_equal(grey_batch.rgb[0, :, :, 0], grey_batch.rgb[0, :, :, 2])
    rgba_batch = prepare_images([rgba], process_res=140)
    rgb_batch = prepare_images([photo("coffee")], process_res=140)
    assert torch.equal(rgba_batch.images, rgb_batch.images)


def test_prepare_images_rejects_empty_sequence() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        prepare_images([])


def test_prepare_images_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown process_res method 'bicubic'") as error:
        prepare_images([photo("coffee")], method="bicubic")
    for method in PROCESS_METHODS:
        assert method in str(error.value)


@pytest.mark.parametrize("process_res", [0, 13, 4097, -504])
def test_prepare_images_rejects_out_of_range_process_res(process_res: int) -> None:
    with pytest.raises(ValueError, match="process_res must be between 14 and 4096"):
        prepare_images([photo("coffee")], process_res=process_res)


@pytest.mark.parametrize("process_res", [504.0, True, "504"])
def test_prepare_images_rejects_non_integer_process_res(process_res: Any) -> None:
    with pytest.raises(TypeError, match="process_res must be an integer"):
        prepare_images([photo("coffee")], process_res=process_res)


def test_prepare_images_accepts_numpy_integer_process_res() -> None:
    batch = prepare_images([photo("coffee")], process_res=np.int64(140))
    assert batch.processing_size == (98, 140)


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 3), (3, 3), (1, 3, 4), (1, 4, 4), (1, 9)],
)
def test_prepare_images_rejects_intrinsics_shape(shape: tuple[int, ...]) -> None:
    intrinsics = np.zeros(shape)
    with pytest.raises(ValueError, match=r"intrinsics must have shape \(N, 3, 3\) with N = 1"):
        prepare_images([photo("coffee")], intrinsics=intrinsics)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_prepare_images_rejects_non_finite_intrinsics(bad_value: float) -> None:
    intrinsics = make_intrinsics([photo("coffee")])
    intrinsics[0, 0, 2] = bad_value
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_images([photo("coffee")], intrinsics=intrinsics)


@pytest.mark.parametrize(("row", "value"), [(0, 0.0), (1, -300.0)])
def test_prepare_images_rejects_non_positive_focal_length(row: int, value: float) -> None:
    images = [photo("coffee"), photo("chelsea")]
    intrinsics = make_intrinsics(images)
    intrinsics[1, row, row] = value
    with pytest.raises(ValueError, match=r"views \[1\] have non-positive focal lengths"):
        prepare_images(images, intrinsics=intrinsics)


def test_prepare_images_rejects_intrinsics_with_wrong_last_row() -> None:
    intrinsics = make_intrinsics([photo("coffee")])
    intrinsics[0, 2] = [0.0, 0.0, 2.0]
    with pytest.raises(ValueError, match=r"last row \(0, 0, 1\)"):
        prepare_images([photo("coffee")], intrinsics=intrinsics)


@pytest.mark.parametrize("method", ["upper_bound_resize", "upper_bound_crop"])
def test_prepare_images_rejects_too_elongated_images(method: str) -> None:
    sliver = np.zeros((10, 1000, 3), dtype=np.uint8)  # 504x5 after the boundary resize
    with pytest.raises(ValueError, match=r"image 0 \(1000x10 pixels\) is too elongated"):
        prepare_images([sliver], process_res=504, method=method)


def test_prepare_images_reports_bad_arrays() -> None:
    with pytest.raises(ValueError, match="dtype uint8"):
        prepare_images([photo("coffee").astype(np.int32)])


# --------------------------------------------------------------------------------------------
# load_image: files
# --------------------------------------------------------------------------------------------


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall, left half red
    stored[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the display is the stored image rotated 90° clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    for decoded in (load_image(path), load_image(str(path)), load_image(Image.open(path))):
        assert decoded.shape == (40, 20, 3)
        assert decoded.dtype == np.uint8
        # Rotating clockwise brings the stored left half to the top.
        assert decoded[:20, :, 0].mean() > 200
        assert decoded[20:, :, 0].mean() < 50


def test_a_pngs_exif_counts_before_its_pixels_only(tmp_path: Path) -> None:
    """A PNG's eXIf chunk after the pixel data: the header reading (size checks, the scene's
    shape in chunked runs) ignored it and the decoding turned the image by it, so chunks
    saw every view squashed to the other orientation. Both follow the header now; an eXIf
    before the pixels turns the image for both."""
    import struct
    import zlib

    from da3cog.io.images import source_size

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    leading, trailing = tmp_path / "leading.png", tmp_path / "trailing.png"
    Image.fromarray(stored).save(leading, exif=exif)
    Image.fromarray(stored).save(trailing)
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    data = trailing.read_bytes()
    end = data.rfind(b"\x00\x00\x00\x00IEND")
    trailing.write_bytes(data[:end] + chunk + data[end:])
    assert source_size(leading) == (20, 40) and load_image(leading).shape == (40, 20, 3)
    assert source_size(trailing) == (40, 20) and load_image(trailing).shape == (20, 40, 3)


def test_load_image_png_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rocket.png"
    Image.fromarray(photo("rocket")).save(path)
    assert np.array_equal(load_image(path), photo("rocket"))


def test_load_image_webp_round_trip(tmp_path: Path) -> None:
    if not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    path = tmp_path / "chelsea.webp"
    Image.fromarray(photo("chelsea")).save(path, lossless=True)
    assert np.array_equal(load_image(path), photo("chelsea"))


def test_load_image_heic_round_trip(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    path = tmp_path / "astronaut.heic"
    try:
        pillow_heif.from_pillow(Image.fromarray(photo("astronaut"))).save(path, quality=95)
    except Exception as error:  # no HEVC encoder in this pillow-heif build
        pytest.skip(f"pillow-heif cannot write HEIC here: {error}")
    decoded = load_image(path)
    assert decoded.shape == photo("astronaut").shape
    assert decoded.dtype == np.uint8
    difference = np.abs(decoded.astype(np.int16) - photo("astronaut").astype(np.int16))
    assert difference.mean() < 6.0


def test_load_image_drops_alpha_and_expands_grey_files(tmp_path: Path) -> None:
    rgba = np.dstack([photo("coffee"), np.full(photo("coffee").shape[:2], 9, dtype=np.uint8)])
    rgba_path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(rgba_path)
    assert np.array_equal(load_image(rgba_path), photo("coffee"))

    grey = photo("coffee")[:, :, 0]
    grey_path = tmp_path / "grey.png"
    Image.fromarray(grey).save(grey_path)
    assert np.array_equal(load_image(grey_path), np.repeat(grey[:, :, None], 3, axis=2))


def test_load_image_rescales_16_bit_grey_files(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 100], [65535, 128, 129]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    decoded = load_image(path)
    assert decoded.shape == (2, 3, 3)
    assert np.array_equal(decoded[:, :, 0], [[0, 1, 100], [255, 0, 1]])
    assert np.array_equal(decoded[:, :, 0], decoded[:, :, 2])


def test_load_image_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jpg"):
        load_image(path)


def test_load_image_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ValueError, match=r"notes\.jpg is not an image in an accepted format"):
        load_image(path)


def test_load_image_truncated_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole.jpg"
    Image.fromarray(photo("astronaut")).save(whole, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cannot decode image file .*truncated\.jpg"):
        load_image(truncated)


def test_load_image_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(tmp_path)


# --------------------------------------------------------------------------------------------
# load_image: arrays and PIL images
# --------------------------------------------------------------------------------------------


def test_load_image_returns_rgb_uint8_arrays_without_copying() -> None:
    image = photo("coffee")
    decoded = load_image(image)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.shares_memory(decoded, image)


def test_load_image_makes_strided_arrays_contiguous() -> None:
    flipped = photo("coffee")[:, ::-1]
    decoded = load_image(flipped)
    assert decoded.flags.c_contiguous
    assert np.array_equal(decoded, flipped)


@pytest.mark.parametrize("shape", [(30, 40), (30, 40, 1)])
def test_load_image_expands_grey_arrays(shape: tuple[int, ...]) -> None:
    grey = np.arange(30 * 40, dtype=np.uint8).reshape(shape)
    decoded = load_image(grey)
    assert decoded.shape == (30, 40, 3)
    for channel in range(3):
        assert np.array_equal(decoded[:, :, channel], grey.reshape(30, 40))


def test_load_image_drops_alpha_from_arrays() -> None:
    rgba = np.dstack([photo("chelsea"), np.zeros(photo("chelsea").shape[:2], dtype=np.uint8)])
    assert np.array_equal(load_image(rgba), photo("chelsea"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_image_rounds_unit_float_arrays(dtype: type[np.floating]) -> None:
    values = np.array([[0.0, 0.5, 1.0], [0.1, 0.998, 0.002]], dtype=dtype)
    decoded = load_image(values)
    expected = np.round(values.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(decoded[:, :, 1], expected)
    assert decoded[0, 1, 0] == 128  # round(127.5) with half-to-even


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 5, 2), dtype=np.uint8), "must have shape"),
        (np.zeros((4, 5, 3, 1), dtype=np.uint8), "must have shape"),
        (np.zeros((5,), dtype=np.uint8), "must have shape"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
        (np.zeros((4, 0), dtype=np.uint8), "empty"),
        (np.zeros((4, 5, 3), dtype=np.uint16), "dtype uint8"),
        (np.zeros((4, 5, 3), dtype=bool), "dtype uint8"),
        (np.full((4, 5, 3), 2.0), r"values in \[0, 1\]"),
        (np.full((4, 5, 3), -0.5), r"values in \[0, 1\]"),
        (np.full((4, 5, 3), np.nan), "NaN or infinite"),
    ],
)
def test_load_image_rejects_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_image(array)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_load_image_converts_pil_modes(mode: str) -> None:
    decoded = load_image(Image.new(mode, (7, 5)))
    assert decoded.shape == (5, 7, 3)
    assert decoded.dtype == np.uint8


def test_load_image_rejects_empty_pil_image() -> None:
    with pytest.raises(ValueError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize("source", [None, 42, b"bytes", [[0, 1]]])
def test_load_image_rejects_unsupported_types(source: Any) -> None:
    with pytest.raises(TypeError, match=r"file path, a PIL\.Image\.Image or a numpy array"):
        load_image(source)


# --------------------------------------------------------------------------------------------
# image_name
# --------------------------------------------------------------------------------------------


def test_image_name(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0042.final.jpg"
    Image.fromarray(photo("coffee")).save(path)
    assert image_name(path, 0) == "IMG_0042.final"
    assert image_name(str(path), 5) == "IMG_0042.final"
    assert image_name(Image.open(path), 5) == "IMG_0042.final"
    assert image_name(photo("coffee"), 3) == "view_0003"
    assert image_name(Image.fromarray(photo("coffee")), 12) == "view_0012"


@pytest.mark.parametrize(
    "content",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        b"8BPS\x00\x01" + b"\x00" * 40,
        b"SIMPLE  =                    T" + b" " * 50,
        b"GIF89a" + b"\x00" * 40,
    ],
)
def test_load_image_decodes_only_the_listed_formats_by_content(
    tmp_path: Path, content: bytes
) -> None:
    """Formats Pillow knows but da3cog does not advertise (EPS runs Ghostscript) are refused
    by their bytes, whatever the file is called."""
    from da3cog.io.images import ImageDecodeError

    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="not an image in an accepted format"):
        load_image(path)


def test_load_image_refuses_a_header_over_max_pixels_before_decoding(tmp_path: Path) -> None:
    from da3cog.io.images import ImageDecodeError, read_image_header

    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(path)
    assert read_image_header(path).pixels == 2000
    assert load_image(path, max_pixels=2000).shape == (40, 50, 3)
    with pytest.raises(ImageDecodeError, match=r"50x40 = 0\.0 MP; the limit is 0\.0 MP"):
        load_image(path, max_pixels=1999)


def test_wide_greyscale_files_are_scaled_by_their_range_or_refused(tmp_path: Path) -> None:
    """32-bit float files in [0, 1] map like float arrays; 32-bit integers up to 255 or 65535
    read as 8- or 16-bit; anything else is refused rather than clipped to black or white."""
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    grey = load_image(path)[:, :, 0]
    assert np.array_equal(grey, np.round(values * 255).astype(np.uint8))
    for high, expected_max in ((200, 200), (65535, 255)):
        Image.fromarray(np.full((4, 4), high, dtype=np.int32), mode="I").save(path)
        assert load_image(path).max() == expected_max
    Image.fromarray(np.full((4, 4), 2.5, dtype=np.float32), mode="F").save(path)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got range \[2.5, 2.5\]"):
        load_image(path)
    Image.fromarray(np.full((4, 4), -3, dtype=np.int32), mode="I").save(path)
    with pytest.raises(ValueError, match="32-bit integer greyscale"):
        load_image(path)


# --------------------------------------------------------------------------------------------
# Views of different shapes
# --------------------------------------------------------------------------------------------


def test_mixed_shapes_resize_keeps_every_whole_frame() -> None:
    """The default: a view of another shape than most is resized whole to their size (one
    resize from the input), so its crop box is its whole image; the others are untouched."""
    landscape = photo("coffee")  # 400 x 600
    square = np.ascontiguousarray(landscape[:, 100:500])  # 400 x 400
    images = [landscape, square, landscape]
    batch = prepare_images(images, process_res=140)
    assert batch.reshaped == (1,)
    same = prepare_images([landscape], process_res=140)
    assert batch.processing_size == same.processing_size == (98, 140)
    assert torch.equal(batch.images[0], same.images[0])
    assert torch.equal(batch.images[2], same.images[0])
    view = batch.views[1]
    assert view.input_crop_box == pytest.approx((0.0, 0.0, 400.0, 400.0))
    assert view.pixel_aspect == pytest.approx((140 / 400) / (98 / 400))
    expected = cv2.resize(square, (140, 98), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(batch.rgb[1], expected)
    # Intrinsics follow each axis's own scale.
    K = np.array([[300.0, 0, 200], [0, 300.0, 200], [0, 0, 1]])
    processed = view.intrinsics_to_processing(K)
    assert processed[0, 0] == pytest.approx(300 * 140 / 400)
    assert processed[1, 1] == pytest.approx(300 * 98 / 400)
    np.testing.assert_allclose(view.intrinsics_to_input(processed), K)


def test_mixed_shapes_crop_is_upstreams_centre_crop() -> None:
    landscape = photo("coffee")
    square = np.ascontiguousarray(landscape[:, 100:500])
    batch = prepare_images([landscape, square], process_res=140, mixed_shapes="crop")
    assert batch.reshaped == (1,)
    x0, y0, x1, y1 = batch.views[1].input_crop_box
    assert (x0, x1) == pytest.approx((0.0, 400.0)) and y1 - y0 < 400


def test_the_common_size_is_the_one_most_views_have() -> None:
    from da3cog.io.preprocess import common_size

    assert common_size([(98, 140), (140, 140), (140, 140)]) == (140, 140)
    assert common_size([(98, 140), (140, 140)]) == (98, 140), "ties: the first view's"


@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_a_views_processing_size_is_known_from_its_size_alone(method: str) -> None:
    """What the chunked path plans with before decoding: the size prepare_images gives a
    view, for every method, odd and extreme shapes included."""
    from da3cog.io.preprocess import processing_size

    rng = np.random.default_rng(4)
    sizes = [(97, 131), (500, 37), (37, 500), (504, 504), (2000, 14), (33, 29)]
    sizes += [tuple(int(v) for v in rng.integers(20, 900, size=2)) for _ in range(20)]
    for process_res in (112, 504):
        for height, width in sizes:
            image = np.zeros((height, width, 3), dtype=np.uint8)
            try:
                batch = prepare_images([image], process_res=process_res, method=method)
            except ValueError as refused:
                with pytest.raises(ValueError, match="too elongated") as also:
                    processing_size((height, width), process_res, method)
                assert str(also.value) == str(refused)
                continue
            expected = batch.processing_size
            assert processing_size((height, width), process_res, method) == expected


def test_part_of_a_scene_is_fitted_to_the_scenes_shape() -> None:
    """Views processed as part of a larger scene (a chunk) take the scene's shape, not the
    one most of them have: resized whole, or centre-cropped; a crop larger than a view is
    refused."""
    from da3cog.io.preprocess import scene_processing_shape

    landscape = photo("coffee")  # 400 x 600: 98 x 140 at 140
    square = np.ascontiguousarray(landscape[:, 100:500])  # 140 x 140
    sizes = [(98, 140), (140, 140), (140, 140)]
    assert scene_processing_shape(sizes, "resize") == (140, 140)
    assert scene_processing_shape(sizes, "crop") == (98, 140)
    part = prepare_images([landscape, landscape], process_res=140, scene_shape=(140, 140))
    assert part.processing_size == (140, 140) and part.reshaped == (0, 1)
    alone = prepare_images([square], process_res=140, scene_shape=(98, 140), mixed_shapes="crop")
    assert alone.processing_size == (98, 140) and alone.reshaped == (0,)
    with pytest.raises(ValueError, match="cannot be cropped to"):
        prepare_images([landscape], process_res=140, scene_shape=(140, 140), mixed_shapes="crop")


def test_unknown_mixed_shapes_is_refused() -> None:
    with pytest.raises(ValueError, match="mixed_shapes must be one of resize, crop"):
        prepare_images([photo("coffee")], mixed_shapes="pad")


# --------------------------------------------------------------------------------------------
# Headers and EXIF that disagree with the pixels (read-only review, 2026-12-07)
# --------------------------------------------------------------------------------------------


# 4 mm on a sensor of 100 px a mm: 400 px on both axes, for a captured frame of 400 x 300.
SENSOR_TAGS = {
    "FocalLength": 4.0,
    "FocalPlaneXResolution": 100.0,
    "FocalPlaneYResolution": 100.0,
    "FocalPlaneResolutionUnit": 4,
    "PixelXDimension": 400,
    "PixelYDimension": 300,
}


def test_a_rotated_tiff_has_its_upright_size_and_focal(tmp_path: Path) -> None:
    """Pillow reports a TIFF with orientation 5-8 at its upright size already (and turns it
    as it loads): the header's size was swapped a second time (a chunked run then squashed
    every view to the other shape) and the sensor-route focal length read 533 x 300 for 400."""
    from test_metric import exif_block

    from da3cog.io.exif import exif_focal
    from da3cog.io.images import load_image, source_size

    stored = np.zeros((300, 400, 3), np.uint8)  # landscape as stored, portrait as shown
    tags = exif_block(6, **SENSOR_TAGS)
    for suffix in (".tif", ".jpg"):
        path = tmp_path / f"rotated{suffix}"
        Image.fromarray(stored).save(path, exif=tags.tobytes())
        height, width = load_image(path).shape[:2]
        assert source_size(path) == (width, height) == (300, 400), suffix
        focal = exif_focal(path)
        assert not isinstance(focal, str), focal
        assert (focal.fx, focal.fy) == pytest.approx((400.0, 400.0)), suffix


def test_a_sensor_size_stored_turned_against_the_image_is_read_turned() -> None:
    """HEIC writers store the image upright and drop the orientation tag, but PixelX/Y
    Dimension still describe the sensor's landscape frame: the focal length read 300 x 533
    for 400 x 400 on a portrait photo."""
    from test_metric import exif_block

    from da3cog.io.exif import focal_from_exif

    focal = focal_from_exif(exif_block(**SENSOR_TAGS), (300, 400))
    assert not isinstance(focal, str)
    assert (focal.fx, focal.fy) == pytest.approx((400.0, 400.0))


@pytest.mark.parametrize("focal_35mm", [65535, 0.01])
def test_an_implausible_exif_focal_length_is_not_used(focal_35mm: float) -> None:
    """A placeholder FocalLengthIn35mmFilm=65535 made metric depth off by orders of
    magnitude: EXIF focal lengths are held to the range a user's may have."""
    from test_metric import exif_block

    from da3cog.io.exif import focal_from_exif

    found = focal_from_exif(exif_block(FocalLengthIn35mmFilm=focal_35mm), (400, 300))
    assert isinstance(found, str) and "is outside [4, 40000] px" in found, found
    assert not isinstance(focal_from_exif(exif_block(FocalLengthIn35mmFilm=28), (400, 300)), str)


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_a_served_downscaled_copy_of_a_wide_grey_image_keeps_its_values(
    tmp_path: Path, mode: str
) -> None:
    """Views over the served pixel limit are downscaled: a 16-bit grey came out almost all
    white and a float one all black (Pillow's convert clips); they now convert as
    load_image does."""
    from da3cog.io.images import load_image
    from da3cog.serve.media import _downscaled_copy

    ramp = np.linspace(0.0, 1.0, 200)[None, :].repeat(100, axis=0)
    if mode == "I;16":
        source, path = Image.fromarray((ramp * 65535).astype(np.uint16)), tmp_path / "g.png"
    else:
        source, path = Image.fromarray(ramp.astype(np.float32), mode="F"), tmp_path / "g.tif"
    source.save(path)
    _downscaled_copy(path, tmp_path / "small.png", "image", (100, 50))
    small = load_image(tmp_path / "small.png").astype(float)
    assert abs(small.mean() - load_image(path).astype(float).mean()) < 3.0


def own_cameras_file(path: Path, sizes: list[tuple[int, int]], **missing: int) -> Path:
    """da3cog's cameras.json form for views of these ``(width, height)`` sizes; ``missing``
    maps a key (``K``, ``world_to_camera``) to the view that lacks it."""
    views = []
    for index, (width, height) in enumerate(sizes):
        view: dict[str, Any] = {
            "index": index,
            "width": width,
            "height": height,
            "K": [[1.2 * width, 0, width / 2], [0, 1.2 * width, height / 2], [0, 0, 1]],
            "world_to_camera": np.eye(4).tolist(),
        }
        for key, lacking in missing.items():
            if lacking == index:
                view[key] = None
        views.append(view)
    path.write_text(json.dumps({"output_resolution": "input", "views": views}))
    return path


def test_own_cameras_json_keeps_the_image_size_its_intrinsics_describe(tmp_path: Path) -> None:
    """A cameras.json written at the processing resolution holds K in processing pixels:
    read back for the input images it made depth 0.94x off, with no word. Its views' sizes
    are now checked against the inputs'."""
    from da3cog.io.cameras import CameraFileError, read_camera_file

    path = own_cameras_file(tmp_path / "cameras.json", [(112, 84), (112, 84)])
    cameras = read_camera_file(path, 2, label="cams.json")
    assert cameras.image_sizes == ((112, 84), (112, 84))
    assert cameras.for_view(1).image_sizes == ((112, 84),)
    cameras.check_images([(112, 84), None], "cams.json")  # None: size not known yet
    with pytest.raises(
        CameraFileError,
        match=r"cams.json: view 1's K describes a 112x84 image, "
        r"and input 1 is 200x150",
    ):
        cameras.check_images([(112, 84), (200, 150)], "cams.json")


def test_intrinsics_are_checked_against_the_input_images_named_by_the_file(
    tmp_path: Path,
) -> None:
    from da3cog.io.cameras import CameraFileError, read_camera_file

    path = tmp_path / "k.json"
    path.write_text(json.dumps({"intrinsics": [[1e6, 0, 100], [0, 1e6, 75], [0, 0, 1]]}))
    cameras = read_camera_file(path, 2, label="k.json")
    assert cameras.image_sizes is None
    with pytest.raises(CameraFileError, match=r"^k.json: intrinsics\[0\]: fx = 1e\+06"):
        cameras.check_images([(200, 150), (200, 150)], "k.json")


@pytest.mark.parametrize("key", ["K", "world_to_camera"])
def test_own_cameras_json_with_a_view_lacking_a_matrix_is_refused(tmp_path: Path, key: str) -> None:
    """One view without a pose dropped every view's pose without a word."""
    from da3cog.io.cameras import CameraFileError, read_camera_file

    path = own_cameras_file(tmp_path / "cameras.json", [(200, 150)] * 3, **{key: 1})
    with pytest.raises(CameraFileError, match=f"views 1 have no '{key}' and the others have one"):
        read_camera_file(path, 3, label="cams.json")


# --------------------------------------------------------------------------------------------
# Video decoding: bounds that hold per packet, codecs, clocks, damage, pixel aspect
# --------------------------------------------------------------------------------------------


def _mux_packets(path: Path, codec: str, size: tuple[int, int], packets: list[bytes]) -> Path:
    """An MKV of these raw ``codec`` packets at 10 fps, one frame each."""
    import fractions

    import av

    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.time_base = fractions.Fraction(1, 10)
        for index, data in enumerate(packets):
            packet = av.Packet(data)
            packet.pts = packet.dts = index
            packet.time_base = fractions.Fraction(1, 10)
            packet.stream = stream
            container.mux(packet)
    return path


def _encode(path: Path, codec: str, frames: list[np.ndarray], fps: int, **context: Any) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for name, value in context.items():
            setattr(stream.codec_context, name, value)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _jpeg(width: int, height: int, level: int = 90) -> bytes:
    import io as bytes_io

    buffer = bytes_io.BytesIO()
    Image.new("RGB", (width, height), (level, 120, 30)).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def _levels(count: int, height: int = 32, width: int = 48) -> list[np.ndarray]:
    return [np.full((height, width, 3), min(255, 10 * i), np.uint8) for i in range(count)]


def test_video_packets_that_show_no_frame_count_against_the_bounds(tmp_path: Path) -> None:
    """VP8 frames with show_frame cleared are decoded but never come out: the bounds were
    checked per frame out, so a file of them held a worker for as long as it took (a 2.9 MiB
    file took 3.2 s under a 1 s budget)."""
    import av

    from da3cog.io.video import VideoBounds, VideoDecodeError, sample_frames

    clip = _encode(tmp_path / "plain.webm", "libvpx", _levels(40), 10)
    with av.open(str(clip)) as container:
        packets = [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]
    hidden = [packets[0]] + [bytes([p[0] & ~0x10]) + p[1:] for p in packets[1:]]
    path = _mux_packets(tmp_path / "hidden.mkv", "vp8", (48, 32), hidden)
    with pytest.raises(VideoDecodeError, match="more than 10 frames read"):
        list(
            sample_frames(
                path, "hidden.mkv", fps=2, max_frames=5, bounds=VideoBounds(max_decoded_frames=10)
            )
        )
    # Shown, the same packets sample as usual.
    assert len(list(sample_frames(clip, "plain.webm", fps=2, max_frames=10))) == 8


def test_video_frames_larger_than_the_header_are_refused_before_they_are_decoded(
    tmp_path: Path,
) -> None:
    from da3cog.io.video import VideoBounds, VideoDecodeError, sample_frames

    path = _mux_packets(
        tmp_path / "grows.mkv", "mjpeg", (32, 32), [_jpeg(32, 32)] * 3 + [_jpeg(256, 256)]
    )
    bounds = VideoBounds(max_frame_pixels=64 * 64)
    with pytest.raises(VideoDecodeError, match=r"grows.mkv: the decoder refused a frame \(larger "):
        list(sample_frames(path, "grows.mkv", stride=1, max_frames=10, bounds=bounds))


def test_a_damaged_video_packet_is_skipped_as_players_do(tmp_path: Path) -> None:
    from da3cog.io.video import VideoDecodeError, sample_frames

    packets = [_jpeg(48, 32, 10 * i) for i in range(20)]
    packets[10] = packets[10][:20]
    path = _mux_packets(tmp_path / "damaged.mkv", "mjpeg", (48, 32), packets)
    assert len(list(sample_frames(path, "damaged.mkv", stride=1, max_frames=100))) == 19
    wrecked = _mux_packets(tmp_path / "wrecked.mkv", "mjpeg", (48, 32), [p[:20] for p in packets])
    with pytest.raises(VideoDecodeError, match=r"no frames \(20 damaged packet\(s\) skipped\)"):
        list(sample_frames(wrecked, "wrecked.mkv", stride=1, max_frames=100))


def test_sampling_at_the_video_rate_keeps_every_frame_of_a_millisecond_clock(
    tmp_path: Path,
) -> None:
    """Matroska times frames in whole milliseconds (33 ms is under 1/30 s): at fps=30 a
    30 fps MKV kept 20 of 30 frames."""
    from da3cog.io.video import sample_frames

    clip = _encode(tmp_path / "thirty.mkv", "libx264", _levels(30), 30)
    assert [f.position for f in sample_frames(clip, "c", fps=30, max_frames=100)] == list(range(30))
    assert len(list(sample_frames(clip, "c", fps=15, max_frames=100))) == 15


def test_anamorphic_video_frames_get_square_pixels(tmp_path: Path) -> None:
    import fractions

    from da3cog.io.video import sample_frames

    clip = _encode(
        tmp_path / "wide.mkv",
        "libx264",
        _levels(3, 32, 48),
        10,
        sample_aspect_ratio=fractions.Fraction(2, 1),
    )
    (first, *_) = sample_frames(clip, "wide.mkv", stride=1, max_frames=1)
    assert first.size == (96, 32) and first.picture.shape == (32, 96, 3)


def test_av1_video_is_decoded(tmp_path: Path) -> None:
    """AV1 decodes with libdav1d: the codec was checked by its decoder's name and every AV1
    video was refused as "libdav1d is not accepted"."""
    import av

    from da3cog.io.video import sample_frames

    encoders = [name for name in ("libsvtav1", "libaom-av1") if name in av.codecs_available]
    if not encoders:
        pytest.skip("this PyAV build has no AV1 encoder to make a test clip with")
    clip = _encode(tmp_path / "clip.mkv", encoders[0], _levels(3, 64, 64), 10)
    assert len(list(sample_frames(clip, "clip.mkv", stride=1, max_frames=10))) == 3


def test_names_made_from_long_user_names_fit_a_file_system(tmp_path: Path) -> None:
    """A video named with 245 characters (legal) made frame names over the 255-byte limit:
    the CLI crashed with a traceback. Names derived from the user's keep at most 100 bytes,
    whole characters."""
    from da3cog.export.files import safe_name, view_file_name
    from da3cog.io.inputs import FrameSampling, clipped_name, expand_inputs

    assert clipped_name("ä" * 60) == "ä" * 50  # two bytes each
    assert clipped_name("aä" * 40, 4) == "aä" + "a"  # never half a character
    assert len(view_file_name("confidence", 3, "é" * 300, ".npy").encode()) < 255
    assert safe_name("short") == "short"
    video = _encode(tmp_path / ("v" * 240 + ".mp4"), "libx264", _levels(4), 10)
    (frame,) = expand_inputs([video], tmp_path / "frames", FrameSampling(stride=10))
    assert frame.name == "v" * 100 + "_frame_0000.png" and frame.is_file()


def test_a_video_whose_name_is_not_utf8_samples(tmp_path: Path) -> None:
    """A Latin-1 file name reaches Python with surrogate escapes: clipping it by its UTF-8
    bytes raised "surrogates not allowed" (exit 2 for a video that sampled before)."""
    from da3cog.io.inputs import FrameSampling, clipped_name, expand_inputs

    assert clipped_name("caf\udce9") == "caf\udce9"
    video = _encode(tmp_path / "caf\udce9.mp4", "libx264", _levels(4), 10)
    (frame,) = expand_inputs([video], tmp_path / "frames", FrameSampling(stride=10))
    assert frame.name == "caf\udce9_frame_0000.png" and frame.is_file()


def test_inputs_the_file_system_will_not_read_are_refused_as_inputs(tmp_path: Path) -> None:
    """A name too long for the file system (a real OSError, not FileNotFoundError) is the
    input's fault: a ValueError naming it (the CLI's exit 2), not an OSError (exit 3)."""
    from da3cog.io.inputs import check_images, expand_inputs

    too_long = tmp_path / ("x" * 300 + ".png")
    with pytest.raises(ValueError, match=r"x{300}\.png: cannot be read \(File name too long\)"):
        check_images([too_long])
    with pytest.raises(ValueError, match=r"cannot be read \(File name too long\)"):
        expand_inputs([too_long], tmp_path / "frames")
