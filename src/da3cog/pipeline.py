"""Images (+ optional cameras) -> :class:`Prediction`: preprocessing, the network, pose
conditioning and scale alignment, re-anchoring and output resolution."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from da3cog.geometry import (
    anchor_to_first_view,
    check_extrinsics,
    check_intrinsics,
    normalize_pose_conditioning,
    trajectory_scale,
)
from da3cog.io import ImageSource, ViewGeometry, image_name, load_image, prepare_images
from da3cog.model.network import NetworkOutput
from da3cog.model.reference_view import ReferenceStrategy, check_strategy
from da3cog.weights import LoadedModel, load_model

logger = logging.getLogger(__name__)

OutputResolution = Literal["input", "processing"]
OUTPUT_RESOLUTIONS: tuple[str, ...] = ("input", "processing")


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class ViewPrediction:
    """One view of a :class:`Prediction` (arrays are read-only).

    Attributes:
        name: short name of the input (file stem or ``view_0003``).
        depth: ``(H, W)`` float32 z-depth along the optical axis; metres when the prediction
            is metric, otherwise a relative unit shared by all views of the request.
        confidence: ``(H, W)`` float32, > 1, higher is more reliable.
        image: ``(H, W, 3)`` uint8 RGB the depth map is aligned with.
        extrinsics: ``(4, 4)`` float32 world-to-camera, OpenCV axes (x right, y down, z
            forward), same unit as depth.
        intrinsics: ``(3, 3)`` float32 in pixels of this ``H x W`` image, pixel centres at +0.5.
        input_size: ``(height, width)`` of the image as given.
        crop_box: ``(x0, y0, x1, y1)``: the part of the input image this view covers, in input
            pixels (the whole image unless a crop resize method or mixed sizes cropped it).
    """

    name: str
    depth: np.ndarray
    confidence: np.ndarray
    image: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    input_size: tuple[int, int]
    crop_box: tuple[float, float, float, float]

    @property
    def height(self) -> int:
        return int(self.depth.shape[0])

    @property
    def width(self) -> int:
        return int(self.depth.shape[1])


@dataclass(frozen=True)
class Prediction:
    """Depth and cameras for every view of one request.

    World frame: the first view's camera (its extrinsics are the identity), or the user's own
    frame when the request gave extrinsics (then the poses are the user's and depth is scaled
    to their unit). ``is_metric`` says whether depth is in metres; any-view models predict
    relative depth. ``notes`` records anything a user should know about how the result was
    made (for example a scale that could not be aligned).
    """

    views: tuple[ViewPrediction, ...]
    is_metric: bool
    model_id: str
    model_preset: str
    processing_size: tuple[int, int]
    output_resolution: OutputResolution
    pose_conditioned: bool
    reference_view: int | None
    notes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.views)

    @property
    def extrinsics(self) -> np.ndarray:
        """``(N, 4, 4)`` world-to-camera."""
        return np.stack([v.extrinsics for v in self.views])

    @property
    def intrinsics(self) -> np.ndarray:
        """``(N, 3, 3)``, each in pixels of its own view's depth map."""
        return np.stack([v.intrinsics for v in self.views])

    @property
    def depth(self) -> np.ndarray:
        """``(N, H, W)``; raises ValueError when views have different sizes (use ``views``)."""
        return self._stack("depth")

    @property
    def confidence(self) -> np.ndarray:
        return self._stack("confidence")

    def _stack(self, name: str) -> np.ndarray:
        shapes = {getattr(v, name).shape for v in self.views}
        if len(shapes) > 1:
            raise ValueError(
                f"views have different sizes {sorted(shapes)}; read {name} per view from .views"
            )
        return np.stack([getattr(v, name) for v in self.views])


