"""Images (+ optional cameras) -> :class:`Prediction`, in named stages that
:meth:`DepthAnything3.predict` runs in order: ``_decode`` (images, names, the intrinsics to
use), ``_preprocess`` (the network's batch), ``_forward`` (the network, pose-conditioned when
given poses), ``_resolve`` (cameras and units: anchoring, scale alignment to the user's poses,
metric depth) and ``_assemble`` (Gaussians and every view at the output resolution). Requests
with more views than fit run the same stages per chunk (:mod:`da3cog.chunked`)."""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from da3cog import memory
from da3cog.geometry import (
    CONDITIONING_MIN_DISTANCE,
    anchor_to_first_view,
    check_extrinsics,
    check_intrinsics,
    check_intrinsics_for_images,
    conditioning_is_floored,
    pose_conditioning,
    trajectory_scale,
)
from da3cog.io import (
    MIXED_SHAPES,
    ImageSource,
    PreparedBatch,
    ViewGeometry,
    exif_focal,
    image_name,
    load_image,
    prepare_images,
    source_size,
)
from da3cog.io.preprocess import (
    DEFAULT_RESIZE_METHOD,
    check_process_res,
    check_resize_method,
    processing_size,
    scene_processing_shape,
)
from da3cog.model.gaussian_adapter import build_gaussians
from da3cog.model.metric import SKY_THRESHOLD, canonical_to_metric
from da3cog.model.network import NetworkOutput, gaussian_models
from da3cog.model.presets import ModelPreset, short_name
from da3cog.model.reference_view import ReferenceStrategy, check_strategy
from da3cog.weights import LoadedModel, load_model

logger = logging.getLogger(__name__)

