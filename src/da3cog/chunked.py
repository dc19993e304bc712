"""Scenes larger than one forward pass: overlapping chunks of views, each predicted as usual,
aligned into one world frame and unit.

The views are split into chunks of ``size`` consecutive views, each sharing ``overlap`` views
with the one before (:func:`chunk_ranges`). Every chunk is predicted on its own, by the same
stages as a single pass. A chunk's world is its own (its first view's camera, its own relative
unit), so each chunk after the first is mapped into the first chunk's world by a similarity
(scale, rotation, translation) fitted on the views it shares with the previous chunk, as that
chunk was placed in the world: the same pixels of the same frames seen in both, confidence-
weighted, with Huber reweighting against bad depth (:func:`da3cog.geometry.robust_similarity`).
Each view is emitted once: a shared view comes from the chunk in which it is farther from the
edge (the first half of an overlap from the earlier chunk). Each emitted view records
the chunk that produced it and that chunk's alignment residual.

Requests with the user's own poses need no similarity: every chunk is conditioned on the
user's cameras and is in the user's frame, and in their unit where the poses fix it. Where
they do not (``align_to_input_scale`` off, or a chunk whose cameras all sit in one place),
each chunk's depth is in its own relative unit and is brought to the previous chunk's by one
factor fitted on the views they share (:func:`fit_depth_scale`). Single-view models (mono,
metric) predict every view on its own, so their chunks share no view and are simply
concatenated (a view's depth is then that of one pass, but for the sky's, which these models
fill with a high percentile of the other depth of the batch: of the view's chunk). Every chunk
fits its views to the processing shape one pass over the whole scene would take, so a shared
view is the same pixels in both of its chunks. 3D Gaussians follow
their chunk's similarity (:func:`transform_gaussians`) and are kept for the emitted views.

With ``loop_closure``, the places a long sequence comes back to are found after the chunks
ran, each checked by one more chunk of the views around both ends, and the chunks' placements
re-solved with the kept loops (:mod:`da3cog.loops`); every view and Gaussian then moves with
its chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from da3cog.geometry import (
    RobustFit,
    Similarity,
    apply_similarity,
    camera_centres,
    compose_similarities,
    invert_similarity,
    matrix_to_quaternion,
    pixels_to_world_points,
    project_points,
    quaternion_to_matrix,
    robust_similarity,
    similarity_world_to_camera,
    weighted_median,
)
from da3cog.io.inputs import first_few
from da3cog.loops import (
    Constraint,
    appearance_descriptor,
    find_loops,
    optimise_pose_graph,
    rotation_disagreement,
)
from da3cog.memory import trim_heap
from da3cog.model.gaussian_adapter import rotate_harmonics
from da3cog.pipeline import Gaussians, Prediction, ViewPrediction

IDENTITY = Similarity(rotation=np.eye(3), translation=np.zeros(3), scale=1.0)
# Pixel pairs an alignment fits on at most (an even, seeded subsample of the shared views).
MAX_ALIGNMENT_POINTS = 200_000
# ... and at least, spread across the shared views by at least MIN_ALIGNMENT_SPREAD of their
# median depth in the second direction of their spread (a plane is enough; a patch or a line
# is not): the few pixels of a small patch fit a wrong similarity within their own noise (9
# pixels placed a chunk 17 degrees off with a residual of 0.8% of depth). A full shared view
# spreads about 0.3 of its depth.
MIN_ALIGNMENT_PIXELS = 64
MIN_ALIGNMENT_SPREAD = 0.05


def chunk_ranges(count: int, size: int, overlap: int) -> list[range]:
    """Chunks of ``size`` consecutive views of ``count``, each sharing ``overlap`` views with
    the previous one; the last chunk ends at the last view and is full-size too (it shares
    more views with the one before when the step does not divide evenly). One chunk when
    ``count <= size``."""
    if size < 2:
        raise ValueError(f"chunk size must be at least 2 views, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(
            f"chunk overlap must be between 0 and size - 1 = {size - 1}, got {overlap}"
        )
    if count <= size:
        return [range(count)]
    step = size - overlap
    starts = list(range(0, count - size, step))
    starts.append(count - size)
    return [range(start, start + size) for start in starts]


def emitted_views(chunks: Sequence[range]) -> list[range]:
    """Which views each chunk emits: every view once, a shared view from the chunk where it
    is farther from the edge (the first half of an overlap from the earlier chunk)."""
    emitted = []
    for index, chunk in enumerate(chunks):
        start, stop = chunk.start, chunk.stop
        if index > 0:
            previous = chunks[index - 1]
            start = previous.stop - (previous.stop - chunk.start) // 2
        if index + 1 < len(chunks):
            following = chunks[index + 1]
            stop = chunk.stop - (chunk.stop - following.start) // 2
        emitted.append(range(start, stop))
    return emitted


def _world_points_at(view: ViewPrediction, flat: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """``(P, 3)`` world points of the view's pixels ``flat`` (flat indices into its
    ``H x W`` grid), at their pixel centres and ``depth`` (:func:`_depth_at` there)."""
    rows, cols = np.divmod(flat, view.width)
    return pixels_to_world_points(
        torch.from_numpy(depth),
        torch.from_numpy(rows),
        torch.from_numpy(cols),
        torch.from_numpy(np.asarray(view.intrinsics, dtype=np.float64)),
        torch.from_numpy(np.asarray(view.extrinsics, dtype=np.float64)),
    ).numpy()


def _depth_at(view: ViewPrediction, flat: np.ndarray) -> np.ndarray:
    return np.asarray(view.depth).ravel()[flat].astype(np.float64)


def _surface(view: ViewPrediction) -> np.ndarray:
    """``(H, W)``: pixels with a finite positive depth that are not sky."""
    depth = np.asarray(view.depth)
    surface = np.isfinite(depth) & (depth > 0)
    if view.sky is not None:
        surface &= ~np.asarray(view.sky, dtype=bool)
    return surface


def _confidence_weight(view: ViewPrediction) -> np.ndarray:
    """DA3's confidence starts at 1: its excess over 1 weighs a pixel (1 without one)."""
    if view.confidence is None:
        return np.ones(view.depth.shape)
    return np.clip(np.asarray(view.confidence, dtype=np.float64) - 1.0, 0.0, None)