@dataclass(frozen=True)
class InferenceOptions:
    """How one request is processed.

    Attributes:
        process_res: target side of the network input (longest side for ``upper_bound_*``,
            shortest for ``lower_bound_*``), rounded to multiples of 14.
        resize_method: ``upper_bound_resize`` (default), ``upper_bound_crop``,
            ``lower_bound_resize`` or ``lower_bound_crop``.
        reference_strategy: reference-view choice for >= 3 unposed views.
        pose_from_rays: cameras from the ray map (RANSAC) instead of the camera decoder.
        output_resolution: ``input`` (each view at its input size, intrinsics rescaled) or
            ``processing`` (the network's resolution).
        align_to_input_scale: with user extrinsics, rescale depth to their unit (as upstream).
        seed: seeds the ray RANSAC and the pose-alignment RANSAC, so a request is repeatable.
    """

    process_res: int = 504
    resize_method: str = "upper_bound_resize"
    reference_strategy: ReferenceStrategy = "saddle_balanced"
    pose_from_rays: bool = False
    output_resolution: OutputResolution = "input"
    align_to_input_scale: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        check_strategy(self.reference_strategy)
        if self.output_resolution not in OUTPUT_RESOLUTIONS:
            raise ValueError(
                f"output_resolution must be one of {', '.join(OUTPUT_RESOLUTIONS)}, "
                f"got {self.output_resolution!r}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")


