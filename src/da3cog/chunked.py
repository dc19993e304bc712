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

Requests with the user's own poses need no alignment: every chunk is conditioned on the
user's cameras and is in the user's frame and unit already. Single-view models (mono, metric)
predict every view on its own, so their chunks are simply concatenated. 3D Gaussians follow
their chunk's similarity (:func:`transform_gaussians`) and are kept for the emitted views.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from da3cog.geometry import (
    RobustFit,
    Similarity,
    depth_to_world_points,
    matrix_to_quaternion,
    quaternion_to_matrix,
    robust_similarity,
    similarity_world_to_camera,
)
from da3cog.memory import trim_heap
from da3cog.model.gaussian_adapter import rotate_harmonics
from da3cog.pipeline import Gaussians, Prediction, ViewPrediction

IDENTITY = Similarity(rotation=np.eye(3), translation=np.zeros(3), scale=1.0)
# Pixel pairs an alignment fits on at most (an even, seeded subsample of the shared views).
MAX_ALIGNMENT_POINTS = 200_000


def chunk_ranges(count: int, size: int, overlap: int) -> list[range]:
    """Chunks of ``size`` consecutive views of ``count``, each sharing ``overlap`` views with
    the previous one; the last chunk ends at the last view and is full-size too (it shares
    more views with the one before when the step does not divide evenly). One chunk when
    ``count <= size``."""
    if size < 2:
        raise ValueError(f"chunk size must be at least 2 views, got {size}")
    if not 1 <= overlap < size:
        raise ValueError(
            f"chunk overlap must be between 1 and size - 1 = {size - 1}, got {overlap}"
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


def _world_points(view: ViewPrediction) -> np.ndarray:
    """``(H, W, 3)`` world points of a view's pixel centres at their depth (NaN where the
    depth is not a surface)."""
    depth = np.asarray(view.depth, dtype=np.float64)
    surface = np.isfinite(depth) & (depth > 0)
    if view.sky is not None:
        surface &= ~np.asarray(view.sky, dtype=bool)
    return depth_to_world_points(
        torch.from_numpy(np.where(surface, depth, np.nan)),
        torch.from_numpy(np.asarray(view.intrinsics, dtype=np.float64)),
        torch.from_numpy(np.asarray(view.extrinsics, dtype=np.float64)),
    ).numpy()


def _confidence_weight(view: ViewPrediction) -> np.ndarray:
    """DA3's confidence starts at 1: its excess over 1 weighs a pixel (1 without one)."""
    if view.confidence is None:
        return np.ones(view.depth.shape)
    return np.clip(np.asarray(view.confidence, dtype=np.float64) - 1.0, 0.0, None)


def fit_chunk(
    earlier: Sequence[ViewPrediction], later: Sequence[ViewPrediction], seed: int = 0
) -> tuple[RobustFit, float]:
    """The similarity taking the ``later`` chunk's world onto the ``earlier`` one's, fitted on
    the same views as each chunk predicted them (same pixels); and its residual relative to
    the views' median depth."""
    sources, targets, weights, depths = [], [], [], []
    for before, after in zip(earlier, later, strict=True):
        if before.depth.shape != after.depth.shape:
            raise ValueError(f"view {after.name}: its chunks predicted different sizes")
        target, source = _world_points(before), _world_points(after)
        weight = np.sqrt(_confidence_weight(before) * _confidence_weight(after))
        usable = np.isfinite(target).all(-1) & np.isfinite(source).all(-1) & (weight > 0)
        sources.append(source[usable])
        targets.append(target[usable])
        weights.append(weight[usable])
        depths.append(np.asarray(before.depth, dtype=np.float64)[usable])
    source, target = np.concatenate(sources), np.concatenate(targets)
    weight, depth = np.concatenate(weights), np.concatenate(depths)
    if len(source) < 3:
        raise ValueError("the shared views have fewer than 3 usable pixels: cannot align chunks")
    if len(source) > MAX_ALIGNMENT_POINTS:
        pick = np.random.default_rng(seed).choice(len(source), MAX_ALIGNMENT_POINTS, False)
        source, target, weight, depth = source[pick], target[pick], weight[pick], depth[pick]
    fit = robust_similarity(source, target, weight)
    return fit, fit.residual / float(np.median(depth))


def transform_view(view: ViewPrediction, similarity: Similarity) -> ViewPrediction:
    """The view in the world mapped by ``similarity``: depth times its scale, cameras moved
    with the world (:func:`da3cog.geometry.similarity_world_to_camera`), intrinsics as they
    are."""
    if similarity is IDENTITY:
        return view
    depth = np.asarray(view.depth, dtype=np.float32) * np.float32(similarity.scale)
    depth.flags.writeable = False
    extrinsics = similarity_world_to_camera(view.extrinsics, similarity).astype(np.float32)
    extrinsics.flags.writeable = False
    return dataclasses.replace(view, depth=depth, extrinsics=extrinsics)


# The per-pixel arrays of a view, the bulk of what a long run keeps.
SPILLED_ARRAYS = ("depth", "confidence", "image", "sky")


def spill_view(view: ViewPrediction, folder: Path) -> ViewPrediction:
    """The view with its per-pixel arrays moved into memory-mapped files in ``folder``:
    read-only arrays backed by the disk, so a long run keeps its outputs in the page cache,
    which the kernel can write back and drop, instead of its own heap. Each file is unlinked
    as soon as it is mapped: it goes away with the last array that uses it, whatever happens
    to the run."""
    arrays = {}
    for name in SPILLED_ARRAYS:
        value = getattr(view, name)
        if value is None:
            continue
        handle, path = tempfile.mkstemp(dir=folder, prefix=f".da3cog-{name}-", suffix=".npy")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, np.ascontiguousarray(value))
            arrays[name] = np.load(path, mmap_mode="r")
        finally:
            os.unlink(path)
    return dataclasses.replace(view, **arrays)