def _usable_pairs(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction]
) -> Iterator[tuple[ViewPrediction, ViewPrediction, np.ndarray, np.ndarray]]:
    """Each shared view as both chunks predicted it, with the pixels both give a surface
    at, and their weight (the two confidences' geometric mean)."""
    for before, after in zip(earlier, later, strict=True):
        if before.depth.shape != after.depth.shape:
            raise ValueError(f"view {after.name}: its chunks predicted different sizes")
        weight = np.sqrt(_confidence_weight(before) * _confidence_weight(after))
        usable = np.isfinite(weight) & (weight > 0) & _surface(before) & _surface(after)
        yield before, after, usable, weight


def _shared_pixels(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction], count: int, seed: int
) -> tuple[list[tuple[ViewPrediction, ViewPrediction, np.ndarray, np.ndarray]], int]:
    """An even, seeded sample of at most ``count`` of the usable pixels of the shared views
    (:func:`_usable_pairs`), drawn before anything is computed at them, so that a fit takes
    the memory of its sample rather than of every pixel of the views at the output
    resolution: for each view, both chunks' predictions of it, the sampled pixels' flat
    indices and their weights; and how many usable pixels there were in all."""
    # Two passes over the views (counts, then the sample), each holding one view's masks at
    # a time: keeping every view's usable pixels between them would cost what this saves.
    counts = [int(np.count_nonzero(usable)) for _, _, usable, _ in _usable_pairs(earlier, later)]
    total = sum(counts)
    pick = _even_sample(total, count, seed)
    pick = None if pick is None else np.sort(pick)
    starts = np.cumsum([0, *counts])
    sampled = []
    for index, (before, after, usable, weight) in enumerate(_usable_pairs(earlier, later)):
        flat = np.flatnonzero(usable)
        if pick is not None:
            low, high = np.searchsorted(pick, starts[index : index + 2])
            flat = flat[pick[low:high] - starts[index]]
        sampled.append((before, after, flat, weight.ravel()[flat]))
    return sampled, total


@dataclass(frozen=True)
class OverlapPoints:
    """The pixels two chunks both see on the views they share, as point pairs: ``source``
    ``(N, 3)`` in the later chunk's world, ``target`` ``(N, 3)`` in the earlier one's, their
    ``weight`` ``(N,)``, and ``depth``: the median depth of the earlier chunk there (the unit
    residuals are given in)."""

    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    depth: float

    def sample(self, count: int, seed: int = 0) -> OverlapPoints:
        """At most ``count`` of the pairs (an even, seeded sample)."""
        pick = _even_sample(len(self.source), count, seed)
        if pick is None:
            return self
        return OverlapPoints(self.source[pick], self.target[pick], self.weight[pick], self.depth)

    def residual(self, source_to_world: Similarity, target_to_world: Similarity) -> float:
        """The weighted median distance between the pairs once each chunk is placed in the
        world by its similarity, relative to ``depth`` as placed (a fit's residual, read
        again after the placements changed)."""
        distance = np.linalg.norm(
            apply_similarity(self.source, source_to_world)
            - apply_similarity(self.target, target_to_world),
            axis=1,
        )
        return weighted_median(distance, self.weight) / (self.depth * target_to_world.scale)


def _even_sample(size: int, count: int, seed: int) -> np.ndarray | None:
    """Indices of an even, seeded sample of ``count`` of ``size`` items (None: keep all)."""
    if size <= count:
        return None
    return np.random.default_rng(seed).choice(size, count, False)


def fit_chunk(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction], seed: int = 0
) -> tuple[RobustFit, float]:
    """The similarity taking the ``later`` chunk's world onto the ``earlier`` one's, fitted on
    the same views as each chunk predicted them (same pixels); and its residual relative to
    the views' median depth."""
    fit, residual, _ = fit_overlap(earlier, later, seed)
    return fit, residual


def fit_overlap(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction], seed: int = 0
) -> tuple[RobustFit, float, OverlapPoints]:
    """:func:`fit_chunk`, and the point pairs it was fitted on (at most
    ``MAX_ALIGNMENT_POINTS``, an even sample of the usable pixels)."""
    sampled, total = _shared_pixels(earlier, later, MAX_ALIGNMENT_POINTS, seed)
    _check_enough_pixels(total)
    sources, targets, weights, depths = [], [], [], []
    for before, after, flat, weight in sampled:
        depth = _depth_at(before, flat)
        target = _world_points_at(before, flat, depth)
        source = _world_points_at(after, flat, _depth_at(after, flat))
        finite = np.isfinite(target).all(-1) & np.isfinite(source).all(-1)
        sources.append(source[finite])
        targets.append(target[finite])
        weights.append(weight[finite])
        depths.append(depth[finite])
    source, target = np.concatenate(sources), np.concatenate(targets)
    weight, depth = np.concatenate(weights), np.concatenate(depths)
    _check_enough_pixels(len(source))
    spread = _spread(target, weight) / float(np.median(depth))
    if spread < MIN_ALIGNMENT_SPREAD:
        raise ValueError(
            f"their {total} usable pixels are bunched together (spread over "
            f"{spread:.1%} of their depth, at least {MIN_ALIGNMENT_SPREAD:.0%} needed to fix "
            "a rotation)"
        )
    points = OverlapPoints(source, target, weight, float(np.median(depth)))
    fit = robust_similarity(source, target, weight)
    return fit, fit.residual / points.depth, points


def fit_depth_scale(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction]
) -> tuple[float, float]:
    """The factor taking the ``later`` chunk's depth onto the ``earlier`` one's on the same
    views (same pixels; for chunks in one frame whose depth units differ): the
    confidence-weighted median of the depth ratios (robust to bad depth); and its residual,
    the weighted median of the differences left, relative to the median depth."""
    return _depth_factor(earlier, later, rescaled=True)


def depth_agreement(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction]
) -> tuple[float, float]:
    """How the depths of two chunks in one frame and unit (the user's poses fixed both)
    agree on the views they share, left as they are: the factor :func:`fit_depth_scale`
    would fit (1 where they agree) and the residual without it, relative to the median
    depth."""
    return _depth_factor(earlier, later, rescaled=False)