ProgressCallback = Callable[[str], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the backbone on GPUs that support it; fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class DepthAnything3:
    """A loaded DA3 model ready to answer requests.

    >>> model = DepthAnything3.from_pretrained("small")          # doctest: +SKIP
    >>> prediction = model.predict(["a.jpg", "b.jpg"])           # doctest: +SKIP
    """

    def __init__(self, loaded: LoadedModel, device: torch.device | None = None) -> None:
        self.loaded = loaded
        self.device = device or next(loaded.network.parameters()).device
        self.network = loaded.network.to(self.device)
        self.autocast_dtype = autocast_dtype_for(self.device)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        cache_dir: Path | None = None,
    ) -> DepthAnything3:
        """Load a preset name / alias, a Hub id or a local checkpoint folder."""
        device = torch.device(device) if device is not None else default_device()
        return cls(load_model(source, device=device, cache_dir=cache_dir), device)

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[ImageSource],
        *,
        extrinsics: np.ndarray | None = None,
        intrinsics: np.ndarray | None = None,
        options: InferenceOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> Prediction:
        """Depth and cameras for a list of views.

        Args:
            images: paths, PIL images or ``(H, W, 3)`` uint8 arrays, one per view.
            extrinsics: optional ``(N, 3|4, 4)`` world-to-camera poses (OpenCV axes) to
                condition on; needs ``intrinsics``.
            intrinsics: ``(N, 3, 3)`` pixel intrinsics of the input images.
            options: processing options (defaults: :class:`InferenceOptions`).
            progress: called with a short message at each stage.
        """
        options = options or InferenceOptions()
        report = progress or (lambda message: logger.info("%s", message))
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not len(images):
            raise ValueError("images must be a non-empty list of paths, PIL images or arrays")
        count = len(images)
        if extrinsics is not None and intrinsics is None:
            raise ValueError("pose conditioning needs intrinsics as well as extrinsics")
        if intrinsics is not None and extrinsics is None:
            raise ValueError(
                "intrinsics alone are not used by any-view models: give extrinsics too, or neither"
            )
        user_extrinsics = check_extrinsics(extrinsics, count) if extrinsics is not None else None
        user_intrinsics = check_intrinsics(intrinsics, count) if intrinsics is not None else None

        started = time.perf_counter()
        report(f"decoding {count} image(s)")
        names = [image_name(source, index) for index, source in enumerate(images)]
        arrays = [load_image(source) for source in images]
        report("preprocessing")
        batch = prepare_images(arrays, options.process_res, options.resize_method, user_intrinsics)
        generator = torch.Generator(device=self.device).manual_seed(options.seed)

        conditioning = None
        if user_extrinsics is not None and batch.intrinsics is not None:
            conditioning = normalize_pose_conditioning(
                torch.from_numpy(user_extrinsics).float()[None].to(self.device)
            )
        report(f"running {self.loaded.preset.name} on {count} view(s) at {batch.processing_size}")
        output: NetworkOutput = self.network(
            batch.images[None].to(self.device),
            conditioning,
            batch.intrinsics[None].to(self.device) if conditioning is not None else None,
            reference_strategy=options.reference_strategy,
            pose_from_rays=options.pose_from_rays,
            generator=generator,
            autocast_dtype=self.autocast_dtype,
        )
        report("postprocessing")
        depth = output.depth[0].float().cpu().numpy()
        confidence = output.depth_conf[0].float().cpu().numpy()
        predicted_extrinsics = output.extrinsics[0].float().cpu()
        notes: list[str] = []
        if user_extrinsics is not None and batch.intrinsics is not None:
            extrinsics_out = user_extrinsics.astype(np.float32)
            intrinsics_out = batch.intrinsics.numpy()
            if options.align_to_input_scale:
                # Scale taking the user's trajectory onto the network's (upstream's direction:
                # Umeyama is not symmetric under noise), so depth / scale is in user units.
                scale = trajectory_scale(
                    user_extrinsics, predicted_extrinsics.double().numpy(), seed=options.seed
                )
                if scale is None:
                    notes.append(
                        "the input cameras do not determine a scale (one view or coincident "
                        "centres): depth keeps the network's relative unit"
                    )
                else:
                    depth = depth / scale
        else:
            extrinsics_out = anchor_to_first_view(predicted_extrinsics).numpy()
            intrinsics_out = output.intrinsics[0].float().cpu().numpy()

        views = tuple(
            self._view(
                names[index],
                arrays[index],
                batch.views[index],
                batch.rgb[index],
                depth[index],
                confidence[index],
                extrinsics_out[index],
                intrinsics_out[index],
                options.output_resolution,
            )
            for index in range(count)
        )
        reference = output.backbone.reference_view
        report(f"done in {time.perf_counter() - started:.2f}s")
        return Prediction(
            views=views,
            is_metric=False,
            model_id=self.loaded.model_id,
            model_preset=self.loaded.preset.name,
            processing_size=batch.processing_size,
            output_resolution=options.output_resolution,
            pose_conditioned=user_extrinsics is not None,
            reference_view=int(reference[0]) if reference is not None else None,
            notes=tuple(notes),
        )

    def _view(
        self,
        name: str,
        input_rgb: np.ndarray,
        geometry: ViewGeometry,
        processed_rgb: np.ndarray,
        depth: np.ndarray,
        confidence: np.ndarray,
        extrinsics: np.ndarray,
        intrinsics: np.ndarray,
        resolution: OutputResolution,
    ) -> ViewPrediction:
        homogeneous = np.eye(4, dtype=np.float32)
        homogeneous[:3, :] = extrinsics[:3, :]
        if resolution == "processing":
            image = processed_rgb
        else:
            # The region of the input the network saw, snapped outwards-in to whole pixels.
            x0, y0, x1, y1 = geometry.input_crop_box
            left, top = math.ceil(x0 - 1e-6), math.ceil(y0 - 1e-6)
            right, bottom = math.floor(x1 + 1e-6), math.floor(y1 + 1e-6)
            image = input_rgb[top:bottom, left:right]
            intrinsics = np.asarray(geometry.intrinsics_to_input(intrinsics.astype(np.float64)))
            intrinsics[0, 2] -= left
            intrinsics[1, 2] -= top
            depth, confidence = _resample_to_input(
                np.stack([depth, confidence]), geometry, (top, left), (bottom - top, right - left)
            )
        return ViewPrediction(
            name=name,
            depth=_frozen(depth.astype(np.float32)),
            confidence=_frozen(confidence.astype(np.float32)),
            image=_frozen(np.array(image, copy=True)),
            extrinsics=_frozen(homogeneous),
            intrinsics=_frozen(intrinsics.astype(np.float32)),
            input_size=geometry.input_size,
            crop_box=geometry.input_crop_box,
        )


def _resample_to_input(
    maps: np.ndarray,
    geometry: ViewGeometry,
    origin: tuple[int, int],
    size: tuple[int, int],
) -> np.ndarray:
    """Bilinearly sample processing-resolution maps ``(C, h, w)`` at the centres of the input
    pixels ``origin + [0, size)`` (row, col), through the view's exact input->processing map."""
    proc_h, proc_w = maps.shape[-2:]
    rows = torch.arange(size[0], dtype=torch.float64) + origin[0] + 0.5
    cols = torch.arange(size[1], dtype=torch.float64) + origin[1] + 0.5
    # Continuous processing coordinates, then grid_sample's [-1, 1] (align_corners=False).
    v = (rows * geometry.scale_y - geometry.offset_y) / proc_h * 2 - 1
    u = (cols * geometry.scale_x - geometry.offset_x) / proc_w * 2 - 1
    grid = torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)[None].float()
    sampled = F.grid_sample(
        torch.from_numpy(np.ascontiguousarray(maps))[None].float(),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return sampled[0].numpy()
