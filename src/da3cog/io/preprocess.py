"""Resize, crop and normalise images into the network's input batch.

The numbers produced here reproduce Depth Anything 3's reference ``InputProcessor`` exactly
(same float32 tensors, same adjusted intrinsics): the pretrained weights were tuned on that
preprocessing, so any deviation (another interpolation, another rounding) shifts the
predictions.

Per view:

1. Boundary resize, keeping the aspect ratio: ``upper_bound_*`` makes the longest side equal to
   ``process_res``, ``lower_bound_*`` the shortest side. OpenCV bicubic when enlarging, area
   averaging when shrinking; skipped when the side already has that length.
2. Patch alignment (DA3's ViT uses 14-pixel patches): ``*_resize`` resizes each side to the
   nearest multiple of 14 (ties upwards), ``*_crop`` centre-crops each side down to a multiple
   of 14.
3. If the views now differ in size (photos of different shapes), ``mixed_shapes`` decides:
   ``"resize"`` (default) resizes each odd view's whole input image to the size most views
   have, so nothing the user gave is cut off (its pixels are no longer square: the view's
   ``scale_x != scale_y``, and its intrinsics follow); ``"crop"`` centre-crops every view to
   the smallest height and the smallest width in the batch, as the reference does.
4. ``x / 255`` then ImageNet mean/std normalisation, channels first.

Pixel coordinates are continuous with pixel centres at ``+0.5`` (COLMAP convention), so a resize
by ``s`` maps ``u -> u * s`` exactly and intrinsics scale without a half-pixel correction.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import torch

from da3cog.io.images import ImageSource, load_image

logger = logging.getLogger(__name__)

PATCH_SIZE = 14
"""Side of the ViT patches; processed images have both sides divisible by it."""
MIXED_SHAPES: tuple[str, ...] = ("resize", "crop")
"""How views that process to different sizes are made one size (see the module docstring)."""

PROCESS_METHODS: tuple[str, ...] = (
    "upper_bound_resize",
    "upper_bound_crop",
    "lower_bound_resize",
    "lower_bound_crop",
)
"""Accepted values of ``method`` in :func:`prepare_images`."""
DEFAULT_RESIZE_METHOD = "upper_bound_resize"

MIN_PROCESS_RES = PATCH_SIZE
MAX_PROCESS_RES = 4096
"""Beyond this the attention cost explodes; it is a guard against typos, not a model limit."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IntrinsicsT = TypeVar("IntrinsicsT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class ViewGeometry:
    """How one input image maps onto its processed (network input) image.

    A point at continuous input pixel coordinates ``(u_in, v_in)`` (pixel centres at ``+0.5``)
    lands at ``u_proc = u_in * scale_x - offset_x`` and ``v_proc = v_in * scale_y - offset_y``.

    Attributes:
        input_size: ``(height, width)`` of the image as given (after EXIF orientation).
        processing_size: ``(height, width)`` of the processed image, both multiples of 14.
        scale_x: Horizontal resize factor, processed width before cropping / input width.
        scale_y: Vertical resize factor, processed height before cropping / input height.
        offset_x: Pixels cropped off the left of the resized image.
        offset_y: Pixels cropped off the top of the resized image.
    """

    input_size: tuple[int, int]
    processing_size: tuple[int, int]
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    @property
    def input_crop_box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``: the part of the input image the processed view covers.

        In continuous input pixel coordinates; equals ``(0, 0, width, height)`` of the input
        when nothing was cropped.
        """
        proc_height, proc_width = self.processing_size
        return (
            self.offset_x / self.scale_x,
            self.offset_y / self.scale_y,
            (self.offset_x + proc_width) / self.scale_x,
            (self.offset_y + proc_height) / self.scale_y,
        )

    @property
    def pixel_aspect(self) -> float:
        """How much wider than tall an input pixel became (``scale_x / scale_y``): 1 up to
        patch rounding, otherwise the view was resized to another shape."""
        return self.scale_x / self.scale_y

    @property
    def input_to_processing_matrix(self) -> np.ndarray:
        """``(3, 3)`` float64 homogeneous map from input pixels to processed pixels."""
        return np.array(
            [
                [self.scale_x, 0.0, -self.offset_x],
                [0.0, self.scale_y, -self.offset_y],
                [0.0, 0.0, 1.0],
            ]
        )

    def intrinsics_to_processing(self, intrinsics: IntrinsicsT) -> IntrinsicsT:
        """Intrinsics of the input image -> intrinsics of the processed image.

        Args:
            intrinsics: ``(3, 3)`` or ``(..., 3, 3)`` pixel intrinsics, numpy or torch.

        Returns:
            Same shape and library; integer input becomes float64 (numpy) or float32 (torch).
        """
        source, result = _floating_copy(intrinsics)
        result[..., 0, :] = source[..., 0, :] * self.scale_x - self.offset_x * source[..., 2, :]
        result[..., 1, :] = source[..., 1, :] * self.scale_y - self.offset_y * source[..., 2, :]
        return result

    def intrinsics_to_input(self, intrinsics: IntrinsicsT) -> IntrinsicsT:
        """Intrinsics of the processed image -> intrinsics of the input image.

        Inverse of :meth:`intrinsics_to_processing`; use it to report cameras predicted at the
        processing resolution in the user's pixel frame. Shapes as there.
        """
        source, result = _floating_copy(intrinsics)
        result[..., 0, :] = (source[..., 0, :] + self.offset_x * source[..., 2, :]) / self.scale_x
        result[..., 1, :] = (source[..., 1, :] + self.offset_y * source[..., 2, :]) / self.scale_y
        return result


@dataclass(frozen=True)
class PreparedBatch:
    """Network-ready batch plus what is needed to map results back to the inputs.

    Attributes:
        images: ``(N, 3, H, W)`` float32, ImageNet-normalised, ``H`` and ``W`` multiples of 14.
        views: One :class:`ViewGeometry` per image, in input order.
        intrinsics: ``(N, 3, 3)`` float32 pixel intrinsics of the processed images, or ``None``
            when no intrinsics were given.
        rgb: ``(N, H, W, 3)`` uint8, the processed images before normalisation (for colouring
            point clouds and previews).
        reshaped: indices of the views that had another processed size than the batch and
            were resized whole or cropped to it (``mixed_shapes``).
    """

    images: torch.Tensor
    views: tuple[ViewGeometry, ...]
    intrinsics: torch.Tensor | None
    rgb: np.ndarray
    reshaped: tuple[int, ...] = ()

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def processing_size(self) -> tuple[int, int]:
        """``(H, W)`` shared by every processed view."""
        return self.views[0].processing_size


def prepare_images(
    images: Sequence[ImageSource],
    process_res: int = 504,
    method: str = DEFAULT_RESIZE_METHOD,
    intrinsics: np.ndarray | None = None,
    mixed_shapes: str = "resize",
    scene_shape: tuple[int, int] | None = None,
) -> PreparedBatch:
    """Turn images into the DA3 input batch, exactly as the reference implementation does
    (with ``mixed_shapes="crop"``; the default differs from it only for views of different
    shapes).

    Args:
        images: ``N >= 1`` images, normally ``(H, W, 3)`` uint8 RGB arrays; anything
            :func:`da3cog.io.load_image` accepts works (paths, PIL images, greyscale/RGBA/float
            arrays). Sizes may differ between views.
        process_res: Target length in pixels of the longest (``upper_bound_*``) or shortest
            (``lower_bound_*``) side, in ``[14, 4096]``.
        method: One of :data:`PROCESS_METHODS`.
        intrinsics: Optional ``(N, 3, 3)`` pixel intrinsics of the input images (pixel centres
            at ``+0.5``), with positive focal lengths and last row ``(0, 0, 1)``.
        mixed_shapes: One of :data:`MIXED_SHAPES`: ``"resize"`` keeps every view's whole
            frame, ``"crop"`` is the reference's centre crop.
        scene_shape: the ``(height, width)`` every view is fitted to (cropped or resized, as
            ``mixed_shapes`` says) when these images are part of a larger scene run in parts:
            :func:`scene_processing_shape` of all its views, so that every part is processed
            as one pass over the whole scene would be. Default: these images' own.

    Returns:
        A :class:`PreparedBatch`; its ``intrinsics`` are the given ones moved to the processed
        pixel frame, or ``None``.

    Raises:
        ValueError: empty ``images``, unknown ``method``, ``process_res`` out of range, bad
            ``intrinsics``, an image so elongated that a side would be narrower than one patch,
            or an image :func:`~da3cog.io.load_image` rejects.
        TypeError: ``process_res`` is not an integer.
    """
    check_resize_method(method)
    check_process_res(process_res)
    if mixed_shapes not in MIXED_SHAPES:
        raise ValueError(
            f"mixed_shapes must be one of {', '.join(MIXED_SHAPES)}, got {mixed_shapes!r}"
        )
    if len(images) == 0:
        raise ValueError("prepare_images needs at least one image, got an empty sequence")
    input_intrinsics = _validate_intrinsics(intrinsics, len(images))

    inputs: list[np.ndarray] = []
    processed: list[np.ndarray] = []
    views: list[ViewGeometry] = []
    for index, source in enumerate(images):
        inputs.append(load_image(source))
        rgb, view = _process_view(inputs[-1], int(process_res), method, index)
        processed.append(rgb)
        views.append(view)

    before = [view.processing_size for view in views]
    shape = scene_shape or scene_processing_shape(before, mixed_shapes)
    if mixed_shapes == "crop":
        processed, views = _crop_to_common_size(processed, views, shape)
    else:
        processed, views = _resize_to_common_size(inputs, processed, views, shape)
    del inputs
    reshaped = tuple(i for i, view in enumerate(views) if view.processing_size != before[i])

    rgb_batch = np.stack(processed)
    normalised = _normalise(rgb_batch)
    adjusted_intrinsics = None
    if input_intrinsics is not None:
        adjusted = np.stack(
            [
                view.intrinsics_to_processing(K)
                for view, K in zip(views, input_intrinsics, strict=True)
            ]
        )
        adjusted_intrinsics = torch.from_numpy(adjusted).to(torch.float32)
    return PreparedBatch(
        images=normalised,
        views=tuple(views),
        intrinsics=adjusted_intrinsics,
        rgb=rgb_batch,
        reshaped=reshaped,
    )


def _process_view(
    rgb: np.ndarray, process_res: int, method: str, index: int
) -> tuple[np.ndarray, ViewGeometry]:
    input_height, input_width = rgb.shape[:2]
    height, width, scale = _bounded_size((input_height, input_width), process_res, method)
    if scale != 1.0:
        interpolation = cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_AREA
        rgb = cv2.resize(rgb, (width, height), interpolation=interpolation)

    aligned_height, aligned_width = _patch_aligned_size(height, width, method)
    _check_patch_aligned(aligned_height, aligned_width, (input_height, input_width), index)
    offset_x = offset_y = 0
    if method.endswith("_resize"):
        if (aligned_width, aligned_height) != (width, height):
            enlarging = aligned_width > width or aligned_height > height
            interpolation = cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA
            rgb = cv2.resize(rgb, (aligned_width, aligned_height), interpolation=interpolation)
        resized_height, resized_width = aligned_height, aligned_width
    else:
        offset_x = (width - aligned_width) // 2
        offset_y = (height - aligned_height) // 2
        rgb = rgb[offset_y : offset_y + aligned_height, offset_x : offset_x + aligned_width]
        resized_height, resized_width = height, width

    view = ViewGeometry(
        input_size=(input_height, input_width),
        processing_size=(aligned_height, aligned_width),
        scale_x=resized_width / float(input_width),
        scale_y=resized_height / float(input_height),
        offset_x=float(offset_x),
        offset_y=float(offset_y),
    )
    return np.ascontiguousarray(rgb), view


def _bounded_size(
    input_size: tuple[int, int], process_res: int, method: str
) -> tuple[int, int, float]:
    """``(height, width)`` of a view of ``input_size`` after the boundary resize (its longest
    or shortest side at ``process_res``), and that resize's scale (1.0: none)."""
    input_height, input_width = input_size
    reference_side = (
        max(input_height, input_width)
        if method.startswith("upper_bound")
        else min(input_height, input_width)
    )
    if reference_side == process_res:
        return input_height, input_width, 1.0
    scale = process_res / float(reference_side)
    # Python's round() (half to even) is what the reference uses; keep it for parity.
    return max(1, round(input_height * scale)), max(1, round(input_width * scale)), scale