def _depth_factor(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction], rescaled: bool
) -> tuple[float, float]:
    """The weighted median of the depth ratios earlier / later on the usable shared pixels
    (at most ``MAX_ALIGNMENT_POINTS``, an even sample), and the weighted median difference
    left (after that factor where ``rescaled``), relative to the median depth."""
    sampled, total = _shared_pixels(earlier, later, MAX_ALIGNMENT_POINTS, seed=0)
    _check_enough_pixels(total)
    before = np.concatenate([_depth_at(view, flat) for view, _, flat, _ in sampled])
    after = np.concatenate([_depth_at(view, flat) for _, view, flat, _ in sampled])
    weight = np.concatenate([weight for *_, weight in sampled])
    factor = weighted_median(before / after, weight)
    residual = weighted_median(np.abs((factor if rescaled else 1.0) * after - before), weight)
    return factor, residual / float(np.median(before))


class TooFewPixels(ValueError):
    """The shared views have too few usable pixels to fit or compare chunks on."""


def _check_enough_pixels(count: int) -> None:
    if count < MIN_ALIGNMENT_PIXELS:
        raise TooFewPixels(
            f"they have {count} usable pixel(s), fewer than the {MIN_ALIGNMENT_PIXELS} an "
            "alignment needs (the rest sky, without depth or confidence, or where a camera or "
            "depth is not finite)"
        )


def _spread(points: np.ndarray, weight: np.ndarray) -> float:
    """The weighted spread of ``points (N, 3)`` in its second direction (the square root of
    their covariance's middle eigenvalue): small for points bunched in a patch or on a
    line, however far they are."""
    share = weight / weight.sum()
    centred = points - share @ points
    covariance = (centred * share[:, None]).T @ centred
    return float(np.sqrt(max(np.linalg.eigvalsh(covariance)[1], 0.0)))


def rescale_chunk(prediction: Prediction, factor: float) -> Prediction:
    """The chunk with its depth times ``factor``, cameras as they are (a chunk in the user's
    frame, in another depth unit); each view's Gaussians scaled about its camera centre."""
    views = tuple(
        dataclasses.replace(view, depth=_frozen(np.asarray(view.depth) * np.float32(factor)))
        for view in prediction.views
    )
    gaussians = prediction.gaussians
    if gaussians is not None:
        parts = []
        for index, view in enumerate(prediction.views):
            centre = camera_centres(np.asarray(view.extrinsics)[None])[0]
            about_camera = Similarity(np.eye(3), (1.0 - factor) * centre, factor)
            parts.append(transform_gaussians(_gaussians_of(gaussians, [index]), about_camera))
        gaussians = _concatenate(parts)
    return dataclasses.replace(prediction, views=views, gaussians=gaussians)


