"""Peak memory of a request, estimated before any model runs, the memory this process has,
and the chunk size that makes a request fit (:func:`plan_chunk`).

The estimate is a linear model fitted to measured peaks (``bench/memory_model.py`` measures
them; its table is in bench/README.md), deliberately an upper bound:

* the network's activations, three terms: the backbone's
  (``ACTIVATION_BYTES_PER_TOKEN_CHANNEL`` x tokens of every view x the backbone's width: its
  output layers are kept for every view and its attention sees them all), the head's
  (``HEAD_BYTES_PER_PIXEL_CHANNEL`` x the processing pixels of the views one head call takes,
  at least ``HEAD_CHUNK_VIEWS`` of them, x the head's width) and its full-resolution tails'
  (``TAIL_BYTES_PER_PIXEL_CHANNEL`` x the processing pixels of the views whose tails run at
  once x the head's width: one view on a CPU; on a GPU as many as fit,
  :func:`plan_head_views`). A nested preset's branches run one after the other, so the larger
  of the two counts, the metric branch's with the any-view branch's outputs held beside it.
  On a CPU they are host memory, on a GPU device memory (fitted on CPU float32; the GPU runs
  the backbone in bf16, so the bound is looser there);
* each view as decoded (3 bytes a pixel) and its outputs at the output resolution, through
  the exporters (``OUTPUT_BYTES_PER_PIXEL``; plus ``EXPORT_IMAGE_BYTES_PER_PIXEL`` of the
  largest view for each of the ``EXPORT_WRITERS`` encoding views at once), and the point
  clouds' points (``POINT_BYTES`` for each of at most ``max_points``;
  ``TRACKED_POINT_BYTES`` with the multi-view tracks of a COLMAP model);
* Gaussians: ``GAUSSIAN_BYTES`` for each (one per processing pixel of every view) and
  ``GAUSSIAN_ADAPTER_BYTES`` for each the adapter builds at once; on a GPU on the device
  (where they are built) as well as on the host (where they are exported).

Available memory is what the kernel would give this process before the OOM killer acts: the
smaller of ``MemAvailable`` and the cgroup's limit minus its usage, less a safety margin.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from da3cog.io.preprocess import (
    DEFAULT_RESIZE_METHOD,
    PATCH_SIZE,
    processing_size,
    scene_processing_shape,
)
from da3cog.model.gaussian_adapter import ADAPTER_PIXELS
from da3cog.model.network import HEAD_CHUNK_VIEWS
from da3cog.model.presets import ModelPreset

if TYPE_CHECKING:
    import torch

# The network's three terms: the tightest upper bound of 86 peaks measured on CPUs (small, base,
# large and giant, 1 to 64 views, 280 and 504 px, tails one at a time and all at once;
# `bench/memory_model.py --fit bench/results/cpu-*/memory_model*.log`: 67.4, 7.13
# and 6.97), times 1.2 rounded up, for the spread of a point measured again (bench/README.md);
# tests/test_memory_budget.py holds them to those logs.
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 81
HEAD_BYTES_PER_PIXEL_CHANNEL = 9
TAIL_BYTES_PER_PIXEL_CHANNEL = 9
# What a nested preset's any-view branch holds while its metric branch runs: its outputs (the
# pipeline has it drop the backbone's features, ``keep_intermediates=False``).
HELD_BYTES_PER_PIXEL = 64
# Every view's outputs (depth, confidence, colours: 11 bytes a pixel kept) and what the
# exporters copy of all views at once (shared percentile ranges, stacked NPZ arrays, COLMAP
# tracks): a served request with every format grew by 35.2 bytes per added output pixel,
# decoded views and network included (bench/memory_outputs.py, bench/README.md).
OUTPUT_BYTES_PER_PIXEL = 40
# Per-view files are encoded by this many writers at once (da3cog.export.files), each holding
# one view's image in the making: about EXPORT_IMAGE_BYTES_PER_PIXEL of its output pixels
# (measured: 45-67 for the depth visualisation and the images of every format).
EXPORT_WRITERS = min(4, os.cpu_count() or 1)
EXPORT_IMAGE_BYTES_PER_PIXEL = 64
POINT_BYTES = 500
# A point of a COLMAP model also carries its multi-view track, at most
# da3cog.export.colmap.MAX_TRACK_LENGTH observations of about 100 bytes each while the tracks
# are built: the whole export measured 3405 bytes a point (30 views of 80x60, 40,000 points)
# and 2669 (80 views of 160x120, 200,000 points; tracemalloc), with a fifth more.
TRACKED_POINT_BYTES = 4100
DECODED_BYTES_PER_PIXEL = 3
# Gaussians, per processing pixel: the GS head's raw outputs and the world-space Gaussians
# built from them, kept until the request ends, and the adapter's temporaries over the pixels
# it builds at once (da3cog.model.gaussian_adapter.ADAPTER_PIXELS). Measured through the
# library with a ViT-S stand-in (16 and 32 views at 280 px, bench/README.md): 405 bytes a
# pixel of growth and about 150 MiB of temporaries; with a fifth more for the spread.
GAUSSIAN_BYTES = 488
# What a chunked run that spills its outputs (da3cog.chunked.spill_view) writes to disk: each
# output pixel's depth and confidence (float32), colour (3 bytes) and sky flag; each
# Gaussian's float32 centre, scales, rotation, 27 harmonics and opacity.
SPILLED_BYTES_PER_OUTPUT_PIXEL = 4 + 4 + 3 + 1
SPILLED_BYTES_PER_GAUSSIAN = 4 * (3 + 3 + 4 + 27 + 1)
GAUSSIAN_ADAPTER_BYTES = 360
# Share of the available memory a request may plan to use.
SAFETY_FRACTION = 0.8

GIB = 1024**3


@dataclass(frozen=True)
class RequestSize:
    """What a request will process.

    Attributes:
        view_pixels: each view's pixels as handed to the model (width x height).
        processing_pixels: each view's pixels at the processing size: the shape the scene's
            views are all fitted to (:func:`~da3cog.io.preprocess.scene_processing_shape`).
        output_pixels: each view's pixels at the output resolution.
        gaussians: whether Gaussians are predicted.
        points: points the point-cloud exports may keep (0: no point cloud).
        tracked: whether those points get multi-view tracks (a COLMAP model).
    """

    view_pixels: tuple[int, ...]
    processing_pixels: tuple[int, ...]
    output_pixels: tuple[int, ...]
    gaussians: bool = False
    points: int = 0
    tracked: bool = False


def request_size(
    sizes: Sequence[tuple[int, int]],
    process_res: int,
    output: str,
    gaussians: bool,
    points: int,
    tracked: bool = False,
    *,
    resize_method: str = DEFAULT_RESIZE_METHOD,
    mixed_shapes: str | None = "resize",
) -> RequestSize:
    """The :class:`RequestSize` of views of these ``(width, height)`` sizes, processed at
    ``process_res`` by ``resize_method`` and fitted to one shape by ``mixed_shapes`` (as
    :func:`~da3cog.io.preprocess.prepare_images` will: a ``lower_bound`` method puts the
    shorter side at ``process_res``, and a panorama among photos is resized to theirs);
    ``mixed_shapes=None``: each view at its own shape (views run one at a time)."""
    shapes = [
        processing_size((height, width), process_res, resize_method, index)
        for index, (width, height) in enumerate(sizes)
    ]
    if mixed_shapes is not None and shapes:
        shapes = [scene_processing_shape(shapes, mixed_shapes)] * len(shapes)
    processing = tuple(height * width for height, width in shapes)
    views = tuple(width * height for width, height in sizes)
    outputs = views if output == "input" else processing
    return RequestSize(views, processing, outputs, gaussians, min(points, sum(outputs)), tracked)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a request beyond what the worker already holds."""

    host: int
    device: int

    def describe(self) -> str:
        if self.device:
            return f"{self.host / GIB:.1f} GiB of RAM and {self.device / GIB:.1f} GiB of GPU memory"
        return f"{self.host / GIB:.1f} GiB of RAM"