def transform_gaussians(gaussians: Gaussians, similarity: Similarity) -> Gaussians:
    """Gaussians in the world mapped by ``similarity``: centres mapped, scales times its
    scale, orientations and spherical harmonics turned by its rotation (the same routines
    that placed them, :mod:`da3cog.model.gaussian_adapter`); opacities as they are."""
    if similarity is IDENTITY:
        return gaussians
    rotation = torch.from_numpy(similarity.rotation).float()
    orientations = quaternion_to_matrix(torch.from_numpy(np.array(gaussians.rotations)))
    harmonics = rotate_harmonics(torch.from_numpy(np.array(gaussians.harmonics)), rotation)
    means = similarity.scale * np.asarray(gaussians.means, dtype=np.float64)
    means = means @ similarity.rotation.T + similarity.translation

    def frozen(array: np.ndarray | torch.Tensor) -> np.ndarray:
        values = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        values.flags.writeable = False
        return values

    return dataclasses.replace(
        gaussians,
        means=frozen(means),
        scales=frozen(np.asarray(gaussians.scales) * similarity.scale),
        rotations=frozen(matrix_to_quaternion(rotation @ orientations).numpy()),
        harmonics=frozen(harmonics.numpy()),
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


def _concatenate(parts: Sequence[Gaussians]) -> Gaussians:
    sizes = {part.grid[1:] for part in parts}
    if len(sizes) > 1:
        raise ValueError(
            f"chunks predicted Gaussians at different processing sizes {sorted(sizes)}: "
            "give views of one shape, or no chunks"
        )

    def joined(name: str) -> np.ndarray:
        values = np.concatenate([getattr(part, name) for part in parts])
        values.flags.writeable = False
        return values

    height, width = parts[0].grid[1:]
    return Gaussians(
        means=joined("means"),
        scales=joined("scales"),
        rotations=joined("rotations"),
        harmonics=joined("harmonics"),
        opacities=joined("opacities"),
        grid=(sum(part.grid[0] for part in parts), height, width),
    )


ChunkPredictor = Callable[[range], Prediction]


class TimeBudgetExceeded(RuntimeError):
    """A chunked run stopped early: after the chunks run so far, the whole run would take
    longer than its time budget.

    Attributes:
        projected: seconds the whole run would take at the measured pace.
        budget: the budget in seconds.
        views_that_fit: views of the same request whose chunks would fit the budget (0 when
            not even one chunk does).
    """

    def __init__(self, projected: float, budget: float, views_that_fit: int) -> None:
        self.projected, self.budget, self.views_that_fit = projected, budget, views_that_fit
        fit = (
            f"at most {views_that_fit} of these views would fit"
            if views_that_fit
            else "not even one chunk fits"
        )
        super().__init__(
            f"this run would take about {_seconds(projected)}, over its {_seconds(budget)} "
            f"time budget: {fit}"
        )


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.2g}s"