def _patch_aligned_size(height: int, width: int, method: str) -> tuple[int, int]:
    """The patch-aligned ``(height, width)`` a bounded view is resized (``*_resize``: the
    nearest multiples) or centre-cropped (``*_crop``: the multiples below) to."""
    if method.endswith("_resize"):
        return max(1, _nearest_patch_multiple(height)), max(1, _nearest_patch_multiple(width))
    return (height // PATCH_SIZE) * PATCH_SIZE, (width // PATCH_SIZE) * PATCH_SIZE


def _nearest_patch_multiple(side: int) -> int:
    below = (side // PATCH_SIZE) * PATCH_SIZE
    above = below + PATCH_SIZE
    return above if above - side <= side - below else below


def _check_patch_aligned(height: int, width: int, input_size: tuple[int, int], index: int) -> None:
    # The reference silently produces a 1-pixel (resize) or 0-pixel (crop) side here, which
    # only fails later inside the network with an unreadable shape error.
    if height % PATCH_SIZE or width % PATCH_SIZE or height == 0 or width == 0:
        raise ValueError(
            f"image {index} ({input_size[1]}x{input_size[0]} pixels) is too elongated for this "
            f"process_res and method: a side would be {min(height, width)} pixels, less than "
            f"one {PATCH_SIZE}-pixel patch; use a larger process_res or a lower_bound_* method"
        )


def _crop_to_common_size(
    processed: list[np.ndarray], views: list[ViewGeometry], shape: tuple[int, int]
) -> tuple[list[np.ndarray], list[ViewGeometry]]:
    sizes = [view.processing_size for view in views]
    if set(sizes) == {shape}:
        return processed, views
    common_height, common_width = shape
    if any(height < common_height or width < common_width for height, width in sizes):
        raise ValueError(
            f"views of processed sizes {sorted(set(sizes))} cannot be cropped to {shape}"
        )
    logger.warning(
        "views processed at sizes %s; centre-cropping all of them to %dx%d",
        sorted(set(sizes)),
        common_height,
        common_width,
    )
    cropped_images: list[np.ndarray] = []
    cropped_views: list[ViewGeometry] = []
    for rgb, view in zip(processed, views, strict=True):
        height, width = view.processing_size
        # The reference crops the image with torchvision's CenterCrop (round((H - h) / 2)) but
        # shifts intrinsics by floor((H - h) / 2). Every side is a multiple of 14 here, so the
        # differences are even and both give the same offset.
        top = (height - common_height) // 2
        left = (width - common_width) // 2
        cropped_images.append(
            np.ascontiguousarray(rgb[top : top + common_height, left : left + common_width])
        )
        cropped_views.append(
            ViewGeometry(
                input_size=view.input_size,
                processing_size=(common_height, common_width),
                scale_x=view.scale_x,
                scale_y=view.scale_y,
                offset_x=view.offset_x + left,
                offset_y=view.offset_y + top,
            )
        )
    return cropped_images, cropped_views


def processing_size(
    input_size: tuple[int, int], process_res: int, method: str, index: int = 0
) -> tuple[int, int]:
    """The ``(height, width)`` a view of ``input_size`` (height, width) is processed at by
    ``method``, before views of other shapes are fitted to the scene's
    (:func:`scene_processing_shape`); what :func:`prepare_images` gives it, from its size
    alone. Raises ValueError, as :func:`prepare_images` does, for a view too elongated to
    process (named as image ``index``)."""
    check_resize_method(method)
    check_process_res(process_res)
    height, width = _patch_aligned_size(*_bounded_size(input_size, process_res, method)[:2], method)
    _check_patch_aligned(height, width, input_size, index)
    return height, width


def scene_processing_shape(
    sizes: Sequence[tuple[int, int]], mixed_shapes: str
) -> tuple[int, int]:
    """The ``(height, width)`` every view of a scene is processed at, from their own
    processing sizes: the common crop (``"crop"``: the smallest height and width) or the
    size most views have (``"resize"``)."""
    if mixed_shapes == "crop":
        return min(height for height, _ in sizes), min(width for _, width in sizes)
    return common_size(sizes)


def common_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The ``(height, width)`` most views have (the earliest view's among equals)."""
    counts: dict[tuple[int, int], int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return max(counts, key=lambda size: counts[size])


def _resize_to_common_size(
    inputs: list[np.ndarray],
    processed: list[np.ndarray],
    views: list[ViewGeometry],
    shape: tuple[int, int],
) -> tuple[list[np.ndarray], list[ViewGeometry]]:
    """Views of another size than ``shape`` (the size most views of the scene have): their
    whole input image resized to it (one resize from the input, so no second resampling),
    pixels no longer square."""
    sizes = [view.processing_size for view in views]
    if set(sizes) == {shape}:
        return processed, views
    height, width = shape
    logger.info(
        "views processed at sizes %s; resizing the others whole to %dx%d",
        sorted(set(sizes)),
        height,
        width,
    )
    resized_images: list[np.ndarray] = []
    resized_views: list[ViewGeometry] = []
    for rgb, view, image in zip(processed, views, inputs, strict=True):
        if view.processing_size == (height, width):
            resized_images.append(rgb)
            resized_views.append(view)
            continue
        input_height, input_width = view.input_size
        enlarging = width > input_width or height > input_height
        interpolation = cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA
        resized_images.append(
            np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=interpolation))
        )
        resized_views.append(
            ViewGeometry(
                input_size=view.input_size,
                processing_size=(height, width),
                scale_x=width / float(input_width),
                scale_y=height / float(input_height),
                offset_x=0.0,
                offset_y=0.0,
            )
        )
    return resized_images, resized_views


def _normalise(rgb_batch: np.ndarray) -> torch.Tensor:
    # Same operations, in the same order and precision, as torchvision's ToTensor followed by
    # Normalize; anything else (e.g. multiplying by 1/255) changes the last bits.
    pixels = torch.from_numpy(rgb_batch).permute(0, 3, 1, 2).contiguous()
    scaled = pixels.to(torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(1, -1, 1, 1)
    return scaled.sub_(mean).div_(std)


def check_resize_method(method: str) -> None:
    """ValueError unless ``method`` is one of :data:`PROCESS_METHODS`."""
    if method not in PROCESS_METHODS:
        raise ValueError(
            f"unknown process_res method {method!r}; expected one of {', '.join(PROCESS_METHODS)}"
        )


def check_process_res(process_res: int) -> None:
    """TypeError or ValueError unless ``process_res`` is a whole number of pixels in range."""
    if isinstance(process_res, bool) or not isinstance(process_res, numbers.Integral):
        raise TypeError(f"process_res must be an integer, got {type(process_res).__name__}")
    if not MIN_PROCESS_RES <= process_res <= MAX_PROCESS_RES:
        raise ValueError(
            f"process_res must be between {MIN_PROCESS_RES} and {MAX_PROCESS_RES} pixels, "
            f"got {process_res}"
        )


def _validate_intrinsics(intrinsics: np.ndarray | None, num_images: int) -> np.ndarray | None:
    if intrinsics is None:
        return None
    matrices = np.asarray(intrinsics, dtype=np.float64)
    if matrices.shape != (num_images, 3, 3):
        raise ValueError(
            f"intrinsics must have shape (N, 3, 3) with N = {num_images} images, "
            f"got {matrices.shape}"
        )
    if not np.all(np.isfinite(matrices)):
        raise ValueError("intrinsics contain NaN or infinite values")
    focal_lengths = matrices[:, [0, 1], [0, 1]]
    if np.any(focal_lengths <= 0):
        bad = sorted({int(i) for i in np.nonzero(focal_lengths <= 0)[0]})
        raise ValueError(f"intrinsics of views {bad} have non-positive focal lengths (fx, fy)")
    if not np.allclose(matrices[:, 2, :], [0.0, 0.0, 1.0], rtol=0.0, atol=1e-6):
        raise ValueError("intrinsics must have last row (0, 0, 1)")
    return matrices


def _floating_copy(intrinsics: IntrinsicsT) -> tuple[IntrinsicsT, IntrinsicsT]:
    """``(source, writable copy)`` of a ``(..., 3, 3)`` matrix stack, in a floating dtype."""
    if tuple(intrinsics.shape[-2:]) != (3, 3):
        raise ValueError(
            f"intrinsics must have shape (3, 3) or (..., 3, 3), got {intrinsics.shape}"
        )
    if isinstance(intrinsics, torch.Tensor):
        source = intrinsics if intrinsics.is_floating_point() else intrinsics.to(torch.float32)
        return source, source.clone()
    source = np.asarray(intrinsics)
    if not np.issubdtype(source.dtype, np.floating):
        source = source.astype(np.float64)
    return source, source.copy()