def network_terms(
    preset: ModelPreset, size: RequestSize, head_views: int = 1
) -> tuple[int, int, int]:
    """What the network's three constants multiply (module docstring), for one branch of
    ``preset``: tokens x backbone width, the pixels of one head call's views x head width,
    the pixels of ``head_views`` tails x head width (the largest views each time)."""
    tokens = sum(p // PATCH_SIZE**2 + 1 for p in size.processing_pixels)
    largest = sorted(size.processing_pixels, reverse=True)
    head_call = largest[: max(HEAD_CHUNK_VIEWS, head_views)]
    tails = largest[:head_views]
    features = preset.head.features
    return tokens * preset.backbone.embed_dim, sum(head_call) * features, sum(tails) * features


def network_bytes(preset: ModelPreset, size: RequestSize, head_views: int = 1) -> int:
    """The network's activation peak (see the module docstring) with the heads'
    full-resolution tails over ``head_views`` views at once, run as the pipeline runs it
    (``keep_intermediates=False``). A nested preset runs its branches one after the other:
    the larger of the any-view branch's peak and the metric branch's on top of what the
    any-view branch holds meanwhile (its outputs)."""
    backbone, head, tails = network_terms(preset, size, head_views)
    total = ACTIVATION_BYTES_PER_TOKEN_CHANNEL * backbone
    total += HEAD_BYTES_PER_PIXEL_CHANNEL * head + TAIL_BYTES_PER_PIXEL_CHANNEL * tails
    if preset.metric_branch is None:
        return total
    held = HELD_BYTES_PER_PIXEL * sum(size.processing_pixels)
    return max(total, held + network_bytes(preset.metric_branch, size, head_views))


def head_views(
    preset: ModelPreset, views: int, processing_size: tuple[int, int], device: torch.device
) -> int:
    """Views whose head tails a forward of ``views`` images of ``processing_size`` (height,
    width) runs at once on ``device``: one at a time on a CPU, where batching them measured
    no faster; on a GPU, where fewer kernel launches pay (1.6x for small at 32 views on an
    H200, bench/README.md), as many as its free memory holds."""
    if device.type != "cuda":
        return 1
    pixels = (processing_size[0] * processing_size[1],) * views
    return plan_head_views(preset, RequestSize(pixels, pixels, pixels), device_budget(device))


def plan_head_views(preset: ModelPreset, size: RequestSize, device: int | None) -> int:
    """Views whose head tails a forward of ``size`` runs at once within ``device`` bytes: as
    many as it holds beside the rest of the network's activations (all of them when it holds
    them), 1 when even that does not fit or there is no budget (None)."""
    views = len(size.processing_pixels)
    if device is None or views <= 1:
        return 1
    # network_bytes grows with n: the count of n that fit is the largest that does.
    fitting = bisect.bisect_right(
        range(1, views + 1), device, key=lambda n: network_bytes(preset, size, n)
    )
    return max(fitting, 1)


def estimate(
    preset: ModelPreset, size: RequestSize, on_gpu: bool, chunk: int | None = None
) -> MemoryEstimate:
    """Peak memory of a request with ``preset`` (weights excluded: they are loaded already).
    ``chunk``: the request runs in chunks of this many views (:mod:`da3cog.chunked`), so the
    network holds the activations of one chunk (its largest views) while every view's
    decoded image and outputs are kept."""
    views = DECODED_BYTES_PER_PIXEL * sum(size.view_pixels)
    point_bytes = TRACKED_POINT_BYTES if size.tracked else POINT_BYTES
    outputs = OUTPUT_BYTES_PER_PIXEL * sum(size.output_pixels) + point_bytes * size.points
    writers = min(EXPORT_WRITERS, len(size.output_pixels))
    outputs += EXPORT_IMAGE_BYTES_PER_PIXEL * writers * max(size.output_pixels, default=0)
    network_size = size
    if chunk is not None and chunk < len(size.processing_pixels):
        largest = tuple(sorted(size.processing_pixels, reverse=True)[:chunk])
        network_size = RequestSize(largest, largest, largest)
    network = network_bytes(preset, network_size)
    gaussians = _gaussian_bytes(size.processing_pixels) if size.gaussians else 0
    if on_gpu:
        # The Gaussians are built on the device a chunk at a time, then copied to the host
        # for the exports: the device holds one chunk's.
        held = _gaussian_bytes(network_size.processing_pixels) if size.gaussians else 0
        return MemoryEstimate(host=views + outputs + gaussians, device=network + held)
    return MemoryEstimate(host=views + outputs + gaussians + network, device=0)


def _gaussian_bytes(processing_pixels: Sequence[int]) -> int:
    """The Gaussians of views of these processing pixels, and the adapter's temporaries."""
    at_once = max(ADAPTER_PIXELS, max(processing_pixels, default=0))
    total = sum(processing_pixels)
    return GAUSSIAN_BYTES * total + GAUSSIAN_ADAPTER_BYTES * min(at_once, total)


def spilled_bytes(size: RequestSize) -> int:
    """Disk a chunked run of ``size`` takes when its outputs are spilled to files."""
    gaussians = SPILLED_BYTES_PER_GAUSSIAN * sum(size.processing_pixels) if size.gaussians else 0
    return SPILLED_BYTES_PER_OUTPUT_PIXEL * sum(size.output_pixels) + gaussians


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_host_bytes() -> int | None:
    """Memory this process can still take: ``MemAvailable``, bounded by the cgroup (v2 or
    v1) limit minus its usage; None where neither can be read."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        # An unlimited v1 cgroup reports a huge page-rounded number.
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(limit - usage, 0))
            break
    return min(candidates) if candidates else None


def available_device_bytes(device: torch.device | None = None) -> int | None:
    """Memory this process can still allocate on ``device`` (default: the current CUDA
    device; None without CUDA): what the driver reports free plus what PyTorch's caching
    allocator holds reserved but unused (a previous request's or chunk's blocks, reused before
    the driver is asked for more; the driver counts them as taken)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(int(cached), 0)


MEMORY_BUDGET_ENV = "DA3COG_MEMORY_BUDGET_GB"


def host_budget(reserved: int = 0) -> int | None:
    """Bytes a request may plan to use: ``$DA3COG_MEMORY_BUDGET_GB`` when set (tests, or a
    host shared with other work: the request's own), else a share of the available memory
    less ``reserved`` bytes that are about to be taken before it runs (a model to load)."""
    override = os.environ.get(MEMORY_BUDGET_ENV)
    if override:
        try:
            gib = float(override)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib > 0):
            raise ValueError(
                f"${MEMORY_BUDGET_ENV} must be a number of GiB above 0 (say 8 or 0.5), got "
                f"{override!r}"
            )
        return int(gib * GIB)
    available = available_host_bytes()
    return None if available is None else int(max(available - reserved, 0) * SAFETY_FRACTION)