def _frozen(array: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(array, dtype=np.float32)
    values.flags.writeable = False
    return values


def transform_view(view: ViewPrediction, similarity: Similarity) -> ViewPrediction:
    """The view in the world mapped by ``similarity``: depth times its scale, cameras moved
    with the world (:func:`da3cog.geometry.similarity_world_to_camera`), intrinsics as they
    are."""
    if similarity is IDENTITY:
        return view
    depth = _frozen(np.asarray(view.depth, dtype=np.float32) * np.float32(similarity.scale))
    extrinsics = _frozen(similarity_world_to_camera(view.extrinsics, similarity))
    return dataclasses.replace(view, depth=depth, extrinsics=extrinsics)


# The per-pixel arrays of a view, the bulk of what a long run keeps.
SPILLED_ARRAYS = ("depth", "confidence", "image", "sky")


def spill_view(
    view: ViewPrediction, folder: Path, arrays: Sequence[str] = SPILLED_ARRAYS
) -> ViewPrediction:
    """The view with its per-pixel ``arrays`` moved into memory-mapped files in ``folder``:
    read-only arrays backed by the disk, so a long run keeps its outputs in the page cache,
    which the kernel can write back and drop, instead of its own heap. Each file is unlinked
    as soon as it is mapped: it goes away with the last array that uses it, whatever happens
    to the run."""
    spilled = {}
    for name in arrays:
        value = getattr(view, name)
        if value is not None:
            spilled[name] = spill_arrays([value], folder, f"view {view.name}: {name}")
    return dataclasses.replace(view, **spilled)


class SpillFailed(OSError):
    """Outputs could not be written to their memory-mapped files (a full disk)."""


def spill_arrays(parts: Sequence[np.ndarray], folder: Path, what: str) -> np.ndarray:
    """``parts`` (arrays of one dtype and trailing shape) joined along their first axis into
    a read-only array mapped from a file in ``folder`` that has no name: nothing is left on
    the disk however the process ends, and the space goes back with the last array that uses
    it. :class:`SpillFailed` naming ``what`` and the folder when the disk is full."""
    if not parts or any(np.ndim(part) == 0 for part in parts):
        raise ValueError(f"{what}: nothing to spill, or a scalar")
    first = np.asarray(parts[0])
    shape = (sum(len(part) for part in parts), *first.shape[1:])
    if not all(part.dtype == first.dtype and part.shape[1:] == first.shape[1:] for part in parts):
        raise ValueError(f"{what}: parts of different dtypes or shapes")
    if not math.prod(shape) or not first.itemsize:
        return _frozen(np.zeros(shape, first.dtype))
    with (
        _spill_errors(what, folder),
        tempfile.TemporaryFile(dir=folder, prefix=".da3cog-") as stream,
    ):
        for part in parts:
            _write_rows(stream, part)
        stream.flush()
        return np.memmap(stream, dtype=first.dtype, mode="r", shape=shape)


def _write_rows(stream: IO[bytes], array: np.ndarray) -> None:
    """``array``'s rows into ``stream``, in slices of at most 64 MiB (a spilled array is
    read from its own file, not copied whole)."""
    rows = max(1, (64 << 20) // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        stream.write(np.ascontiguousarray(array[start : start + rows]).data)


@contextlib.contextmanager
def _spill_errors(what: str, folder: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise SpillFailed(
            f"{what}: could not be written to a memory-mapped file in {folder} (TMPDIR): "
            f"{error.strerror or error}. Free space there, or point TMPDIR at a disk with room"
        ) from error


GAUSSIAN_ARRAYS = ("means", "scales", "rotations", "harmonics", "opacities")


class SpilledGaussians:
    """The Gaussians of a spilled run, on the disk once: each chunk's appended to one
    nameless file per array (as :func:`spill_arrays` makes them), moved there in place by a
    loop closure, and mapped whole at the end (per-chunk files joined at the end held them
    twice)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.streams: dict[str, IO[bytes]] = {}
        # Each array's dtype and shape past the first axis; each chunk's first Gaussian and
        # count; the grid's height and width.
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.parts: list[tuple[int, int]] = []
        self.view_size: tuple[int, int] | None = None

    def append(self, part: Gaussians) -> None:
        if self.view_size is None:
            self.view_size = part.grid[1:]
            for name in GAUSSIAN_ARRAYS:
                array = np.asarray(getattr(part, name))
                self.layout[name] = (array.dtype, array.shape[1:])
                with _spill_errors(f"Gaussians: {name}", self.folder):
                    self.streams[name] = tempfile.TemporaryFile(dir=self.folder, prefix=".da3cog-")
        _check_view_sizes({self.view_size, part.grid[1:]})
        start = sum(count for _, count in self.parts)
        for name in GAUSSIAN_ARRAYS:
            with _spill_errors(f"Gaussians: {name}", self.folder):
                _write_rows(self.streams[name], np.asarray(getattr(part, name)))
        self.parts.append((start, len(part)))

    def _row_bytes(self, name: str) -> int:
        """Bytes one Gaussian takes in array ``name``'s file."""
        dtype, rest = self.layout[name]
        return dtype.itemsize * math.prod(rest)

    def _gaussians(self, start: int, count: int) -> Gaussians:
        """Gaussians ``start`` to ``start + count``, mapped from the files."""
        if self.view_size is None:
            raise RuntimeError("no Gaussians were appended")
        arrays = {}
        for name, (dtype, rest) in self.layout.items():
            shape = (count, *rest)
            if not math.prod(shape):
                arrays[name] = _frozen(np.zeros(shape, dtype))
                continue
            stream = self.streams[name]
            with _spill_errors(f"Gaussians: {name}", self.folder):
                stream.flush()
                offset = start * self._row_bytes(name)
                arrays[name] = np.memmap(stream, dtype=dtype, mode="r", shape=shape, offset=offset)
        height, width = self.view_size
        return Gaussians(**arrays, grid=(count // max(height * width, 1), height, width))

    def move(self, index: int, similarity: Similarity) -> None:
        """Chunk ``index``'s Gaussians moved by ``similarity`` (:func:`transform_gaussians`),
        written over themselves."""
        start, count = self.parts[index]
        moved = transform_gaussians(self._gaussians(start, count), similarity)
        for name in GAUSSIAN_ARRAYS:
            stream = self.streams[name]
            with _spill_errors(f"Gaussians: {name}", self.folder):
                stream.seek(start * self._row_bytes(name))
                _write_rows(stream, np.asarray(getattr(moved, name), dtype=self.layout[name][0]))
                stream.seek(0, os.SEEK_END)

    def result(self) -> Gaussians | None:
        """Every chunk's Gaussians, mapped read-only (None when no chunk had any)."""
        if self.view_size is None:
            return None
        gaussians = self._gaussians(0, sum(count for _, count in self.parts))
        for stream in self.streams.values():
            stream.close()  # the maps keep the files
        return gaussians


def transform_gaussians(gaussians: Gaussians, similarity: Similarity) -> Gaussians:
    """Gaussians in the world mapped by ``similarity``: centres mapped, scales times its
    scale, orientations and spherical harmonics turned by its rotation (the same routines
    that placed them, :mod:`da3cog.model.gaussian_adapter`); opacities as they are."""
    if similarity is IDENTITY:
        return gaussians
    rotation = torch.from_numpy(similarity.rotation).float()
    orientations = quaternion_to_matrix(torch.from_numpy(np.array(gaussians.rotations)))
    harmonics = rotate_harmonics(torch.from_numpy(np.array(gaussians.harmonics)), rotation)
    means = apply_similarity(np.asarray(gaussians.means, dtype=np.float64), similarity)
    return dataclasses.replace(
        gaussians,
        means=_frozen(means),
        scales=_frozen(np.asarray(gaussians.scales) * similarity.scale),
        rotations=_frozen(matrix_to_quaternion(rotation @ orientations).numpy()),
        harmonics=_frozen(harmonics.numpy()),
    )


def _gaussians_of(gaussians: Gaussians, views: Sequence[int]) -> Gaussians:
    """The Gaussians of some views (local indices) of a prediction."""
    _, height, width = gaussians.grid
    per_view = height * width
    pick = np.concatenate([np.arange(v * per_view, (v + 1) * per_view) for v in views])
    return dataclasses.replace(
        gaussians,
        means=gaussians.means[pick],
        scales=gaussians.scales[pick],
        rotations=gaussians.rotations[pick],
        harmonics=gaussians.harmonics[pick],
        opacities=gaussians.opacities[pick],
        grid=(len(views), height, width),
    )


def _check_view_sizes(sizes: set[tuple[int, int]]) -> None:
    if len(sizes) > 1:
        raise ValueError(
            f"chunks predicted Gaussians at different processing sizes {sorted(sizes)}: "
            "give views of one shape, or no chunks"
        )


def _concatenate(parts: Sequence[Gaussians]) -> Gaussians:
    """The chunks' Gaussians as one set."""
    _check_view_sizes({part.grid[1:] for part in parts})
    height, width = parts[0].grid[1:]
    return Gaussians(
        **{
            name: _frozen(np.concatenate([getattr(part, name) for part in parts]))
            for name in GAUSSIAN_ARRAYS
        },
        grid=(sum(part.grid[0] for part in parts), height, width),
    )


ChunkPredictor = Callable[[Sequence[int]], Prediction]

# Loop closure (:mod:`da3cog.loops`): views whose appearance descriptors correlate at least this
# much are loop candidates.
LOOP_SIMILARITY = 0.9
# A loop's two ends are at least this many chunk lengths apart in the sequence (see
# :func:`da3cog.loops.find_loops`).
LOOP_MIN_GAP_CHUNKS = 2
# Loop candidates checked, best first, at most (each costs one more chunk): a quarter of the
# chunks, at least 3. A camera that stays put looks alike everywhere: 999 chunks of a static
# camera gave 681 candidates, 68% more predictions than the run itself.
LOOP_CANDIDATES_PER_CHUNK = 0.25
MIN_LOOP_CANDIDATES = 3
# Views around each end of a loop in its loop chunk, at most (upstream's streaming: 20).
LOOP_WINDOW = 20
# A loop is kept when both ends fit its loop chunk within this many times the sequential
# overlaps' median residual (at least MIN_LOOP_RESIDUAL of depth): as tight as an overlap.
LOOP_RESIDUAL_FACTOR = 2.0
MIN_LOOP_RESIDUAL = 1e-3
# ... and when, in the loop chunk, each of the two look-alike views sees at least this share
# of the other's surfaces where the other sees them (depth within LOOP_DEPTH_AGREEMENT).
MIN_LOOP_COVISIBILITY = 0.3
LOOP_DEPTH_AGREEMENT = 0.1
# A loop whose two ends the sequential chain put this far apart in rotation is not closed: the
# pose graph starts from the chain and measures rotation errors up to 180 degrees, so past
# that it closes the loop the wrong way round (a ring drifting 190 degrees ended with chunks
# on its far side), and a drift that large is not one to spread over the chunks anyway. (A
# drift past 270 degrees reads as less than 90 and is not caught.)
MAX_LOOP_DRIFT_DEGREES = 90.0
# Point pairs kept of each overlap to read its residual again after loop closure moved the
# chunks (a weighted median: a few thousand pairs give it within a fraction of itself).
LOOP_RESIDUAL_POINTS = 8192


class TimeBudgetExceeded(RuntimeError):
    """A chunked run stopped early: after the chunks run so far, the whole run would take
    longer than its time budget.

    Attributes:
        projected: seconds the whole run would take at the measured pace.
        budget: the budget in seconds.
        views_that_fit: views of the same request whose chunks would fit the budget (0 when
            not even one chunk does).
    """

    def __init__(
        self, projected: float, budget: float, views_that_fit: int, step: str = "chunk"
    ) -> None:
        self.projected, self.budget, self.views_that_fit = projected, budget, views_that_fit
        fit = (
            f"at most {views_that_fit} of these views would fit"
            if views_that_fit
            else f"not even one {step} fits"
        )
        super().__init__(
            f"this run would take about {_seconds(projected)}, over its {_seconds(budget)} "
            f"time budget: {fit}"
        )


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.2g}s"


def time_left(done: int, total: int, elapsed: float) -> str:
    """``", about Ns left"`` once ``done`` of ``total`` steps took ``elapsed`` seconds (empty
    before the first)."""
    if not done:
        return ""
    return f", about {elapsed / done * (total - done):.0f}s left"


def check_pace(
    chunks: Sequence[range], done: int, elapsed: float, budget: float, step: str = "chunk"
) -> None:
    """Raise :class:`TimeBudgetExceeded` when ``done`` chunks took ``elapsed`` seconds and all
    of ``chunks`` at that pace would pass ``budget`` (``step``: what a chunk is called)."""
    per_chunk = elapsed / done
    projected = per_chunk * len(chunks)
    if projected <= budget:
        return
    fitting = int(budget // per_chunk)
    raise TimeBudgetExceeded(projected, budget, chunks[fitting - 1].stop if fitting else 0, step)


def reconstruct_in_chunks(
    count: int,
    size: int,
    overlap: int,
    predict_chunk: ChunkPredictor,
    *,
    align: bool = True,
    loop_closure: bool = False,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    time_budget: float | None = None,
    spill_to: Path | None = None,
    depth_unit_fixed: Callable[[Prediction], bool] | None = None,
) -> Prediction:
    """Predict ``count`` views as overlapping chunks (see the module docstring).

    Args:
        predict_chunk: ``predict_chunk(views)`` predicts the given views as one chunk (global
            indices, in order) and returns its Prediction, views named as the user's inputs.
        align: fit each chunk onto the previous one (False when every chunk is in a common
            frame already: the user's poses, or single-view models).
        loop_closure: after the sequential pass, look for places the sequence comes back to
            and close those loops (:mod:`da3cog.loops`); only with ``align`` and more than
            ``LOOP_MIN_GAP_CHUNKS`` chunk lengths of views.
        time_budget: seconds the whole run may take. After each chunk the pace so far
            projects the total; once it passes the budget the run stops with
            :class:`TimeBudgetExceeded` (so at most one chunk's time is spent on a run that
            cannot finish in time). Loop chunks run only while the budget has room for one
            more chunk at that pace.
        spill_to: a folder on disk: every emitted view's per-pixel arrays go there as
            memory-mapped files (:func:`spill_view`), so memory holds one chunk's views, not
            all of them.
        depth_unit_fixed: for chunks in one frame (``align`` False: the user's poses),
            whether a chunk's depth is in that frame's unit (the poses fixed it). A chunk
            whose depth is not, and every chunk after a first chunk whose depth is not, is
            brought to the previous chunk's depth unit on the views they share
            (:func:`fit_depth_scale`), so that all views share one unit.
    """
    report = progress or (lambda _: None)
    if overlap < 1 and (align or depth_unit_fixed is not None):
        raise ValueError("chunks that are aligned on the views they share must share one or more")
    chunks = chunk_ranges(count, size, overlap)
    emitted = emitted_views(chunks)
    views: list[ViewPrediction] = []
    notes: list[str] = []
    residuals: list[float] = []
    # Chunks both in the given poses' unit: their depths' factor and difference on shared views.
    agreements: list[tuple[float, float]] = []
    uncompared: list[int] = []  # ... and those with too few usable pixels to compare
    metric: list[bool] = []
    gaussians: list[Gaussians] = []
    # A spilled run's Gaussians go to files instead, once.
    spilled = SpilledGaussians(spill_to) if spill_to is not None else None
    # Each chunk's frame -> the world, its scene size in its own unit, and (for loop closure)
    # the emitted views' appearance descriptors.
    placements: list[Similarity] = []
    units: list[float] = []
    descriptors: list[np.ndarray] = []
    # ... and each chunk's overlap with the one before (a sample of its point pairs), to read
    # the overlaps' residuals again once loop closure has moved the chunks.
    overlaps: dict[int, OverlapPoints] = {}
    first: Prediction | None = None
    first_fixed = False
    # The previous chunk's views, already in the world frame: the next chunk is fitted on them.
    previous: tuple[ViewPrediction, ...] = ()
    started = time.perf_counter()
    for index, (chunk, emit) in enumerate(zip(chunks, emitted, strict=True)):
        eta = time_left(index, len(chunks), time.perf_counter() - started)
        report(f"chunk {index + 1}/{len(chunks)}: views {chunk.start}..{chunk.stop - 1}{eta}")
        prediction = predict_chunk(chunk)
        if len(prediction.views) != len(chunk):
            raise RuntimeError(f"chunk {index}: {len(prediction.views)} views for {len(chunk)}")
        to_world, residual = IDENTITY, None
        shared = range(chunk.start, chunks[index - 1].stop) if index else range(0)
        # The shared views as the previous chunk placed them, and as this one predicts them.
        placed = [previous[v - chunks[index - 1].start] for v in shared]
        again = [prediction.views[v - chunk.start] for v in shared]
        if depth_unit_fixed is not None and not align:
            fixed = depth_unit_fixed(prediction)
            if index == 0:
                first_fixed = fixed
            elif not (fixed and first_fixed):
                try:
                    factor, residual = fit_depth_scale(placed, again)
                except ValueError as error:
                    raise _unaligned(index, prediction, chunk, shared, error) from error
                prediction = rescale_chunk(prediction, factor)
                residuals.append(residual)
                report(
                    f"chunk {index + 1}: depth brought to the previous chunk's unit on "
                    f"{len(shared)} shared views, factor {factor:.4g}, residual "
                    f"{residual:.2%} of depth"
                )
            elif index:
                # Both in the poses' unit: nothing to fit, but their agreement is worth a word.
                try:
                    factor, residual = depth_agreement(placed, again)
                except TooFewPixels:
                    uncompared.append(index)
                    report(
                        f"chunk {index + 1}: in the given poses' unit; too few usable pixels "
                        "on the views shared with the chunk before to compare their depths"
                    )
                else:
                    agreements.append((factor, residual))
                    report(
                        f"chunk {index + 1}: in the given poses' unit; on the {len(shared)} "
                        f"views shared with the chunk before, its depth is {1 / factor:.4g}x "
                        f"that chunk's, differing by {residual:.2%} of depth"
                    )
        if index > 0 and align and prediction.cameras_estimated:
            try:
                fit, residual, points = fit_overlap(placed, again, seed=seed + index)
            except ValueError as error:
                raise _unaligned(index, prediction, chunk, shared, error) from error
            to_world = fit.similarity
            residuals.append(residual)
            if loop_closure:
                overlaps[index] = points.sample(LOOP_RESIDUAL_POINTS, seed + index)
            report(
                f"chunk {index + 1}: aligned on {len(shared)} shared views, scale "
                f"{to_world.scale:.4g}, residual {residual:.2%} of depth"
                + ("" if fit.converged else f" (still moving after {fit.iterations} rounds)")
            )
        placements.append(to_world)
        if loop_closure:
            units.append(_scene_size(prediction.views))
        previous = tuple(transform_view(view, to_world) for view in prediction.views)
        for global_index in emit:
            view = dataclasses.replace(
                previous[global_index - chunk.start], chunk=index, alignment_residual=residual
            )
            if loop_closure:
                descriptors.append(appearance_descriptor(np.asarray(view.image)))
            views.append(view if spill_to is None else spill_view(view, spill_to))
        if prediction.gaussians is not None:
            local = [v - chunk.start for v in emit]
            part = transform_gaussians(_gaussians_of(prediction.gaussians, local), to_world)
            if spilled is not None:
                spilled.append(part)
            else:
                gaussians.append(part)
        notes.extend(note for note in prediction.notes if note not in notes)
        metric.append(prediction.is_metric)
        if first is None:
            first = prediction
        if time_budget is not None and index + 1 < len(chunks):
            check_pace(chunks, index + 1, time.perf_counter() - started, time_budget)
        # What this chunk freed goes back to the system: otherwise the heap grows with the
        # chunks (glibc keeps freed buffers), on top of the outputs kept.
        del prediction
        trim_heap()
    if first is None:
        raise ValueError("no views to predict")
    how = (
        f"reconstructed in {len(chunks)} chunks of {size} views sharing {overlap} "
        "(each view from one chunk: views[i].chunk)"
    )
    if residuals and align:
        how += (
            f"; chunks aligned by similarity on their shared views, residual "
            f"{min(residuals):.2%}-{max(residuals):.2%} of depth"
        )
    elif residuals:
        unit = "the given poses' unit" if first_fixed else "the first chunk's relative unit"
        how += (
            f"; the depth of {len(residuals)} chunk(s), which the given poses did not put in their "
            f"unit, brought to {unit} on the views shared with the chunk before (residual "
            f"{min(residuals):.2%}-{max(residuals):.2%} of depth)"
        )
    if agreements:
        ratios = [1 / factor for factor, _ in agreements]
        differences = [residual for _, residual in agreements]
        how += (
            f"; {len(agreements)} chunk(s) in the given poses' unit, as the one before: on "
            f"their shared views their depth is {min(ratios):.3g}-{max(ratios):.3g}x the "
            f"previous chunk's, differing by {min(differences):.2%}-{max(differences):.2%} of "
            "depth (each view's alignment_residual)"
        )
    if uncompared:
        how += (
            f"; chunk(s) {first_few([str(index) for index in uncompared], 10)} not compared "
            "with the chunk before (too few usable pixels on their shared views: sky, no "
            "confidence; alignment_residual None)"
        )
    if spill_to is not None:
        how += "; every view's outputs kept in memory-mapped temporary files"
    notes.append(how)
    if loop_closure and count <= LOOP_MIN_GAP_CHUNKS * size:
        notes.append(
            f"loop closure: not run, {count} views: no two are {LOOP_MIN_GAP_CHUNKS} chunk "
            f"lengths ({LOOP_MIN_GAP_CHUNKS * size} views) apart, as a loop's ends must be "
            "(nearer ones align through the overlaps already)"
        )
    elif loop_closure and not (align and residuals):
        notes.append("loop closure: not run, the chunks share one frame already (no drift)")
    elif loop_closure:
        deadline = None if time_budget is None else started + time_budget
        pace = (time.perf_counter() - started) / len(chunks)
        loops = _LoopInputs(chunks, emitted, placements, units, residuals, np.stack(descriptors))
        corrections, note = _close_loops(loops, views, predict_chunk, report, deadline, pace, seed)
        if corrections is not None:
            # Each overlap's residual with both of its chunks where they now are.
            after = {
                index: points.residual(
                    compose_similarities(corrections[index], placements[index]),
                    corrections[index - 1],
                )
                for index, points in overlaps.items()
            }
            note += (
                f"; overlap residuals now {min(after.values()):.2%}-{max(after.values()):.2%} "
                f"of depth (views[i].alignment_residual: their chunk's, after loop closure)"
            )
            views = [
                _moved(view, corrections[view.chunk or 0], spill_to, after.get(view.chunk or 0))
                for view in views
            ]
            if spilled is not None and spilled.parts:
                for index, correction in enumerate(corrections):
                    spilled.move(index, correction)
            if gaussians:
                gaussians = [
                    transform_gaussians(part, correction)
                    for part, correction in zip(gaussians, corrections, strict=True)
                ]
            placements = [
                compose_similarities(correction, placed)
                for correction, placed in zip(corrections, placements, strict=True)
            ]
        notes.append(note)
    if align and all(metric) and first.metric_scale is not None and len(placements) > 1:
        # Each chunk was metric on its own: how far the alignment had to scale them says how
        # well their metric scales agree.
        scales = [placed.scale for placed in placements[1:]]
        notes.append(
            f"metric: the world is in the first chunk's metres (metric_scale is its own); the "
            f"other chunks, each metric on its own, were scaled by {min(scales):.3g}-"
            f"{max(scales):.3g} to fit it"
        )
    return dataclasses.replace(
        first,
        views=tuple(views),
        notes=tuple(notes),
        is_metric=all(metric),
        gaussians=(
            spilled.result()
            if spilled is not None
            else _concatenate(gaussians)
            if gaussians
            else None
        ),
    )


class UnalignableChunks(ValueError):
    """Two chunks cannot be aligned on the views they share. ``reason`` says why, naming the
    chunks and views; the message adds the library's way round it (a caller that chose the
    chunks, like the served model, gives its own)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; share more views: a larger chunk_overlap")
        self.reason = reason


def _unaligned(
    index: int, prediction: Prediction, chunk: range, shared: range, error: ValueError
) -> UnalignableChunks:
    """Why chunk ``index`` (0-based) cannot be fitted onto the one before, naming the views."""
    names = [prediction.views[v - chunk.start].name for v in shared]
    which = names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"
    return UnalignableChunks(
        f"chunk {index + 1} cannot be aligned with chunk {index} on the views they share "
        f"({which}): {error}"
    )


def _scene_size(views: Sequence[ViewPrediction]) -> float:
    """A chunk's scene size in its own unit: the median depth of its surfaces, sky left out
    (every 8th pixel of every view)."""
    samples = np.concatenate([np.asarray(v.depth)[::8, ::8][_surface(v)[::8, ::8]] for v in views])
    return float(np.median(samples)) if len(samples) else 1.0


def _moved(
    view: ViewPrediction, correction: Similarity, spill_to: Path | None, residual: float | None
) -> ViewPrediction:
    """The view moved by a loop closure's ``correction``, with its chunk's overlap
    ``residual`` after the move; of a spilled view only the depth, which the move changes, is
    written again (the other arrays keep their files)."""
    transformed = transform_view(view, correction)
    moved = dataclasses.replace(transformed, alignment_residual=residual)
    if spill_to is None or transformed is view:
        return moved
    return spill_view(moved, spill_to, arrays=("depth",))


@dataclass(frozen=True)
class _LoopInputs:
    """What the sequential pass left for loop closure: the chunks and the views each emitted,
    each chunk's placement (its frame -> the world) and scene size in its own unit, the
    overlaps' residuals, and the emitted views' appearance descriptors ``(N, D)``."""

    chunks: Sequence[range]
    emitted: Sequence[range]
    placements: Sequence[Similarity]
    units: Sequence[float]
    residuals: Sequence[float]
    descriptors: np.ndarray


def covisibility(seen: ViewPrediction, seer: ViewPrediction, stride: int = 4) -> float:
    """The share of ``seen``'s surface pixels (every ``stride``-th row and column) that
    ``seer`` sees where they are: in front of it, inside its image, at the depth it predicts
    there within ``LOOP_DEPTH_AGREEMENT`` (both views in one world)."""
    height, width = seen.depth.shape
    rows, cols = np.meshgrid(
        np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij"
    )
    flat = (rows * width + cols).ravel()
    flat = flat[_surface(seen).ravel()[flat]]
    points = _world_points_at(seen, flat, _depth_at(seen, flat))
    points = points[np.isfinite(points).all(axis=1)]
    if not len(points):
        return 0.0
    pixels, depth = project_points(
        torch.from_numpy(points),
        torch.from_numpy(np.asarray(seer.intrinsics, dtype=np.float64)),
        torch.from_numpy(np.asarray(seer.extrinsics, dtype=np.float64)),
    )
    pixels, depth = pixels.numpy(), depth.numpy()
    height, width = seer.depth.shape
    with np.errstate(invalid="ignore"):
        column, row = np.floor(pixels[:, 0]), np.floor(pixels[:, 1])
        inside = (depth > 0) & (column >= 0) & (column < width) & (row >= 0) & (row < height)
    there = np.asarray(seer.depth, dtype=np.float64)[
        row[inside].astype(int), column[inside].astype(int)
    ]
    agree = np.abs(depth[inside] - there) <= LOOP_DEPTH_AGREEMENT * there
    return float(agree.sum()) / len(points)


def _window(centre: int, allowed: range, count: int) -> range:
    """Up to ``count`` consecutive views of ``allowed`` around ``centre``."""
    count = min(count, len(allowed))
    start = min(max(centre - count // 2, allowed.start), allowed.stop - count)
    return range(start, start + count)


def _close_loops(
    inputs: _LoopInputs,
    views: Sequence[ViewPrediction],
    predict_chunk: ChunkPredictor,
    report: Callable[[str], None],
    deadline: float | None,
    pace: float,
    seed: int,
) -> tuple[list[Similarity] | None, str]:
    """Close the loops of a sequentially aligned run (:mod:`da3cog.loops`): find views at
    least ``LOOP_MIN_GAP_CHUNKS`` chunk lengths apart that look alike, predict each candidate's
    neighbourhoods (the views around both ends, each end within the chunk that emitted it) as
    one loop chunk, fit it onto both ends as placed in the world, keep the loops whose two
    look-alike views see each other's surfaces in it (:func:`covisibility`) and whose two
    fits are as tight as the overlaps', and re-solve the chunks' placements with the overlaps
    and the kept loops.

    Returns each chunk's correction (new placement after the old one's inverse: applied to
    what the chunk emitted) or None when no loop was kept, and a note saying what happened.
    ``deadline`` (a ``time.perf_counter()`` value) stops the loop chunks when one more at
    ``pace`` seconds would pass it."""
    chunk_of = np.array([view.chunk for view in views])
    size = len(inputs.chunks[0])
    candidates = find_loops(
        inputs.descriptors,
        min_gap=LOOP_MIN_GAP_CHUNKS * size,
        threshold=LOOP_SIMILARITY,
        suppression=max(1, len(inputs.emitted[0])),
        limit=max(MIN_LOOP_CANDIDATES, math.ceil(LOOP_CANDIDATES_PER_CHUNK * len(inputs.chunks))),
    )
    if not candidates:
        return None, "loop closure: no place the sequence comes back to was found"
    tolerance = max(LOOP_RESIDUAL_FACTOR * float(np.median(inputs.residuals)), MIN_LOOP_RESIDUAL)
    placements = inputs.placements
    constraints = [
        Constraint(k - 1, k, compose_similarities(invert_similarity(placements[k - 1]), placed))
        for k, placed in enumerate(placements)
        if k > 0
    ]
    kept, rejected, skipped = [], [], 0
    window = max(1, min(size // 2, LOOP_WINDOW))
    for number, candidate in enumerate(candidates, start=1):
        if deadline is not None and time.perf_counter() + pace > deadline:
            skipped = len(candidates) - number + 1
            report(f"loop closure: {skipped} loop(s) left unchecked, no time left in the budget")
            break
        a, b = int(chunk_of[candidate.earlier]), int(chunk_of[candidate.later])
        near_a = _window(candidate.earlier, inputs.emitted[a], window)
        near_b = _window(candidate.later, inputs.emitted[b], window)
        report(
            f"loop {number}/{len(candidates)}: {views[candidate.earlier].name} and "
            f"{views[candidate.later].name} look alike (similarity {candidate.similarity:.3f}); "
            f"checking views {near_a.start}..{near_a.stop - 1} with "
            f"{near_b.start}..{near_b.stop - 1}, about "
            f"{_seconds(pace * (len(candidates) - number + 1))} left"
        )
        loop = predict_chunk([*near_a, *near_b])
        one = loop.views[candidate.earlier - near_a.start]
        other = loop.views[len(near_a) + candidate.later - near_b.start]
        shared = min(covisibility(one, other), covisibility(other, one))
        if shared < MIN_LOOP_COVISIBILITY:
            rejected.append(f"{candidate.earlier}-{candidate.later}")
            report(
                f"loop {number}: rejected, the two views see {shared:.0%} of each other's "
                f"surfaces (at least {MIN_LOOP_COVISIBILITY:.0%} needed): not the same place"
            )
            continue
        try:
            fit_a, residual_a = fit_chunk(
                [views[v] for v in near_a], loop.views[: len(near_a)], seed=seed
            )
            fit_b, residual_b = fit_chunk(
                [views[v] for v in near_b], loop.views[len(near_a) :], seed=seed
            )
        except ValueError as error:
            rejected.append(f"{candidate.earlier}-{candidate.later}")
            report(f"loop {number}: rejected ({error})")
            continue
        if max(residual_a, residual_b) > tolerance:
            rejected.append(f"{candidate.earlier}-{candidate.later}")
            report(
                f"loop {number}: rejected, its ends fit within {residual_a:.2%} and "
                f"{residual_b:.2%} of depth (overlaps: {tolerance:.2%})"
            )
            continue
        # chunk b's frame -> the world as placed (through the loop chunk) -> chunk a's frame.
        relative = compose_similarities(
            invert_similarity(placements[a]),
            compose_similarities(
                fit_a.similarity,
                compose_similarities(invert_similarity(fit_b.similarity), placements[b]),
            ),
        )
        drift = rotation_disagreement(placements, Constraint(a, b, relative))
        if drift > MAX_LOOP_DRIFT_DEGREES:
            rejected.append(f"{candidate.earlier}-{candidate.later}")
            report(
                f"loop {number}: rejected, the chunks drifted {drift:.0f} degrees around it "
                f"(at most {MAX_LOOP_DRIFT_DEGREES:.0f} can be spread over the chain)"
            )
            continue
        constraints.append(Constraint(a, b, relative))
        kept.append(f"{views[candidate.earlier].name}-{views[candidate.later].name}")
        report(f"loop {number}: kept (chunks {a + 1} and {b + 1})")
    checked = f"{len(kept)} of {len(candidates)} candidate loop(s) kept"
    if rejected:
        checked += f" ({len(rejected)} rejected: not the same place, or not fitting as an overlap)"
    if skipped:
        checked += f", {skipped} unchecked for lack of time"
    if not kept:
        return None, f"loop closure: {checked}; chunk placements unchanged"
    solved = optimise_pose_graph(placements, inputs.units, constraints)
    corrections = [
        compose_similarities(new, invert_similarity(old))
        for new, old in zip(solved, placements, strict=True)
    ]
    return corrections, (
        f"loop closure: {checked} ({', '.join(kept)}); chunk placements re-solved with "
        f"{len(constraints) - len(kept)} overlaps and {len(kept)} loop(s)"
    )


def default_overlap(size: int) -> int:
    """Half the chunk, as upstream's streaming (120 views sharing 60)."""
    return max(1, math.ceil(size / 2))