def _check_pace(chunks: Sequence[range], done: int, elapsed: float, budget: float) -> None:
    """Raise :class:`TimeBudgetExceeded` when ``done`` chunks took ``elapsed`` seconds and all
    of ``chunks`` at that pace would pass ``budget``."""
    per_chunk = elapsed / done
    projected = per_chunk * len(chunks)
    if projected <= budget:
        return
    fitting = int(budget // per_chunk)
    raise TimeBudgetExceeded(projected, budget, chunks[fitting - 1].stop if fitting else 0)


def reconstruct_in_chunks(
    count: int,
    size: int,
    overlap: int,
    predict_chunk: ChunkPredictor,
    *,
    align: bool = True,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    time_budget: float | None = None,
    spill_to: Path | None = None,
) -> Prediction:
    """Predict ``count`` views as overlapping chunks (see the module docstring).

    Args:
        predict_chunk: ``predict_chunk(views)`` predicts the views of one chunk (global indices,
            in order) and returns its Prediction, views named as the user's inputs.
        align: fit each chunk onto the previous one (False when every chunk is in a common
            frame already: the user's poses, or single-view models).
        time_budget: seconds the whole run may take. After each chunk the pace so far
            projects the total; once it passes the budget the run stops with
            :class:`TimeBudgetExceeded` (so at most one chunk's time is spent on a run that
            cannot finish in time).
        spill_to: a folder on disk: every emitted view's per-pixel arrays go there as
            memory-mapped files (:func:`spill_view`), so memory holds one chunk's views, not
            all of them.
    """
    report = progress or (lambda _: None)
    chunks = chunk_ranges(count, size, overlap)
    emitted = emitted_views(chunks)
    views: list[ViewPrediction] = []
    notes: list[str] = []
    residuals: list[float] = []
    metric: list[bool] = []
    gaussians: list[Gaussians] = []
    first: Prediction | None = None
    # The previous chunk's views, already in the world frame: the next chunk is fitted on them.
    previous: tuple[ViewPrediction, ...] = ()
    started = time.perf_counter()
    for index, (chunk, emit) in enumerate(zip(chunks, emitted, strict=True)):
        eta = ""
        if index:
            per_chunk = (time.perf_counter() - started) / index
            eta = f", about {per_chunk * (len(chunks) - index):.0f}s left"
        report(f"chunk {index + 1}/{len(chunks)}: views {chunk.start}..{chunk.stop - 1}{eta}")
        prediction = predict_chunk(chunk)
        if len(prediction.views) != len(chunk):
            raise RuntimeError(f"chunk {index}: {len(prediction.views)} views for {len(chunk)}")
        to_world, residual = IDENTITY, None
        if index > 0 and align and prediction.cameras_estimated:
            earlier = chunks[index - 1]
            shared = range(chunk.start, earlier.stop)
            fit, residual = fit_chunk(
                [previous[v - earlier.start] for v in shared],
                [prediction.views[v - chunk.start] for v in shared],
                seed=seed + index,
            )
            to_world = fit.similarity
            residuals.append(residual)
            report(
                f"chunk {index + 1}: aligned on {len(shared)} shared views, scale "
                f"{to_world.scale:.4g}, residual {residual:.2%} of depth"
            )
        previous = tuple(transform_view(view, to_world) for view in prediction.views)
        for global_index in emit:
            view = dataclasses.replace(
                previous[global_index - chunk.start], chunk=index, alignment_residual=residual
            )
            views.append(view if spill_to is None else spill_view(view, spill_to))
        if prediction.gaussians is not None:
            local = [v - chunk.start for v in emit]
            gaussians.append(
                transform_gaussians(_gaussians_of(prediction.gaussians, local), to_world)
            )
        notes.extend(note for note in prediction.notes if note not in notes)
        metric.append(prediction.is_metric)
        if first is None:
            first = prediction
        if time_budget is not None and index + 1 < len(chunks):
            _check_pace(chunks, index + 1, time.perf_counter() - started, time_budget)
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
    if residuals:
        how += (
            f"; chunks aligned by similarity on their shared views, residual "
            f"{min(residuals):.2%}-{max(residuals):.2%} of depth"
        )
    if spill_to is not None:
        how += "; every view's outputs kept in memory-mapped temporary files"
    notes.append(how)
    return dataclasses.replace(
        first,
        views=tuple(views),
        notes=tuple(notes),
        is_metric=all(metric),
        gaussians=_concatenate(gaussians) if gaussians else None,
    )


def default_overlap(size: int) -> int:
    """Half the chunk, as upstream's streaming (120 views sharing 60)."""
    return max(1, math.ceil(size / 2))