def device_budget(device: torch.device | None = None, reserved: int = 0) -> int | None:
    """Bytes a request may plan to use on ``device`` (default: the current CUDA device; None
    without CUDA): a share of what it can still allocate, less ``reserved`` bytes about to be
    taken before it runs."""
    available = available_device_bytes(device)
    return None if available is None else int(max(available - reserved, 0) * SAFETY_FRACTION)


# Chunks of views a request that does not fit one pass may run as: at least 4 (two shared
# views and two new ones), at most upstream's streaming default.
MIN_CHUNK, MAX_CHUNK = 4, 120


def fits(needed: MemoryEstimate, host: int | None, device: int | None) -> bool:
    """Whether ``needed`` fits the budgets (None: unbounded)."""
    return (host is None or needed.host <= host) and (device is None or needed.device <= device)


def plan_chunk(
    preset: ModelPreset,
    size: RequestSize,
    on_gpu: bool,
    host: int | None,
    device: int | None,
) -> int | None:
    """How a request of ``size`` fits the budgets: None in one pass, else the largest chunk
    of views (``MIN_CHUNK`` to ``MAX_CHUNK``) whose activations fit beside every view's
    outputs; ``MIN_CHUNK`` when even that does not (the estimate is an upper bound: the
    smallest chunk is the best chance)."""
    if fits(estimate(preset, size, on_gpu), host, device):
        return None
    views = len(size.processing_pixels)
    if views <= MIN_CHUNK:
        return None
    fitting = [
        chunk
        for chunk in range(MIN_CHUNK, min(views, MAX_CHUNK + 1))
        if fits(estimate(preset, size, on_gpu, chunk=chunk), host, device)
    ]
    return max(fitting, default=MIN_CHUNK)


def out_of_memory(error: BaseException) -> str | None:
    """What ran out when ``error`` is an allocation failure ("GPU memory" for an
    accelerator's, "memory" for the host's: PyTorch's CPU allocator or NumPy refused), else
    None. The estimate is an upper bound fitted on measured peaks, not a guarantee (on a GPU
    it is fitted on CPU measurements), so callers turn such a failure into a refusal that
    names the request."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return "GPU memory"
    if isinstance(error, MemoryError):
        return "memory"
    # PyTorch's CPU allocator raises a plain RuntimeError.
    if isinstance(error, RuntimeError) and "can't allocate memory" in str(error):
        return "memory"
    return None


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``): large temporary
    buffers (a request's, a chunk's) otherwise stay in the process's RSS, where the next
    request's memory budget would see them as used and a long chunked run would grow. A no-op
    where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