OutputResolution = Literal["input", "processing"]
OUTPUT_RESOLUTIONS: tuple[str, ...] = ("input", "processing")
CameraSource = Literal["predicted", "user intrinsics", "exif"]


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
            is metric, otherwise a relative unit shared by all views of the request. Models
            with a sky mask give sky pixels a far value.
        confidence: ``(H, W)`` float32, > 1, higher is more reliable; None for the
            single-view models (mono, metric), which predict none.
        image: ``(H, W, 3)`` uint8 RGB the depth map is aligned with.
        extrinsics: ``(4, 4)`` float32 world-to-camera, OpenCV axes (x right, y down, z
            forward), same unit as depth; None when no camera was estimated or given (see
            :attr:`Prediction.cameras_estimated`).
        intrinsics: ``(3, 3)`` float32 in pixels of this ``H x W`` image, pixel centres at
            +0.5; None when none was estimated, given or read from EXIF (see
            :attr:`Prediction.intrinsics_source`).
        input_size: ``(height, width)`` of the image as given.
        crop_box: ``(x0, y0, x1, y1)``: the part of the input image this view covers, in input
            pixels (the whole image unless a crop resize method or mixed sizes cropped it); at
            the input resolution whole pixels, those of ``image`` and the maps (the region the
            network saw, snapped inwards), so view pixel ``(u, v)`` is input pixel
            ``(x0 + u, y0 + v)``.
        sky: ``(H, W)`` bool, True on sky: the pixels whose depth holds the far value (sky
            score >= 0.3, the threshold the depth post-processing uses; upstream's own
            Prediction.sky thresholds at 0.5 instead). None for models without a sky head.
        pixel_aspect: how the network saw this view's pixels: their width over height
            (``ViewGeometry.pixel_aspect``); 1 up to patch rounding, else the view had
            another shape than most and was resized whole (``mixed_shapes="resize"``).
        chunk: the chunk that predicted this view when the request ran in chunks
            (:mod:`da3cog.chunked`), else None.
        alignment_residual: that chunk's alignment residual onto the world, relative to the
            depth of the views it was fitted on (None for the first chunk and single passes);
            after a loop closure moved the chunks, the same residual with both chunks of the
            overlap where they ended up; for a chunk the user's poses put in their unit (not
            moved), its depth's difference from the chunk before's on the views they share.
    """

    name: str
    depth: np.ndarray
    confidence: np.ndarray | None
    image: np.ndarray
    extrinsics: np.ndarray | None
    intrinsics: np.ndarray | None
    input_size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    sky: np.ndarray | None = None
    pixel_aspect: float = 1.0
    chunk: int | None = None
    alignment_residual: float | None = None

    @property
    def height(self) -> int:
        return int(self.depth.shape[0])

    @property
    def width(self) -> int:
        return int(self.depth.shape[1])


@dataclass(frozen=True)
class Gaussians:
    """3D Gaussians, one per pixel of every view at the processing resolution, in the world
    frame and unit of the :class:`Prediction` they belong to (read-only float32 arrays).

    ``G = views x height x width`` (``grid``), ordered view by view, then row by row.

    Attributes:
        means: ``(G, 3)`` centres.
        scales: ``(G, 3)`` standard deviations along the Gaussian's own axes (not log).
        rotations: ``(G, 4)`` unit quaternions, scalar first ``(w, x, y, z)``: the order 3DGS
            PLY files (``rot_0..rot_3``) and gsplat read (upstream's values, see
            :mod:`da3cog.model.gaussian_adapter`).
        harmonics: ``(G, 3, 9)`` RGB spherical-harmonic coefficients up to degree 2, world
            frame, 3DGS basis and order (``[..., 0]`` is the DC term).
        opacities: ``(G,)`` in (0, 1).
        grid: ``(views, height, width)``.
    """

    means: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    harmonics: np.ndarray
    opacities: np.ndarray
    grid: tuple[int, int, int]

    def __len__(self) -> int:
        return int(self.means.shape[0])


@dataclass(frozen=True)
class Prediction:
    """Depth (and cameras, sky and Gaussians where the model has them) for every view of one
    request.

    World frame: the first view's camera (its extrinsics are the identity), or the user's own
    frame when the request gave extrinsics (then the poses are the user's and depth is scaled
    to their unit). Single-view models (mono, metric) estimate no cameras: then
    ``cameras_estimated`` is False, every view's extrinsics is None and its intrinsics are the
    user's or EXIF's (``intrinsics_source``) or None; views are not registered to each other.

    Attributes:
        is_metric: depth (and camera translations, Gaussians) in metres. Never set without a
            focal length: ``focal_source`` says which one made the depth metric.
        focal_source: ``"predicted"`` (nested models: the any-view branch's focal),
            ``"user intrinsics"`` or ``"exif"`` (metric model), None when depth is relative.
        cameras_estimated: the model predicted cameras (any-view and nested models).
        intrinsics_source: where the views' intrinsics come from: ``"predicted"``, ``"user
            intrinsics"``, ``"exif"`` or None (no intrinsics).
        metric_scale: nested models: the factor that took the any-view depth to metres (of
            a chunked reconstruction: the first chunk's, whose metres the world is in).
        gaussians: the per-pixel 3D Gaussians when requested (giant and nested models).
        model_id, model_revision: the checkpoint that made the prediction: its Hub id (or
            folder) and, when it was read from a Hub snapshot, the commit.
        notes: anything a user should know about how the result was made (a scale that could
            not be aligned, why depth is not metric...).
        precision: the dtype the backbone ran in (``fp32``, ``bf16`` or ``fp16``; the heads
            always run in float32).
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
    cameras_estimated: bool = True
    intrinsics_source: CameraSource | None = "predicted"
    focal_source: CameraSource | None = None
    model_revision: str | None = None
    metric_scale: float | None = None
    gaussians: Gaussians | None = None
    precision: str = "fp32"

    def __len__(self) -> int:
        return len(self.views)

    @property
    def extrinsics(self) -> np.ndarray | None:
        """``(N, 4, 4)`` world-to-camera, or None without cameras."""
        return self._stack_optional("extrinsics")

    @property
    def intrinsics(self) -> np.ndarray | None:
        """``(N, 3, 3)``, each in pixels of its own view's depth map, or None."""
        return self._stack_optional("intrinsics")

    @property
    def depth(self) -> np.ndarray:
        """``(N, H, W)``; raises ValueError when views have different sizes (use ``views``)."""
        return self._stack("depth")

    @property
    def confidence(self) -> np.ndarray | None:
        """``(N, H, W)``, or None for models without confidence."""
        return self._stack_optional("confidence")

    @property
    def sky(self) -> np.ndarray | None:
        """``(N, H, W)`` bool, or None for models without a sky mask."""
        return self._stack_optional("sky")

    def _stack_optional(self, name: str) -> np.ndarray | None:
        if any(getattr(v, name) is None for v in self.views):
            return None
        return self._stack(name)

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
            False keeps depth in the network's unit beside the given extrinsics, as given (a
            note says so; upstream returns its own poses aligned to the given ones instead).
        seed: seeds every random step (ray and pose-alignment RANSAC, the sky and metric-scale
            quantile sampling), so a request is repeatable.
        infer_gaussians: also predict per-pixel 3D Gaussians (models with a Gaussian head).
        mixed_shapes: views whose shapes process to different sizes: ``resize`` (default)
            resizes the odd ones whole to the size most views have, so every view covers its
            whole image; ``crop`` centre-crops all to the smallest, as upstream does. The
            Prediction's notes and each view's ``crop_box`` / ``pixel_aspect`` say what
            happened.
        chunk_size: with more views than this, the request runs as overlapping chunks of
            this many views aligned into one world (:mod:`da3cog.chunked`); ``"auto"``
            (default): one pass when the memory model (:mod:`da3cog.memory`) says it fits the
            memory this process can still take (the GPU's free memory on CUDA), else the
            largest chunk that fits; None: always one pass.
        chunk_overlap: views each chunk shares with the previous one (default: half the
            chunk, as upstream's streaming).
        time_budget: seconds a chunked run may take: after each chunk the pace so far
            projects the total, and a run that would pass the budget stops there with
            :class:`da3cog.chunked.TimeBudgetExceeded` (naming how many views would fit).
            None (default): no limit. A single pass is not timed (memory bounds it).
        loop_closure: in a chunked run of unposed views, find the places the sequence comes
            back to and close those loops (:mod:`da3cog.loops`; each costs one more chunk of
            at most ``2 x min(chunk // 2, 20)`` views); off by default. A single pass has no
            drift to close.
    """

    process_res: int = 504
    resize_method: str = DEFAULT_RESIZE_METHOD
    reference_strategy: ReferenceStrategy = "saddle_balanced"
    pose_from_rays: bool = False
    output_resolution: OutputResolution = "input"
    align_to_input_scale: bool = True
    seed: int = 42
    infer_gaussians: bool = False
    mixed_shapes: str = "resize"
    chunk_size: int | Literal["auto"] | None = "auto"
    chunk_overlap: int | None = None
    time_budget: float | None = None
    loop_closure: bool = False

    def __post_init__(self) -> None:
        if self.time_budget is not None:
            if isinstance(self.time_budget, bool) or not isinstance(self.time_budget, numbers.Real):
                raise TypeError(
                    f"time_budget must be a number of seconds, got {self.time_budget!r}"
                )
            object.__setattr__(self, "time_budget", float(self.time_budget))
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        check_strategy(self.reference_strategy)
        # Here, not at the first image: a manifest's or the served model's options are
        # refused before any model loads or any input is fetched.
        check_process_res(self.process_res)
        check_resize_method(self.resize_method)
        if self.mixed_shapes not in MIXED_SHAPES:
            raise ValueError(
                f"mixed_shapes must be one of {', '.join(MIXED_SHAPES)}, "
                f"got {self.mixed_shapes!r}"
            )
        if self.output_resolution not in OUTPUT_RESOLUTIONS:
            raise ValueError(
                f"output_resolution must be one of {', '.join(OUTPUT_RESOLUTIONS)}, "
                f"got {self.output_resolution!r}"
            )
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        # NumPy's generators take no negative seed (a RANSAC given one fell back to another
        # fit without a word) and torch's none of 2**63 or more.
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        # A manifest's "false" (a string) would otherwise switch these on.
        for name in ("pose_from_rays", "align_to_input_scale", "infer_gaussians", "loop_closure"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.chunk_overlap is not None and self.chunk_size is None:
            raise ValueError("chunk_overlap needs chunk_size")
        # A manifest's 4.0 or "Auto" would otherwise fail deep inside a running request.
        if self.chunk_size not in (None, "auto") and not _is_int(self.chunk_size):
            raise TypeError(
                f"chunk_size must be a whole number, 'auto' or None, got {self.chunk_size!r}"
            )
        if self.chunk_overlap is not None and not _is_int(self.chunk_overlap):
            raise TypeError(f"chunk_overlap must be a whole number, got {self.chunk_overlap!r}")
        # NumPy's integers as Python's: torch's generators take no others.
        for name in ("seed", "chunk_size", "chunk_overlap"):
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        # Chunks are aligned on the views they share: at least one.
        if self.chunk_size == "auto":
            if self.chunk_overlap is not None and self.chunk_overlap < 1:
                raise ValueError(f"chunk overlap must be at least 1, got {self.chunk_overlap}")
        elif self.chunk_size is not None:
            from da3cog.chunked import chunk_ranges

            chunk_ranges(0, self.chunk_size, 0)  # size >= 2
            overlap = self.overlap_for(self.chunk_size)
            if not 1 <= overlap < self.chunk_size:
                raise ValueError(
                    f"chunk overlap must be between 1 and size - 1 = {self.chunk_size - 1}, "
                    f"got {overlap}"
                )

    def overlap_for(self, size: int) -> int:
        """The overlap of chunks of ``size`` views: ``chunk_overlap`` (at most ``size - 1``
        when the size was chosen automatically), else half the chunk."""
        from da3cog.chunked import default_overlap

        if self.chunk_overlap is None:
            return default_overlap(size)
        if self.chunk_size == "auto":
            return min(self.chunk_overlap, size - 1)
        return self.chunk_overlap


ProgressCallback = Callable[[str], None]


# The start of the note of a posed request whose cameras fix no unit (chunks look for it).
UNDETERMINED_SCALE_NOTE = (
    "the input cameras do not determine a scale (one view or coincident centres)"
)


def check_request(
    preset: ModelPreset, extrinsics: bool, intrinsics: bool, options: InferenceOptions
) -> None:
    """Reject what ``preset`` cannot do (given ``extrinsics`` / ``intrinsics`` or not) before
    any image is decoded, or any model loaded (the CLI checks it first)."""
    if not preset.cameras:
        if extrinsics:
            raise ValueError(
                f"{preset.name} is a single-view model: it takes no camera poses (give "
                "intrinsics alone to set focal lengths)"
            )
        if options.pose_from_rays:
            raise ValueError(f"{preset.name} is a single-view model: it estimates no poses")
    elif extrinsics and not intrinsics:
        raise ValueError("pose conditioning needs intrinsics as well as extrinsics")
    elif intrinsics and not extrinsics:
        raise ValueError(
            "intrinsics alone are not used by any-view models: give extrinsics too, or neither"
        )
    if options.infer_gaussians and not preset.has_gaussian_head:
        raise ValueError(
            f"{short_name(preset.name)} has no Gaussian head; models with one: "
            f"{', '.join(gaussian_models())}"
        )


def _is_int(value: object) -> bool:
    """Whether ``value`` is a whole number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Scene:
    """What a chunk's views take from the scene they are part of: their names (the scene's,
    not their index in the chunk), the processing ``(height, width)`` every view of the
    scene is fitted to (None: the chunk's own, where a view's size cannot be read before
    decoding) and, for single-view models, why EXIF focal lengths are not used (a view of
    the scene has none: no chunk uses them, as one pass would not; None: each chunk reads
    its views').

    ``fitted`` collects, across the chunks, the views fitted to ``shape`` (described as the
    note of one pass lists them; a view two chunks share once), for one note on the scene
    instead of one per chunk."""

    names: tuple[str, ...]
    shape: tuple[int, int] | None
    exif_missing: str | None = None
    fitted: dict[str, None] = field(default_factory=dict)


@dataclass(frozen=True)
class _Decoded:
    """Stage 1: the decoded images, their names, and the intrinsics to use (the user's or
    EXIF's, input pixels) with where they came from."""

    names: list[str]
    arrays: list[np.ndarray]
    intrinsics: np.ndarray | None
    intrinsics_source: CameraSource | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Resolved:
    """Stage 4: depth (processing resolution, the Prediction's unit), cameras (processing
    pixels) and what they mean."""

    depth: torch.Tensor
    extrinsics: np.ndarray | None
    intrinsics: np.ndarray | None
    intrinsics_source: CameraSource | None
    is_metric: bool = False
    focal_source: CameraSource | None = None
    metric_scale: float | None = None
    # Factor taking the network's depth unit to the Prediction's (Gaussians follow it).
    unit: float = 1.0
    notes: tuple[str, ...] = ()
    posed: bool = False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _image_list(images: object) -> list:
    """``images`` (any iterable of paths, PIL images or arrays) as a list; ValueError for one
    image given alone, or for none."""
    from PIL import Image

    wanted = "images must be a non-empty list of paths, PIL images or arrays"
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray, torch.Tensor, Image.Image)):
        raise ValueError(f"{wanted}, got one {type(images).__name__}: put it in a list")
    try:
        listed = list(images)
    except TypeError:
        raise ValueError(f"{wanted}, got {type(images).__name__}") from None
    if not listed:
        raise ValueError(f"{wanted}, got none")
    return listed


def check_device(device: torch.device) -> None:
    """ValueError unless ``device`` is one this process can run on (a CUDA device without
    CUDA failed deep inside the load, or in an assertion)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device}: no CUDA device is visible to this torch "
                f"({torch.__version__}); use cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: {torch.cuda.device_count()} CUDA device(s)")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The backbone's precision on ``device``: ``auto`` is bf16 on GPUs that support it and
    fp32 elsewhere (the official code's own float32 arithmetic, to the last digit)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if supported else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
    return precision


class DepthAnything3:
    """A loaded DA3 model ready to answer requests.

    >>> model = DepthAnything3.from_pretrained("small")          # doctest: +SKIP
    >>> prediction = model.predict(["a.jpg", "b.jpg"])           # doctest: +SKIP
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device | str | None = None,
        precision: Precision = "auto",
    ) -> None:
        """``precision``: the dtype the backbone runs in under autocast (``fp32``, ``bf16``,
        ``fp16``; the heads always run in float32); ``auto``: bf16 on GPUs that support it,
        else fp32. The reduced ones trade the last digits of parity for speed (bench/README.md
        states both); ``Prediction.precision`` records which ran."""
        self.loaded = loaded
        parameters_device = next(loaded.network.parameters()).device
        self.device = parameters_device if device is None else torch.device(device)
        check_device(self.device)
        stored = {p.dtype for p in loaded.network.parameters()} - {torch.float32}
        if stored:
            raise ValueError(
                f"the network's weights are {', '.join(sorted(map(str, stored)))}: it runs "
                "float32 weights (load_model's default dtype); precision= sets the backbone's "
                "autocast instead"
            )
        self.network = loaded.network.to(self.device)
        self.precision = resolve_precision(precision, self.device)
        self.autocast_dtype = _AUTOCAST_DTYPES[self.precision]

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        cache_dir: Path | None = None,
        precision: Precision = "auto",
    ) -> DepthAnything3:
        """Load a preset name / alias, a Hub id or a local checkpoint folder (``precision``:
        see the class)."""
        device = torch.device(device) if device is not None else default_device()
        # A bad choice fails before the (slow) load.
        check_device(device)
        resolve_precision(precision, device)
        return cls(load_model(source, device=device, cache_dir=cache_dir), device, precision)

    @torch.inference_mode()
    def predict(
        self,
        images: Iterable[ImageSource],
        *,
        extrinsics: np.ndarray | None = None,
        intrinsics: np.ndarray | None = None,
        options: InferenceOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> Prediction:
        """Depth and cameras for a list of views.

        Args:
            images: paths, PIL images or ``(H, W, 3)`` uint8 arrays, one per view (a list,
                or any iterable of them).
            extrinsics: optional ``(N, 3|4, 4)`` world-to-camera poses (OpenCV axes) to
                condition on; needs ``intrinsics``. Any-view models only.
            intrinsics: ``(N, 3, 3)`` pixel intrinsics of the input images. Any-view models
                take them with extrinsics; single-view models take them alone (the metric
                model's focal length; otherwise reported as the views' intrinsics). Without
                them, single-view models read focal lengths from EXIF.
            options: processing options (defaults: :class:`InferenceOptions`).
            progress: called with a short message at each stage.

        With ``options.infer_gaussians`` the Gaussians follow the returned cameras: each view's
        Gaussians are placed with that view's Prediction extrinsics and (processing-resolution)
        intrinsics and the Prediction's depth unit, so with given poses they follow the
        user's poses and intrinsics, and otherwise the predicted cameras anchored to the first
        view (upstream keeps its predicted cameras even when given poses).
        """
        options = options or InferenceOptions()
        report = progress or (lambda message: logger.info("%s", message))
        images = _image_list(images)
        count = len(images)
        check_request(self.loaded.preset, extrinsics is not None, intrinsics is not None, options)
        user_extrinsics = check_extrinsics(extrinsics, count) if extrinsics is not None else None
        user_intrinsics = check_intrinsics(intrinsics, count) if intrinsics is not None else None
        sizes = [source_size(source) for source in images]
        # From the headers: a view too elongated to process is refused before any runs (one
        # whose size cannot be read is checked when decoded).
        processing = [
            None
            if size is None
            else processing_size(size[::-1], options.process_res, options.resize_method, index)
            for index, size in enumerate(sizes)
        ]
        chunk, spill = self._plan_chunks(images, sizes, options)
        if chunk is not None and count > chunk:
            return self._predict_in_chunks(
                images,
                sizes,
                processing,
                user_extrinsics,
                user_intrinsics,
                options,
                chunk,
                report,
                spill=spill,
            )
        return self._predict_one_pass(images, user_extrinsics, user_intrinsics, options, report)

    def _predict_one_pass(
        self,
        images: Sequence[ImageSource],
        user_extrinsics: np.ndarray | None,
        user_intrinsics: np.ndarray | None,
        options: InferenceOptions,
        report: ProgressCallback,
        scene: _Scene | None = None,
    ) -> Prediction:
        """The stages of :meth:`predict` over ``images`` in one pass (checked already);
        ``scene``: they are part of a larger scene run in chunks (their names and the
        processing shape are the scene's)."""
        started = time.perf_counter()
        decoded = self._decode(images, user_intrinsics, report, scene)
        batch, notes = self._preprocess(decoded, options, report, scene)
        # Poses condition the network only with intrinsics beside them.
        poses = user_extrinsics if batch.intrinsics is not None else None
        output = self._forward(batch, poses, options, report)
        report("postprocessing")
        resolved = self._resolve(output, batch, decoded, poses, options)
        notes = (*decoded.notes, *notes, *resolved.notes)
        if options.loop_closure:
            notes += ("loop closure: not run, the views ran in one pass (no chunks to drift)",)
        prediction = self._assemble(decoded, batch, output, resolved, notes, options)
        report(f"done in {time.perf_counter() - started:.2f}s")
        return prediction

    # The stages of one pass, in order (the chunked path runs them per chunk).

    def _decode(
        self,
        images: Sequence[ImageSource],
        user_intrinsics: np.ndarray | None,
        report: ProgressCallback,
        scene: _Scene | None = None,
    ) -> _Decoded:
        """Decode the images (named as ``scene`` says, else by :func:`image_name`); the
        intrinsics to use are the user's, else (single-view models) EXIF's, checked against
        the decoded sizes."""
        preset = self.loaded.preset
        report(f"decoding {len(images)} image(s)")
        names = (
            list(scene.names)
            if scene is not None
            else [image_name(source, index) for index, source in enumerate(images)]
        )
        arrays = [load_image(source) for source in images]
        if user_intrinsics is not None:
            check_intrinsics_for_images(user_intrinsics, [a.shape[:2] for a in arrays])
            return _Decoded(names, arrays, user_intrinsics, "user intrinsics", ())
        if preset.cameras:
            return _Decoded(names, arrays, None, None, ())
        if scene is not None and scene.exif_missing is not None:
            exif, reason = None, scene.exif_missing
        else:
            exif, reason = _exif_intrinsics(images, [a.shape[:2] for a in arrays], names)
        if exif is not None:
            return _Decoded(names, arrays, exif, "exif", ())
        notes: tuple[str, ...] = ()
        if preset.canonical_metric:
            notes = (
                "depth is not metric: the metric model needs a focal length and none was "
                f"given or found in EXIF ({reason}); depth is the model's canonical output "
                "(metres only for a 300-pixel focal length at the processing resolution)",
            )
            logger.warning("%s", notes[0])
        return _Decoded(names, arrays, None, None, notes)

    def _preprocess(
        self,
        decoded: _Decoded,
        options: InferenceOptions,
        report: ProgressCallback,
        scene: _Scene | None = None,
    ) -> tuple[PreparedBatch, tuple[str, ...]]:
        """The network's input batch (and a note when views of other shapes were fitted;
        ``scene``: the chunk's views are fitted to the scene's shape and listed in its
        ``fitted`` instead)."""
        report("preprocessing")
        scene_shape = None if scene is None else scene.shape
        batch = prepare_images(
            decoded.arrays,
            options.process_res,
            options.resize_method,
            decoded.intrinsics,
            mixed_shapes=options.mixed_shapes,
            scene_shape=scene_shape,
        )
        if not batch.reshaped:
            return batch, ()
        fitted = _fitted_views(batch, decoded.names, options.mixed_shapes)
        if scene is not None and scene_shape is not None:
            scene.fitted.update(dict.fromkeys(fitted))
            return batch, ()
        note = _mixed_shapes_note(batch.processing_size, fitted, options.mixed_shapes)
        logger.info("%s", note)
        return batch, (note,)

    def _forward(
        self,
        batch: PreparedBatch,
        user_extrinsics: np.ndarray | None,
        options: InferenceOptions,
        report: ProgressCallback,
    ) -> NetworkOutput:
        """The network on the batch, conditioned on the user's poses when given."""
        generator = torch.Generator(device=self.device).manual_seed(options.seed)
        conditioning = None
        if user_extrinsics is not None:
            conditioning = pose_conditioning(user_extrinsics, self.device)
        report(
            f"running {self.loaded.preset.name} on {batch.num_views} view(s) at "
            f"{batch.processing_size}"
        )
        return self.network(
            batch.images[None].to(self.device),
            conditioning,
            batch.intrinsics[None].to(self.device) if conditioning is not None else None,
            reference_strategy=options.reference_strategy,
            pose_from_rays=options.pose_from_rays,
            infer_gaussians=options.infer_gaussians,
            # _assemble places them with the resolved cameras (anchored, in the request's unit).
            place_gaussians=False,
            # Only the reference view's index is read from the backbone's outputs.
            keep_intermediates=False,
            generator=generator,
            autocast_dtype=self.autocast_dtype,
            head_views=memory.head_views(
                self.loaded.preset, batch.num_views, batch.processing_size, self.device
            ),
        )

    def _resolve(
        self,
        output: NetworkOutput,
        batch: PreparedBatch,
        decoded: _Decoded,
        user_extrinsics: np.ndarray | None,
        options: InferenceOptions,
    ) -> _Resolved:
        """Cameras and units: the predicted cameras anchored to the first view, or the user's
        with depth in their unit; metric depth from the metric model's focal length or the
        nested model's metric branch."""
        preset = self.loaded.preset
        depth = output.depth[0].float().cpu()
        if not preset.cameras:
            intrinsics = batch.intrinsics.numpy() if batch.intrinsics is not None else None
            if preset.canonical_metric and batch.intrinsics is not None:
                # Focal lengths in pixels of the processing image: what the network saw.
                return _Resolved(
                    canonical_to_metric(depth, batch.intrinsics),
                    None,
                    intrinsics,
                    decoded.intrinsics_source,
                    is_metric=True,
                    focal_source=decoded.intrinsics_source,
                )
            return _Resolved(depth, None, intrinsics, decoded.intrinsics_source)
        notes: list[str] = []
        is_metric, focal_source, metric_scale = False, None, None
        if preset.is_nested and output.metric_scales is not None:
            metric_scale = output.metric_scales[0]
            if metric_scale is None:
                notes.append(
                    "depth is not metric: too few non-sky pixels to fit the metric scale; "
                    "depth and cameras keep the any-view model's relative unit"
                )
                logger.warning("%s", notes[-1])
            else:
                is_metric, focal_source = True, "predicted"
        predicted_extrinsics = output.extrinsics[0].float().cpu()
        if user_extrinsics is None:
            return _Resolved(
                depth,
                anchor_to_first_view(predicted_extrinsics).numpy(),
                output.intrinsics[0].float().cpu().numpy(),
                "predicted",
                is_metric,
                focal_source,
                metric_scale,
                notes=tuple(notes),
            )
        if conditioning_is_floored(user_extrinsics):
            # One text for every chunk of a chunked run (notes are kept once each).
            notes.append(
                "the cameras' median distance from view 0 is under "
                f"{CONDITIONING_MIN_DISTANCE:g} in the unit of the given poses (always so for "
                "two views: the median is view 0's own 0), the floor the camera encoder divides "
                "them by instead: what the network sees of the rig depends on that unit, not "
                "only on its shape (upstream's normalisation, kept)"
            )
        unit, rescaled = 1.0, False
        kept_unit = "the metric model's metres" if is_metric else "the network's relative unit"
        if options.align_to_input_scale:
            # Scale taking the user's trajectory onto the network's (upstream's direction:
            # Umeyama is not symmetric under noise), so depth / scale is in user units.
            scale = trajectory_scale(
                user_extrinsics, predicted_extrinsics.double().numpy(), seed=options.seed
            )
            if scale is None:
                notes.append(f"{UNDETERMINED_SCALE_NOTE}: depth keeps {kept_unit}")
            else:
                depth, unit, rescaled = depth / scale, 1.0 / scale, True
        else:
            notes.append(
                f"depth is in {kept_unit}, not the unit of the given extrinsics "
                "(align_to_input_scale=False), and the returned extrinsics are the given ones: "
                "points and Gaussians placed with them are not to scale (upstream returns "
                "its own poses, aligned to the given ones, instead)"
            )
        if is_metric:
            # The returned poses are the user's, in their unit: depth brought to it is no
            # longer in metres, and metric depth beside them is in neither unit with them.
            notes.append(
                "depth is in the unit of the given extrinsics, not the metric model's metres "
                "(align_to_input_scale)"
                if rescaled
                else "is_metric is False: the returned extrinsics are the given ones, in "
                "their own unit, and they did not bring the metric depth to it"
            )
            is_metric, focal_source = False, None
        return _Resolved(
            depth,
            user_extrinsics.astype(np.float32),
            batch.intrinsics.numpy() if batch.intrinsics is not None else None,
            "user intrinsics",
            is_metric,
            focal_source,
            metric_scale,
            unit,
            tuple(notes),
            posed=True,
        )

    def _assemble(
        self,
        decoded: _Decoded,
        batch: PreparedBatch,
        output: NetworkOutput,
        resolved: _Resolved,
        notes: tuple[str, ...],
        options: InferenceOptions,
    ) -> Prediction:
        """Gaussians placed with the resolved cameras, and every view at the output
        resolution."""
        preset = self.loaded.preset
        gaussians = (
            _gaussians(output, resolved.extrinsics, resolved.intrinsics, resolved.unit)
            if options.infer_gaussians
            else None
        )
        confidence = _numpy_or_none(output.depth_conf)
        sky = _numpy_or_none(output.sky)
        depth = resolved.depth.numpy()
        views = tuple(
            self._view(
                decoded.names[index],
                decoded.arrays[index],
                batch.views[index],
                batch.rgb[index],
                depth[index],
                None if confidence is None else confidence[index],
                None if sky is None else sky[index],
                None if resolved.extrinsics is None else resolved.extrinsics[index],
                None if resolved.intrinsics is None else resolved.intrinsics[index],
                options.output_resolution,
            )
            for index in range(batch.num_views)
        )
        reference = output.reference_view
        return Prediction(
            views=views,
            is_metric=resolved.is_metric,
            model_id=self.loaded.model_id,
            model_revision=self.loaded.revision,
            model_preset=preset.name,
            precision=self.precision,
            processing_size=batch.processing_size,
            output_resolution=options.output_resolution,
            pose_conditioned=resolved.posed,
            reference_view=int(reference[0]) if reference is not None else None,
            notes=notes,
            cameras_estimated=preset.cameras,
            intrinsics_source=resolved.intrinsics_source,
            focal_source=resolved.focal_source,
            metric_scale=resolved.metric_scale,
            gaussians=gaussians,
        )

    def _plan_chunks(
        self,
        images: Sequence[ImageSource],
        sizes: Sequence[tuple[int, int] | None],
        options: InferenceOptions,
    ) -> tuple[int | None, bool]:
        """The chunk size (None: one pass): ``options.chunk_size``, or for ``"auto"`` the one
        the memory model picks from the views' ``(width, height)`` as their headers give them
        (one pass when a size cannot be read: the decoder then says why); and whether the
        views' outputs must leave the heap for memory-mapped files
        (:func:`da3cog.chunked.spill_view`) because the chunks do not fit beside all of them."""
        chunk = options.chunk_size
        unplanned = None if chunk == "auto" else chunk
        minimum = memory.MIN_CHUNK if chunk == "auto" else chunk
        if minimum is None or len(images) <= minimum:
            return unplanned, False
        if any(size is None for size in sizes):
            return unplanned, False
        size = memory.request_size(
            [s for s in sizes if s is not None],
            options.process_res,
            options.output_resolution,
            gaussians=options.infer_gaussians,
            points=0,
            resize_method=options.resize_method,
            mixed_shapes=options.mixed_shapes,
        )
        on_gpu = self.device.type == "cuda"
        host = memory.host_budget()
        device = memory.device_budget(self.device) if on_gpu else None
        preset = self.loaded.preset
        if chunk == "auto":
            chunk = memory.plan_chunk(preset, size, on_gpu, host, device)
            if chunk is not None:
                logger.info(
                    "%d views do not fit one pass in memory: chunks of %d", len(images), chunk
                )
        if chunk is not None:
            needed = memory.estimate(preset, size, on_gpu, chunk=chunk)
            if not memory.fits(needed, host, device):
                # Chunks bound the network's memory, not the outputs kept for every view:
                # those go to disk, and the user hears why and what would keep them in memory.
                advice = ""
                if options.output_resolution == "input":
                    smaller = replace(size, output_pixels=size.processing_pixels)
                    lighter = memory.estimate(preset, smaller, on_gpu, chunk=chunk)
                    if lighter.host < needed.host:
                        advice = (
                            f"; with output_resolution='processing' it would need about "
                            f"{lighter.describe()}"
                        )
                folder = tempfile.gettempdir()
                disk, free = memory.spilled_bytes(size), shutil.disk_usage(folder).free
                if disk > free:
                    raise ValueError(
                        f"{len(images)} views need about {needed.describe()} even in chunks "
                        f"of {chunk}, more than this process can take, and their outputs "
                        f"about {disk / memory.GIB:.1f} GiB of disk in {folder} (TMPDIR), "
                        f"which has {free / memory.GIB:.1f} GiB free: give fewer or smaller "
                        f"views, or point TMPDIR at a disk with room{advice}"
                    )
                budget = " and ".join(
                    f"{value / memory.GIB:.1f} GiB of {what}"
                    for value, what in ((host, "RAM"), (device, "GPU memory"))
                    if value is not None
                )
                logger.warning(
                    "%d views need about %s even in chunks of %d (every view's outputs are "
                    "kept); this process can take %s: their outputs go to memory-mapped files "
                    "in %s (TMPDIR)%s",
                    len(images),
                    needed.describe(),
                    chunk,
                    budget,
                    folder,
                    advice,
                )
                return chunk, True
        return chunk, False

    def _predict_in_chunks(
        self,
        images: Sequence[ImageSource],
        sizes: Sequence[tuple[int, int] | None],
        processing: Sequence[tuple[int, int] | None],
        extrinsics: np.ndarray | None,
        intrinsics: np.ndarray | None,
        options: InferenceOptions,
        chunk: int,
        report: ProgressCallback,
        *,
        spill: bool = False,
    ) -> Prediction:
        """:meth:`predict` as overlapping chunks aligned into one world (:mod:`da3cog.chunked`):
        each chunk runs the single-pass stages on its views (and their cameras, if given);
        ``sizes``: the views' ``(width, height)`` from their headers (None where unreadable),
        ``processing``: their ``(height, width)`` at the processing size
        (:func:`~da3cog.io.preprocess.processing_size`);
        ``spill``: the views' outputs go to memory-mapped temporary files."""
        from da3cog.chunked import reconstruct_in_chunks

        single_pass = replace(options, chunk_size=None, chunk_overlap=None, loop_closure=False)
        names = [image_name(source, index) for index, source in enumerate(images)]
        shape, exif_missing = None, None
        known = [size for size in sizes if size is not None]
        if len(known) == len(sizes):
            # As one pass would: the views fitted to one shape, the intrinsics checked against
            # every image before the first chunk runs (and named by their index in the scene).
            heights_widths = [(height, width) for width, height in known]
            if intrinsics is not None:
                check_intrinsics_for_images(intrinsics, heights_widths)
            shape = scene_processing_shape(
                [size for size in processing if size is not None], options.mixed_shapes
            )
            if not self.loaded.preset.cameras and intrinsics is None:
                exif_missing = _exif_intrinsics(images, heights_widths, names)[1] or None
        # The views fitted to ``shape``, collected across the chunks for one note.
        fitted: dict[str, None] = {}

        def predict_chunk(views: Sequence[int]) -> Prediction:
            part = list(views)
            return self._predict_one_pass(
                [images[index] for index in part],
                None if extrinsics is None else extrinsics[part],
                None if intrinsics is None else intrinsics[part],
                single_pass,
                report,
                _Scene(
                    tuple(names[index] for index in part), shape, exif_missing, fitted
                ),
            )

        def in_pose_unit(prediction: Prediction) -> bool:
            return options.align_to_input_scale and not any(
                note.startswith(UNDETERMINED_SCALE_NOTE) for note in prediction.notes
            )

        # Single-view models predict each view on its own: their chunks need no shared views.
        cameras = self.loaded.preset.cameras
        prediction = reconstruct_in_chunks(
            len(images),
            chunk,
            options.overlap_for(chunk) if cameras else 0,
            predict_chunk,
            # The user's poses put every chunk in their frame (and, where they fix it, unit).
            align=extrinsics is None and cameras,
            depth_unit_fixed=None if extrinsics is None else in_pose_unit,
            loop_closure=options.loop_closure,
            progress=report,
            seed=options.seed,
            time_budget=options.time_budget,
            spill_to=Path(tempfile.gettempdir()) if spill else None,
        )
        if shape is None or not fitted:
            return prediction
        note = _mixed_shapes_note(shape, list(fitted), options.mixed_shapes)
        logger.info("%s", note)
        return replace(prediction, notes=(note, *prediction.notes))

    def _view(
        self,
        name: str,
        input_rgb: np.ndarray,
        geometry: ViewGeometry,
        processed_rgb: np.ndarray,
        depth: np.ndarray,
        confidence: np.ndarray | None,
        sky: np.ndarray | None,
        extrinsics: np.ndarray | None,
        intrinsics: np.ndarray | None,
        resolution: OutputResolution,
    ) -> ViewPrediction:
        homogeneous = None
        if extrinsics is not None:
            homogeneous = np.eye(4, dtype=np.float32)
            homogeneous[:3, :] = extrinsics[:3, :]
        maps = [m for m in (depth, confidence, sky) if m is not None]
        crop_box = geometry.input_crop_box
        if resolution == "processing":
            image = processed_rgb
        else:
            # The region of the input the network saw, snapped outwards-in to whole pixels.
            x0, y0, x1, y1 = geometry.input_crop_box
            left, top = math.ceil(x0 - 1e-6), math.ceil(y0 - 1e-6)
            right, bottom = math.floor(x1 + 1e-6), math.floor(y1 + 1e-6)
            image = input_rgb[top:bottom, left:right]
            crop_box = (float(left), float(top), float(right), float(bottom))
            if intrinsics is not None:
                intrinsics = np.asarray(geometry.intrinsics_to_input(intrinsics.astype(np.float64)))
                intrinsics[0, 2] -= left
                intrinsics[1, 2] -= top
            maps = list(
                _resample_to_input(
                    np.stack(maps), geometry, (top, left), (bottom - top, right - left)
                )
            )
        depth = maps.pop(0)
        confidence = maps.pop(0) if confidence is not None else None
        # The sky score is resampled like depth, then thresholded as the network did.
        sky_mask = maps.pop(0) >= SKY_THRESHOLD if sky is not None else None
        return ViewPrediction(
            name=name,
            depth=_frozen(depth.astype(np.float32)),
            confidence=None if confidence is None else _frozen(confidence.astype(np.float32)),
            image=_frozen(np.array(image, copy=True)),
            extrinsics=None if homogeneous is None else _frozen(homogeneous),
            intrinsics=None if intrinsics is None else _frozen(intrinsics.astype(np.float32)),
            input_size=geometry.input_size,
            crop_box=crop_box,
            sky=None if sky_mask is None else _frozen(sky_mask),
            pixel_aspect=geometry.pixel_aspect,
        )


def _fitted_views(batch: PreparedBatch, names: Sequence[str], mixed_shapes: str) -> list[str]:
    """The views whose shape differed from the batch's, each named with its input size and
    what fitting it changed."""
    described = []
    for index in batch.reshaped:
        view = batch.views[index]
        input_height, input_width = view.input_size
        if mixed_shapes == "resize":
            change = f"pixel aspect {view.pixel_aspect:.3f}"
        else:
            x0, y0, x1, y1 = view.input_crop_box
            change = f"kept x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}"
        described.append(f"{names[index]} ({input_width}x{input_height}: {change})")
    return described


def _mixed_shapes_note(
    processing: tuple[int, int], described: Sequence[str], mixed_shapes: str
) -> str:
    """What happened to the views whose shape differed from the batch's ``processing``
    ``(height, width)`` (``described`` by :func:`_fitted_views`)."""
    height, width = processing
    how = (
        "resized whole (pixels no longer square; depth and intrinsics are mapped back to "
        "each whole input image)"
        if mixed_shapes == "resize"
        else "centre-cropped, as upstream does (outputs cover the kept part only)"
    )
    return (
        f"views of another shape than the batch's {width}x{height} were {how}: "
        f"{', '.join(described)}"
    )


def _numpy_or_none(tensor: torch.Tensor | None) -> np.ndarray | None:
    """First scene of a ``(B, S, ...)`` tensor as float32 numpy, or None."""
    return None if tensor is None else tensor[0].float().cpu().numpy()


def _exif_intrinsics(
    images: Sequence[ImageSource], sizes: Sequence[tuple[int, int]], names: Sequence[str]
) -> tuple[np.ndarray | None, str]:
    """``(N, 3, 3)`` input-pixel intrinsics from every view's EXIF focal length (principal
    point at the centre of its ``(height, width)``), or None and the reason when a view
    (named by ``names``) has none."""
    matrices = []
    for source, (height, width), name in zip(images, sizes, names, strict=True):
        focal = exif_focal(source)
        if isinstance(focal, str):
            return None, f"{name}: {focal}"
        matrices.append([[focal.fx, 0.0, width / 2], [0.0, focal.fy, height / 2], [0, 0, 1]])
    return np.array(matrices, dtype=np.float64), ""


def _gaussians(
    output: NetworkOutput,
    extrinsics: np.ndarray | None,
    intrinsics: np.ndarray | None,
    unit: float,
) -> Gaussians:
    """The network's Gaussians placed with the Prediction's cameras (processing resolution)
    and in its depth unit (``unit``: Prediction unit per network unit)."""
    parameters = output.gaussian_parameters
    if parameters is None or extrinsics is None or intrinsics is None:
        raise RuntimeError("the network returned no Gaussian parameters or cameras")
    device = parameters.raw.device
    parameters = parameters.rescaled(torch.full((1,), unit, device=device))
    world = build_gaussians(
        parameters,
        torch.from_numpy(np.asarray(extrinsics, dtype=np.float32))[None].to(device),
        torch.from_numpy(np.asarray(intrinsics, dtype=np.float32))[None].to(device),
    )
    _, views, height, width = parameters.depth.shape

    def flat(x: torch.Tensor, *shape: int) -> np.ndarray:
        return _frozen(x[0].float().cpu().numpy().reshape(views * height * width, *shape))

    return Gaussians(
        means=flat(world.means, 3),
        scales=flat(world.scales, 3),
        rotations=flat(world.rotations, 4),
        harmonics=flat(world.harmonics, 3, 9),
        opacities=flat(world.opacities),
        grid=(views, height, width),
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
