"""Chunked reconstruction: chunk plans, the robust similarity fit, the alignment of chunks on an
exact synthetic scene (each chunk in its own random frame and unit), and the pipeline's chunked
path on the random-weight small model."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from test_export_scene import add_gaussians, make_prediction, make_view

from da3cog.chunked import (
    chunk_ranges,
    emitted_views,
    fit_depth_scale,
    fit_overlap,
    reconstruct_in_chunks,
    rescale_chunk,
    transform_view,
)
from da3cog.export.manifest import export_all
from da3cog.geometry import Similarity, robust_similarity, umeyama
from da3cog.pipeline import DepthAnything3, Gaussians, InferenceOptions, Prediction

# --------------------------------------------------------------------------------------------
# Chunk plans
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "overlap", "expected"),
    [
        (3, 4, 2, [(0, 3)]),
        (4, 4, 2, [(0, 4)]),
        (10, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10)]),
        (11, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10), (7, 11)]),
        (250, 120, 60, [(0, 120), (60, 180), (120, 240), (130, 250)]),
    ],
)
def test_chunk_ranges(count: int, size: int, overlap: int, expected: list) -> None:
    chunks = chunk_ranges(count, size, overlap)
    assert [(c.start, c.stop) for c in chunks] == expected
    emitted = emitted_views(chunks)
    # Every view exactly once, from a chunk that contains it, in order.
    assert [v for part in emitted for v in part] == list(range(count))
    for chunk, part in zip(chunks, emitted, strict=True):
        assert part.start >= chunk.start and part.stop <= chunk.stop
    for earlier, later in itertools.pairwise(chunks):
        assert later.start < earlier.stop, "consecutive chunks share views"


@pytest.mark.parametrize(("size", "overlap"), [(1, 0), (4, 4), (4, 5), (4, -1)])
def test_bad_chunk_plans_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        chunk_ranges(10, size, overlap)
    with pytest.raises(ValueError, match="chunk"):
        InferenceOptions(chunk_size=size, chunk_overlap=overlap)


def test_chunks_that_need_no_alignment_share_no_view() -> None:
    """Single-view models' chunks (each view predicted on its own) share no view: overlap 0
    tiles the views, each predicted once but for the last chunk's, which ends at the last
    view. Chunks to be aligned must share one, and users' chunks are always aligned."""
    assert [(c.start, c.stop) for c in chunk_ranges(10, 4, 0)] == [(0, 4), (4, 8), (6, 10)]
    assert [(e.start, e.stop) for e in emitted_views(chunk_ranges(8, 4, 0))] == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="between 1 and size - 1"):
        InferenceOptions(chunk_size=4, chunk_overlap=0)
    with pytest.raises(ValueError, match="must share one or more"):
        reconstruct_in_chunks(10, 4, 0, lambda views: make_prediction(views=len(views)))


def test_overlap_defaults_to_half_the_chunk() -> None:
    assert InferenceOptions(chunk_size=120).overlap_for(120) == 60
    assert InferenceOptions(chunk_size=5).overlap_for(5) == 3
    assert InferenceOptions(chunk_overlap=50).overlap_for(20) == 19, "auto: at most size - 1"
    with pytest.raises(ValueError, match="chunk_overlap needs chunk_size"):
        InferenceOptions(chunk_size=None, chunk_overlap=3)


# --------------------------------------------------------------------------------------------
# The similarity fit
# --------------------------------------------------------------------------------------------


def _truth() -> Similarity:
    rotation = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    return Similarity(rotation=rotation, translation=np.array([0.4, -1.0, 2.0]), scale=1.7)


def _angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(Rotation.from_matrix(a @ b.T).magnitude()))


@pytest.mark.parametrize("outliers", [0.0, 0.2])
def test_robust_similarity_recovers_the_truth(outliers: float) -> None:
    """Point maps with a known similarity, 1% noise and a share of gross outliers (wrong
    depth): the fit is within 0.1% in scale, 0.05 degrees and 0.2% of the scene size; the
    plain least-squares fit is pulled well off by the outliers."""
    rng = np.random.default_rng(0)
    source = rng.normal(size=(20_000, 3)) * [2.0, 1.0, 3.0] + [0.0, 0.0, 5.0]
    truth = _truth()
    target = truth.scale * source @ truth.rotation.T + truth.translation
    target += rng.normal(scale=0.01, size=target.shape)
    wrong = rng.random(len(source)) < outliers
    target[wrong] += rng.normal(scale=3.0, size=(int(wrong.sum()), 3))
    fit = robust_similarity(source, target)
    found = fit.similarity
    assert abs(found.scale / truth.scale - 1) < 1e-3
    assert _angle_degrees(found.rotation, truth.rotation) < 0.05
    assert np.abs(found.translation - truth.translation).max() < 0.002 * 5.0
    assert fit.inlier_share > 1 - outliers - 0.05
    if outliers:
        plain = umeyama(source, target)
        assert _angle_degrees(plain.rotation, truth.rotation) > 0.2


def test_robust_similarity_runs_until_biased_outliers_lose_their_pull() -> None:
    """Outliers all wrong the same way (30% of the depth 1.3x too far, as on a shiny
    surface) take tens of rounds to weigh down: stopped at 20 rounds, the fit was 0.79% off
    in scale and said nothing; it now runs until it settles (0.2% off: Huber's own bias)."""
    rng = np.random.default_rng(1)
    source = rng.normal(size=(20_000, 3)) * [2.0, 1.0, 3.0] + [0.0, 0.0, 5.0]
    truth = _truth()
    target = truth.scale * source @ truth.rotation.T + truth.translation
    target += rng.normal(scale=0.01, size=target.shape)
    target[rng.random(len(source)) < 0.3] *= 1.3
    fit = robust_similarity(source, target)
    assert fit.converged and fit.iterations > 20, fit.iterations
    assert abs(fit.similarity.scale / truth.scale - 1) < 0.003
    assert not robust_similarity(source, target, max_iterations=5).converged


def test_fitting_chunks_takes_the_memory_of_its_sample_not_of_the_views() -> None:
    """The fits on shared views draw their pixel sample first: the peak does not grow with
    the views' pixels. Before, every usable pixel's world points, weights and depths were
    gathered in float64 and only then sampled (about 210 bytes a pixel: 8 GiB for 20
    shared 1080p views, which the memory model does not count)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    height, width = 270, 480

    def views(count: int) -> list:
        k = np.array([[400.0, 0, width / 2], [0, 400.0, height / 2], [0, 0, 1]], np.float32)
        return [
            dataclasses.replace(
                make_view(index, 8, 8),
                depth=(2 + rng.random((height, width))).astype(np.float32),
                confidence=np.full((height, width), 1.5, np.float32),
                image=np.zeros((height, width, 3), np.uint8),
                sky=None,
                intrinsics=k,
                extrinsics=np.eye(4, dtype=np.float32),
            )
            for index in range(count)
        ]

    for fit in (fit_overlap, fit_depth_scale):
        peaks = []
        for count in (2, 8):  # 260k and 1M usable pixels, both more than the sample
            shared = views(count)
            tracemalloc.start()
            fit(shared, shared)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        assert peaks[1] < 1.3 * peaks[0], (fit.__name__, peaks)


def test_weights_steer_the_fit() -> None:
    """Zero-weight pairs do not count: half the pairs are wrong, and weighted away."""
    rng = np.random.default_rng(1)
    source = rng.normal(size=(1000, 3))
    truth = _truth()
    target = truth.scale * source @ truth.rotation.T + truth.translation
    target[500:] = rng.normal(size=(500, 3))
    weights = np.r_[np.ones(500), np.zeros(500)]
    found = umeyama(source, target, weights)
    assert found.scale == pytest.approx(truth.scale, rel=1e-9)
    with pytest.raises(ValueError, match="weights sum to zero"):
        umeyama(source, target, np.zeros(1000))


# --------------------------------------------------------------------------------------------
# Aligning chunks: an exact scene, each chunk in its own random frame and unit
# --------------------------------------------------------------------------------------------

VIEWS, SIZE, OVERLAP = 40, 12, 6


def _random_similarity(rng: np.random.Generator) -> Similarity:
    return Similarity(
        rotation=Rotation.random(random_state=rng.integers(1 << 31)).as_matrix(),
        translation=rng.normal(size=3) * 3.0,
        scale=float(np.exp(rng.normal() * 0.7)),
    )


def _scene(corrupt: float = 0.0) -> tuple[list, Callable[[range], Prediction], list]:
    """The true views of a 40-frame trajectory through the synthetic room, and a chunk
    predictor that returns each chunk in a random frame and unit (its ``gauges``), with a
    share ``corrupt`` of each view's depth replaced by nonsense."""
    rng = np.random.default_rng(7)
    truth = [make_view(index, 36, 48, name=f"f{index:03d}") for index in range(VIEWS)]
    template = make_prediction(views=1)
    gauges: list[Similarity] = []

    def predict_chunk(views: range) -> Prediction:
        gauge = _random_similarity(rng)
        gauges.append(gauge)
        moved = []
        for index in views:
            view = transform_view(truth[index], gauge)
            if corrupt:
                depth = np.array(view.depth)
                bad = rng.random(depth.shape) < corrupt
                depth[bad] *= rng.uniform(0.2, 3.0, size=int(bad.sum()))
                view = dataclasses.replace(view, depth=depth)
            moved.append(view)
        return dataclasses.replace(template, views=tuple(moved))

    return truth, predict_chunk, gauges


def _world_of_first_chunk(truth: list, gauge: Similarity) -> list:
    return [transform_view(view, gauge) for view in truth]


def _errors(found: Prediction, expected: list) -> tuple[float, float]:
    """Largest relative depth error and largest camera-centre error (relative to the
    trajectory's size) over all views."""
    depth = max(
        float(np.nanmax(np.abs(f.depth / e.depth - 1)))
        for f, e in zip(found.views, expected, strict=True)
    )

    def centre(view) -> np.ndarray:
        extrinsics = np.asarray(view.extrinsics, dtype=np.float64)
        return -extrinsics[:3, :3].T @ extrinsics[:3, 3]

    centres = np.stack([centre(e) for e in expected])
    size = float(np.linalg.norm(centres - centres.mean(axis=0), axis=1).max())
    offset = max(
        float(np.linalg.norm(centre(f) - centre(e)))
        for f, e in zip(found.views, expected, strict=True)
    )
    return depth, offset / size


def test_chunks_are_aligned_into_the_first_chunks_world() -> None:
    """40 frames in chunks of 12 sharing 6, each chunk in a random frame and unit: every
    frame comes back once, in the first chunk's world and unit, depth within 1e-4 and camera
    centres within 1e-4 of the trajectory size; each records its chunk and residual."""
    truth, predict_chunk, gauges = _scene()
    found = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, predict_chunk)
    assert [v.name for v in found.views] == [f"f{i:03d}" for i in range(VIEWS)]
    expected = _world_of_first_chunk(truth, gauges[0])
    depth_error, centre_error = _errors(found, expected)
    assert depth_error < 1e-4 and centre_error < 1e-4, (depth_error, centre_error)
    chunks = chunk_ranges(VIEWS, SIZE, OVERLAP)
    for index, part in enumerate(emitted_views(chunks)):
        assert [found.views[v].chunk for v in part] == [index] * len(part)
    assert all(found.views[v].alignment_residual is None for v in emitted_views(chunks)[0])
    later = [v.alignment_residual for v in found.views if v.chunk]
    assert all(r is not None and r < 1e-5 for r in later)
    assert any("reconstructed in 6 chunks of 12 views sharing 6" in n for n in found.notes)


def test_metric_chunks_say_how_well_their_metric_scales_agree() -> None:
    """Nested models make every chunk metric on its own: the world is in the first chunk's
    metres, metric_scale is that chunk's, and a note gives the range of scales the alignment
    put on the other chunks (here each chunk's unit is off by its random gauge's scale)."""
    _, predict_chunk, gauges = _scene()
    scales: list[float] = []

    def metric_chunk(views: range) -> Prediction:
        scales.append(2.0 + len(scales))
        prediction = predict_chunk(views)
        return dataclasses.replace(prediction, is_metric=True, metric_scale=scales[-1])

    found = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, metric_chunk)
    assert found.is_metric and found.metric_scale == 2.0
    fitted = [gauges[0].scale / gauge.scale for gauge in gauges[1:]]
    expected = f"were scaled by {min(fitted):.3g}-{max(fitted):.3g} to fit it"
    assert any(expected in note for note in found.notes), (expected, found.notes)
    relative = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, _scene()[1])
    assert not any(note.startswith("metric:") for note in relative.notes)


def test_alignment_holds_against_bad_depth_and_a_wrong_alignment_fails_the_check() -> None:
    """With 10% of every view's depth wrong, the robust fit still places every frame within
    0.5% (depth, centres); without alignment (each chunk left in its own frame) the same
    check fails by far, so the tolerance means something."""
    truth, predict_chunk, gauges = _scene(corrupt=0.10)
    found = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, predict_chunk)
    expected = _world_of_first_chunk(truth, gauges[0])
    good = [
        (f, e) for f, e in zip(found.views, expected, strict=True) if np.isfinite(f.depth).all()
    ]
    # Depth: compare where the corruption did not strike (its median error).
    ratios = np.concatenate([np.ravel(f.depth / e.depth) for f, e in good])
    assert np.median(np.abs(ratios - 1)) < 5e-3
    _, centre_error = _errors(found, expected)
    assert centre_error < 5e-3, centre_error

    truth, predict_chunk, gauges = _scene()
    unaligned = _in_one_frame(predict_chunk)
    _, centre_error = _errors(unaligned, _world_of_first_chunk(truth, gauges[0]))
    assert centre_error > 0.1


def _chunks_in_one_frame(
    unit_of: Callable[[int], float], corrupt: float = 0.0
) -> tuple[list, Callable[[range], Prediction]]:
    """The true views, and a chunk predictor that returns them in their own frame (as chunks
    conditioned on the user's poses are) with chunk ``k``'s depth in its own unit
    (``unit_of(k)`` times the truth), a share ``corrupt`` of each view's depth nonsense."""
    rng = np.random.default_rng(11)
    truth = [make_view(index, 36, 48, name=f"f{index:03d}") for index in range(VIEWS)]
    template = make_prediction(views=1)
    predicted = itertools.count()

    def predict_chunk(views: range) -> Prediction:
        factor = unit_of(next(predicted))
        scaled = []
        for index in views:
            depth = np.array(truth[index].depth) * factor
            bad = rng.random(depth.shape) < corrupt
            depth[bad] *= rng.uniform(0.2, 3.0, size=int(bad.sum()))
            scaled.append(dataclasses.replace(truth[index], depth=depth))
        return dataclasses.replace(template, views=tuple(scaled))

    return truth, predict_chunk


def _in_one_frame(
    predict_chunk: Callable[[range], Prediction],
    depth_unit_fixed: Callable[[Prediction], bool] | None = None,
    **options: object,
) -> Prediction:
    """:func:`reconstruct_in_chunks` of the test scene's chunks, which share the user's frame
    (not aligned)."""
    return reconstruct_in_chunks(
        VIEWS,
        SIZE,
        OVERLAP,
        predict_chunk,
        align=False,
        depth_unit_fixed=depth_unit_fixed,
        **options,
    )


def _worst_depth_error(found: Prediction, truth: list, unit: float) -> float:
    return max(
        float(np.max(np.abs(f.depth / (unit * np.asarray(t.depth)) - 1)))
        for f, t in zip(found.views, truth, strict=True)
    )


def test_chunks_in_the_users_frame_are_brought_to_one_depth_unit() -> None:
    """Chunks in the user's frame whose depth the poses did not fix (``depth_unit_fixed``
    False: each chunk in its own unit) come back in the first chunk's unit, cameras as
    given, within 1e-5; left as they are (the check fails by far) they would not. Where the
    first chunk's depth is in the poses' unit, only the chunks that are not are rescaled,
    onto it; with 10% of the depth wrong the median error stays under 0.5%."""
    units = [float(u) for u in np.exp(np.random.default_rng(5).normal(0, 0.5, 10))]
    truth, predict_chunk = _chunks_in_one_frame(units.__getitem__)
    found = _in_one_frame(predict_chunk, lambda _: False)
    assert _worst_depth_error(found, truth, units[0]) < 1e-5
    for f, t in zip(found.views, truth, strict=True):
        np.testing.assert_array_equal(f.extrinsics, t.extrinsics)
    assert all((v.alignment_residual is None) == (v.chunk == 0) for v in found.views)
    assert any("brought to the first chunk's relative unit" in n for n in found.notes)
    truth, predict_chunk = _chunks_in_one_frame(units.__getitem__)
    left = _in_one_frame(predict_chunk)
    assert _worst_depth_error(left, truth, units[0]) > 0.1

    # Chunks 0, 1, 3 and 5 in the poses' unit (1); 2 and 4 not (their poses sit in one place).
    fixed = {0, 1, 3, 5}
    truth, predict_chunk = _chunks_in_one_frame(lambda k: 1.0 if k in fixed else units[k])
    depth_fixed = iter(k in fixed for k in range(10))
    found = _in_one_frame(predict_chunk, lambda _: next(depth_fixed))
    assert _worst_depth_error(found, truth, 1.0) < 1e-5
    # Every later chunk has a residual: the rescaled ones their fit's, the others how their
    # depth agrees with the chunk before (exactly here).
    assert {v.chunk for v in found.views if v.alignment_residual is not None} == {1, 2, 3, 4, 5}
    # (float32 depth: rounding only)
    assert all(v.alignment_residual < 1e-6 for v in found.views if v.chunk in (1, 3, 5))
    assert any("depth of 2 chunk(s)" in n and "the given poses' unit" in n for n in found.notes)
    assert any("3 chunk(s) in the given poses' unit, as the one before" in n for n in found.notes)

    truth, predict_chunk = _chunks_in_one_frame(units.__getitem__, corrupt=0.10)
    found = _in_one_frame(predict_chunk, lambda _: False)
    ratios = np.concatenate(
        [
            np.ravel(f.depth / (units[0] * np.asarray(t.depth)))
            for f, t in zip(found.views, truth, strict=True)
        ]
    )
    assert np.median(np.abs(ratios - 1)) < 5e-3


def test_chunks_in_the_poses_unit_say_how_their_depths_agree() -> None:
    """Chunks the user's poses put in their unit are not moved; where the network's depth and
    the poses' scale disagree (chunk 2's depth 1.5x the others'), the note and the views'
    alignment_residual say by how much."""
    truth, predict_chunk = _chunks_in_one_frame(lambda k: 1.5 if k == 2 else 1.0)
    reports: list[str] = []
    found = _in_one_frame(predict_chunk, lambda _: True, progress=reports.append)
    # Which way round: chunk 3 (index 2) is the deeper one.
    assert any(
        r.startswith("chunk 3: in the given poses' unit") and "its depth is 1.5x" in r
        for r in reports
    ), reports
    # Chunk 2 vs 1: 1.5x; chunk 3 vs 2: 0.667x; the others agree.
    # (differences: a weighted median of |depth - depth before| over the median depth)
    said = (
        r"5 chunk\(s\) in the given poses' unit, as the one before: on their shared views "
        r"their depth is 0.667-1.5x the previous chunk's, differing by 0.00%-4[89]\.\d\d% of "
        "depth"
    )
    assert any(re.search(said, n) for n in found.notes), found.notes
    residuals = {v.chunk: v.alignment_residual for v in found.views}
    assert residuals[0] is None and residuals[1] == pytest.approx(0, abs=1e-9)
    assert residuals[2] == pytest.approx(0.5, rel=0.05)
    assert residuals[3] == pytest.approx(1 / 3, rel=0.05)
    for f, t in zip(found.views, truth, strict=True):  # left as predicted
        assert np.allclose(f.depth, np.asarray(t.depth) * (1.5 if f.chunk == 2 else 1.0))


def test_chunks_in_the_poses_unit_too_sparse_to_compare_are_named() -> None:
    """A chunk whose shared views are all sky cannot be compared with the one before: the
    note names it (the comparison had left it out without a word)."""
    _, predict_chunk = _chunks_in_one_frame(lambda k: 1.5 if k == 2 else 1.0)
    calls = itertools.count()

    def sky_in_chunk_2(views: range) -> Prediction:
        prediction = predict_chunk(views)
        if next(calls) != 2:
            return prediction
        sky = [dataclasses.replace(v, sky=np.ones(v.depth.shape, bool)) for v in prediction.views]
        return dataclasses.replace(prediction, views=tuple(sky))

    found = _in_one_frame(sky_in_chunk_2, lambda _: True)
    assert any(
        "chunk(s) 2, 3 not compared with the chunk before (too few usable" in n for n in found.notes
    ), found.notes
    assert {v.chunk for v in found.views if v.alignment_residual is None} == {0, 2, 3}


def test_unalignable_chunks_name_their_shared_views() -> None:
    """Shared views with no usable pixel (all sky), or an infinite confidence among them:
    the first stops the run naming the chunks and views, the second is left out of the
    fit rather than breaking it."""
    truth, predict_chunk, _ = _scene()

    def sky_over(views: range) -> Prediction:
        prediction = predict_chunk(views)
        shared = range(SIZE - OVERLAP, SIZE)
        return dataclasses.replace(
            prediction,
            views=tuple(
                dataclasses.replace(view, sky=np.ones(view.depth.shape, bool))
                if views[i] in shared
                else view
                for i, view in enumerate(prediction.views)
            ),
        )

    with pytest.raises(ValueError) as refused:
        reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, sky_over)
    assert str(refused.value).startswith(
        f"chunk 2 cannot be aligned with chunk 1 on the views they share (f{SIZE - OVERLAP:03d} "
        f"to f{SIZE - 1:03d}): they have 0 usable pixel(s), fewer than the 64"
    )
    for unit_fixed in (None, lambda _: False):
        with pytest.raises(ValueError, match="chunk 2 cannot be aligned with chunk 1"):
            reconstruct_in_chunks(
                VIEWS,
                SIZE,
                OVERLAP,
                sky_over,
                align=unit_fixed is None,
                depth_unit_fixed=unit_fixed,
            )

    def infinite_confidence(views: range) -> Prediction:
        prediction = predict_chunk(views)
        first = prediction.views[0]
        confidence = np.array(first.confidence, dtype=np.float32)
        confidence[0, 0] = np.inf
        changed = dataclasses.replace(first, confidence=confidence)
        return dataclasses.replace(prediction, views=(changed, *prediction.views[1:]))

    truth, predict_chunk, gauges = _scene()
    found = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, infinite_confidence)
    depth_error, centre_error = _errors(found, _world_of_first_chunk(truth, gauges[0]))
    assert depth_error < 1e-4 and centre_error < 1e-4


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [(5, 5, "25 usable pixel\\(s\\), fewer than the 64"), (2, 40, "bunched together")],
    ids=["patch", "strip"],
)
def test_a_few_bunched_pixels_do_not_align_chunks(rows: int, columns: int, message: str) -> None:
    """A shared view that is sky but for a small patch or a thin strip: a similarity fitted
    on its pixels fits their noise and can place the chunk far off with a small residual
    (17 degrees at 9 pixels), so the run stops naming the chunks: too few pixels, or too
    bunched to fix a rotation. The depth-scale fit of posed chunks needs as many pixels."""
    _, predict_chunk, _ = _scene()
    size, overlap = 6, 1

    def sky_but_a_patch(views: range) -> Prediction:
        prediction = predict_chunk(views)
        changed = []
        for i, view in enumerate(prediction.views):
            if views[i] == size - 1:  # the view chunks 1 and 2 share
                sky = np.ones(view.depth.shape, bool)
                sky[10 : 10 + rows, 4 : 4 + columns] = False
                view = dataclasses.replace(view, sky=sky)
            changed.append(view)
        return dataclasses.replace(prediction, views=tuple(changed))

    with pytest.raises(ValueError, match=f"chunk 2 cannot be aligned with chunk 1.*{message}"):
        reconstruct_in_chunks(12, size, overlap, sky_but_a_patch)
    if rows == 5:
        with pytest.raises(ValueError, match=message):
            reconstruct_in_chunks(
                12, size, overlap, sky_but_a_patch, align=False, depth_unit_fixed=lambda _: False
            )


class _Clock:
    """A stand-in for :mod:`time` in :mod:`da3cog.chunked`: each chunk takes 10 s."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


@pytest.mark.parametrize(
    ("budget", "chunks_run", "views_that_fit"),
    [(60.0, 6, None), (35.0, 1, 24), (5.0, 1, 0)],
)
def test_a_time_budget_stops_a_run_after_the_chunk_that_shows_it_cannot_finish(
    monkeypatch: pytest.MonkeyPatch, budget: float, chunks_run: int, views_that_fit: int | None
) -> None:
    """40 frames in 6 chunks of 12 (sharing 6) at 10 s a chunk: 60 s fits a 60 s budget; under
    35 s the run stops after its first chunk, saying that 3 chunks (24 views) would fit; under
    5 s not even one chunk does."""
    from da3cog import chunked
    from da3cog.chunked import TimeBudgetExceeded

    monkeypatch.setattr(chunked, "time", _Clock)
    _Clock.now = 0.0
    _, predict_chunk, _ = _scene()
    ran: list[range] = []

    def timed(views: range) -> Prediction:
        ran.append(views)
        _Clock.now += 10.0
        return predict_chunk(views)

    if views_that_fit is None:
        found = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, timed, time_budget=budget)
        assert len(found.views) == VIEWS
    else:
        with pytest.raises(TimeBudgetExceeded) as stopped:
            reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, timed, time_budget=budget)
        assert stopped.value.views_that_fit == views_that_fit
        assert stopped.value.projected == 60.0 and stopped.value.budget == budget
        assert "about 60s, over its" in str(stopped.value)
    assert len(ran) == chunks_run


# --------------------------------------------------------------------------------------------
# The pipeline's chunked path
# --------------------------------------------------------------------------------------------


@pytest.fixture
def frames(photo) -> list[np.ndarray]:
    """Ten 96x128 crops sliding across one photo: a camera panning."""
    picture = photo("coffee")
    return [np.ascontiguousarray(picture[100:196, 40 * i : 40 * i + 128]) for i in range(10)]


def test_pipeline_runs_long_requests_in_chunks(
    small_model: DepthAnything3, frames: list[np.ndarray]
) -> None:
    """10 frames in chunks of 4 sharing 2: one output per frame, in order, named as the
    inputs, each at its input size with the chunk it came from; the first frame is the
    world; messages report each chunk."""
    messages: list[str] = []
    options = InferenceOptions(process_res=112, chunk_size=4, chunk_overlap=2)
    found = small_model.predict(frames, options=options, progress=messages.append)
    assert [v.name for v in found.views] == [f"view_{i:04d}" for i in range(10)]
    # Chunks (0-4), (2-6), (4-8), (6-10): a shared view from the chunk it is central in.
    assert [v.chunk for v in found.views] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert all(v.depth.shape == (96, 128) for v in found.views)
    np.testing.assert_allclose(found.views[0].extrinsics, np.eye(4), atol=1e-6)
    assert sum(1 for m in messages if m.startswith("chunk ") and ": views " in m) == 4
    assert any("aligned on 2 shared views" in m for m in messages)
    assert all((v.alignment_residual is None) == (v.chunk == 0) for v in found.views)


def test_auto_picks_chunks_when_one_pass_does_not_fit(
    small_model: DepthAnything3, frames: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default ``chunk_size="auto"``: one pass while the memory model says it fits; with
    room for 4 views' activations (not 5), chunks of 4."""
    from da3cog import memory

    size = memory.request_size([(128, 96)] * 10, 112, "input", gaussians=False, points=0)
    preset = small_model.loaded.preset
    one_pass = memory.estimate(preset, size, on_gpu=False).host
    four = memory.estimate(preset, size, on_gpu=False, chunk=4).host
    five = memory.estimate(preset, size, on_gpu=False, chunk=5).host
    options = InferenceOptions(process_res=112)
    monkeypatch.setattr(memory, "host_budget", lambda: one_pass)
    assert all(v.chunk is None for v in small_model.predict(frames, options=options).views)
    monkeypatch.setattr(memory, "host_budget", lambda: (four + five) // 2)
    found = small_model.predict(frames, options=options)
    assert [v.chunk for v in found.views] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert any("reconstructed in 4 chunks of 4 views sharing 2" in n for n in found.notes)


def test_auto_spills_the_outputs_to_disk_when_even_the_smallest_chunk_does_not_fit(
    small_model: DepthAnything3,
    frames: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Chunks bound the network's memory, not the outputs kept for every view: when the
    memory model says those do not fit either, every view's per-pixel arrays go to
    memory-mapped files (unlinked at once, so nothing is left behind), after a warning that
    names the budget and the lighter output resolution. The values are those of the same
    chunks kept in memory."""
    from da3cog import memory
    from da3cog.chunked import SPILLED_ARRAYS

    size = memory.request_size([(128, 96)] * 10, 112, "input", gaussians=False, points=0)
    smallest = memory.estimate(small_model.loaded.preset, size, False, chunk=memory.MIN_CHUNK)
    options = InferenceOptions(process_res=112)
    monkeypatch.setattr(memory, "host_budget", lambda: smallest.host)
    with caplog.at_level(logging.WARNING, logger="da3cog.pipeline"):
        kept = small_model.predict(frames, options=options)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert not any(isinstance(v.depth, np.memmap) for v in kept.views)

    monkeypatch.setattr(memory, "host_budget", lambda: smallest.host - 1)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with caplog.at_level(logging.WARNING, logger="da3cog.pipeline"):
        spilled = small_model.predict(frames, options=options)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert f"even in chunks of {memory.MIN_CHUNK}" in warned[0]
    assert f"memory-mapped files in {tmp_path} (TMPDIR); with output_resolution=" in warned[0]
    assert "memory-mapped temporary files" in spilled.notes[-1]
    assert list(tmp_path.iterdir()) == []
    assert [v.chunk for v in spilled.views] == [v.chunk for v in kept.views]
    for on_disk, in_memory in zip(spilled.views, kept.views, strict=True):
        for name in SPILLED_ARRAYS:
            value = getattr(on_disk, name)
            if value is None:
                assert getattr(in_memory, name) is None
                continue
            assert isinstance(value, np.memmap) and not value.flags.writeable, name
            np.testing.assert_array_equal(value, getattr(in_memory, name))
        np.testing.assert_array_equal(on_disk.extrinsics, in_memory.extrinsics)
    written = export_all(spilled, tmp_path / "out", ["depth_npy", "ply", "glb"])
    assert np.array_equal(np.load(written.folder / "depth_0009_view_0009.npy"), kept.views[9].depth)


def test_a_loop_closure_writes_again_only_the_depth_of_a_spilled_view(tmp_path: Path) -> None:
    """Moving a spilled view (a loop closure's correction) changes its depth and cameras
    only: the depth goes to a new file, the image and confidence keep theirs (writing them
    again doubled the disk a long run's outputs take)."""
    from da3cog.chunked import _moved, spill_view

    view = spill_view(make_view(0, 12, 16, name="a"), tmp_path)
    assert isinstance(view.image, np.memmap) and isinstance(view.confidence, np.memmap)
    moved = _moved(view, Similarity(np.eye(3), np.ones(3), 2.0), tmp_path, 0.01)
    assert moved.image is view.image and moved.confidence is view.confidence
    assert isinstance(moved.depth, np.memmap) and moved.alignment_residual == 0.01
    np.testing.assert_allclose(moved.depth, 2 * np.asarray(view.depth), rtol=1e-6)
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped


def test_an_explicit_chunk_size_spills_too_when_the_outputs_do_not_fit(
    small_model: DepthAnything3,
    frames: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from da3cog import memory

    options = InferenceOptions(process_res=112, chunk_size=4, chunk_overlap=2)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(memory, "host_budget", lambda: None)
    kept = small_model.predict(frames, options=options)
    assert not any(isinstance(v.depth, np.memmap) for v in kept.views)
    monkeypatch.setattr(memory, "host_budget", lambda: 1)
    spilled = small_model.predict(frames, options=options)
    assert [v.chunk for v in spilled.views] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert all(isinstance(v.depth, np.memmap) for v in spilled.views)
    for on_disk, in_memory in zip(spilled.views, kept.views, strict=True):
        np.testing.assert_array_equal(on_disk.depth, in_memory.depth)
    assert list(tmp_path.iterdir()) == []
    # Outputs that would not fit TMPDIR's free space either: refused before any chunk runs.
    from da3cog import pipeline

    free = memory.spilled_bytes(memory.request_size([(128, 96)] * 10, 112, "input", False, 0))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: usage._replace(free=free - 1))
    monkeypatch.setattr(DepthAnything3, "_predict_one_pass", None)  # nothing may run
    with pytest.raises(ValueError, match=r"of disk in .*\(TMPDIR\), which has 0.0 GiB free"):
        small_model.predict(frames, options=options)


def test_a_full_disk_while_spilling_is_named(tmp_path: Path) -> None:
    """A disk that fills up under a spilling run (here a 64 KiB file-size limit) raises
    SpillFailed naming what was being written and where, not a bare OSError."""
    code = f"""
import resource, numpy as np
from pathlib import Path
from da3cog.chunked import SpillFailed, spill_arrays
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    spill_arrays([np.zeros((256, 256), np.float32)], Path({str(tmp_path)!r}), "view a: depth")
except SpillFailed as error:
    print("SpillFailed:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"view a: depth: could not be written to a memory-mapped file in {tmp_path}" in (
        result.stdout
    ), result.stdout
    assert list(tmp_path.iterdir()) == []


def test_spilled_gaussians_are_mapped_and_equal_to_kept_ones(tmp_path: Path) -> None:
    """A spilled chunked run keeps its Gaussians in memory-mapped files too (before, they
    stayed on the heap, the largest part of a gaussian-splat run's outputs), with the same
    values."""
    _, predict_chunk, _ = _scene()

    def with_gaussians(views: range) -> Prediction:
        return add_gaussians(predict_chunk(views))

    kept = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, with_gaussians)
    _, predict_chunk, _ = _scene()
    spilled = reconstruct_in_chunks(VIEWS, SIZE, OVERLAP, with_gaussians, spill_to=tmp_path)
    assert kept.gaussians is not None and spilled.gaussians is not None
    for name in ("means", "scales", "rotations", "harmonics", "opacities"):
        assert isinstance(getattr(spilled.gaussians, name), np.memmap), name
        np.testing.assert_array_equal(
            getattr(spilled.gaussians, name), getattr(kept.gaussians, name)
        )
    assert spilled.gaussians.grid == kept.gaussians.grid
    assert list(tmp_path.iterdir()) == []


def test_chunks_with_given_poses_stay_in_the_users_frame(
    small_model: DepthAnything3, frames: list[np.ndarray]
) -> None:
    extrinsics = np.tile(np.eye(4), (10, 1, 1))
    extrinsics[:, 0, 3] = -0.1 * np.arange(10)
    intrinsics = np.tile(np.array([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]]), (10, 1, 1))
    options = InferenceOptions(process_res=112, chunk_size=4, chunk_overlap=2)
    found = small_model.predict(
        frames, extrinsics=extrinsics, intrinsics=intrinsics, options=options
    )
    np.testing.assert_allclose(found.extrinsics, extrinsics, atol=1e-5)
    # In the poses' unit: not moved, compared on the views each chunk shares with the last.
    assert all((v.alignment_residual is None) == (v.chunk == 0) for v in found.views)
    assert any("in the given poses' unit, as the one before" in n for n in found.notes)
    # Depth in the network's unit (not the poses'): each chunk's differs, so they are brought
    # to the first one's on their shared views, and the note says so.
    relative = dataclasses.replace(options, align_to_input_scale=False)
    found = small_model.predict(
        frames, extrinsics=extrinsics, intrinsics=intrinsics, options=relative
    )
    np.testing.assert_allclose(found.extrinsics, extrinsics, atol=1e-5)
    assert all((v.alignment_residual is None) == (v.chunk == 0) for v in found.views)
    assert any("brought to the first chunk's relative unit" in n for n in found.notes)


def test_bad_intrinsics_of_a_later_chunk_are_refused_before_any_chunk_runs(
    small_model: DepthAnything3, frames: list[np.ndarray]
) -> None:
    """As in one pass: checked against every image first, named by their index in the
    request, not in a chunk."""
    extrinsics = np.tile(np.eye(4), (10, 1, 1))
    extrinsics[:, 0, 3] = -0.1 * np.arange(10)
    intrinsics = np.tile(np.array([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]]), (10, 1, 1))
    intrinsics[7, 0, 2] = 5000.0
    messages: list[str] = []
    options = InferenceOptions(process_res=112, chunk_size=4, chunk_overlap=2)
    with pytest.raises(ValueError, match=r"intrinsics\[7\]: cx = 5000"):
        small_model.predict(
            frames,
            extrinsics=extrinsics,
            intrinsics=intrinsics,
            options=options,
            progress=messages.append,
        )
    assert not any(m.startswith("chunk ") for m in messages)


@pytest.mark.parametrize(
    ("mixed_shapes", "output_resolution"),
    [("resize", "processing"), ("crop", "input"), ("crop", "processing")],
)
def test_views_of_several_shapes_run_in_chunks_as_in_one_pass(
    small_model: DepthAnything3,
    frames: list[np.ndarray],
    mixed_shapes: str,
    output_resolution: str,
) -> None:
    """Landscape frames then portrait ones: every chunk fits its views to the shape one pass
    over all of them takes (so a view shared by two chunks is the same size in both), the
    outputs have the one pass's sizes, and a note names the refitted views as the request
    does."""
    views = [*frames[:6], *(np.ascontiguousarray(f.transpose(1, 0, 2)) for f in frames[6:])]
    options = InferenceOptions(
        process_res=112, mixed_shapes=mixed_shapes, output_resolution=output_resolution
    )
    single = small_model.predict(views, options=options)
    chunked = small_model.predict(
        views, options=dataclasses.replace(options, chunk_size=4, chunk_overlap=2)
    )
    assert chunked.processing_size == single.processing_size
    assert [v.depth.shape for v in chunked.views] == [v.depth.shape for v in single.views]
    assert max(v.chunk or 0 for v in chunked.views) == 3
    named = [n for n in chunked.notes if n.startswith("views of another shape")]
    # One note for the scene, as the one pass writes it (not one per chunk, naming the views
    # two chunks share twice), the views named as in the request: a chunk's own index would
    # be view_0000 to view_0003.
    assert named == [n for n in single.notes if n.startswith("views of another shape")]
    assert "view_0009" in named[0], named
    if mixed_shapes == "resize":
        assert "view_0006" in named[0] and "view_0002" not in named[0], named


def test_a_request_within_one_chunk_is_a_single_pass(
    small_model: DepthAnything3, frames: list[np.ndarray]
) -> None:
    single = small_model.predict(frames[:4], options=InferenceOptions(process_res=112))
    chunked = small_model.predict(
        frames[:4], options=InferenceOptions(process_res=112, chunk_size=4)
    )
    for a, b in zip(single.views, chunked.views, strict=True):
        np.testing.assert_array_equal(a.depth, b.depth)
        assert b.chunk is None


# --------------------------------------------------------------------------------------------
# Gaussians follow their chunk's similarity
# --------------------------------------------------------------------------------------------


def _random_gaussians(count: int = 300) -> Gaussians:
    from da3cog.geometry import matrix_to_quaternion

    rng = np.random.default_rng(3)
    rotations = Rotation.random(count, random_state=4).as_matrix()
    return Gaussians(
        means=rng.normal(size=(count, 3)).astype(np.float32),
        scales=rng.uniform(0.01, 0.2, size=(count, 3)).astype(np.float32),
        rotations=matrix_to_quaternion(torch.from_numpy(rotations).float()).numpy(),
        harmonics=rng.normal(scale=0.3, size=(count, 3, 9)).astype(np.float32),
        opacities=rng.uniform(0.1, 0.9, size=count).astype(np.float32),
        grid=(3, 10, 10),
    )


def test_gaussians_follow_the_similarity() -> None:
    """Mapped by a similarity, each Gaussian's centre moves with the world, its covariance
    becomes s^2 R C R^T, and its colour seen along R d is the colour it had along d."""
    from da3cog.chunked import transform_gaussians
    from da3cog.export.splat_render import sh_colors
    from da3cog.geometry import quaternion_to_matrix

    before = _random_gaussians()
    similarity = _truth()
    after = transform_gaussians(before, similarity)
    rotation = similarity.rotation
    np.testing.assert_allclose(
        after.means,
        similarity.scale * before.means @ rotation.T + similarity.translation,
        atol=1e-5,
    )

    def covariance(g) -> np.ndarray:
        turn = quaternion_to_matrix(torch.from_numpy(np.array(g.rotations))).double().numpy()
        return turn @ (np.asarray(g.scales, dtype=np.float64)[..., None] ** 2 * turn.swapaxes(1, 2))

    np.testing.assert_allclose(
        covariance(after),
        similarity.scale**2 * rotation @ covariance(before) @ rotation.T,
        atol=1e-6,
    )
    directions = np.random.default_rng(5).normal(size=(len(before), 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    seen_before = sh_colors(
        torch.from_numpy(np.array(before.harmonics)), torch.from_numpy(directions).float(), 2
    )
    seen_after = sh_colors(
        torch.from_numpy(np.array(after.harmonics)),
        torch.from_numpy(directions @ rotation.T).float(),
        2,
    )
    np.testing.assert_allclose(seen_after.numpy(), seen_before.numpy(), atol=1e-5)
    np.testing.assert_array_equal(after.opacities, before.opacities)


def test_gaussians_follow_their_views_depth_unit() -> None:
    """A chunk brought to another depth unit in the user's frame: each view's Gaussians are
    scaled about that view's camera centre (where its depth is measured from), sizes with
    them; orientations, colours and opacities as they were."""
    gaussians = _random_gaussians()
    views = []
    for index in range(3):
        extrinsics = np.eye(4, dtype=np.float32)
        extrinsics[:3, :3] = Rotation.from_euler("y", 20 * index, degrees=True).as_matrix()
        extrinsics[:3, 3] = (index, -0.5 * index, 0.2)
        views.append(make_view(index, 10, 10, name=f"v{index}", extrinsics=extrinsics))
    prediction = dataclasses.replace(make_prediction(views=1), views=tuple(views))
    rescaled = rescale_chunk(dataclasses.replace(prediction, gaussians=gaussians), 1.7)
    assert rescaled.gaussians is not None
    per_view = 100
    for index, view in enumerate(views):
        rotation, translation = view.extrinsics[:3, :3], view.extrinsics[:3, 3]
        centre = -rotation.T @ translation
        part = slice(index * per_view, (index + 1) * per_view)
        np.testing.assert_allclose(
            rescaled.gaussians.means[part] - centre,
            1.7 * (gaussians.means[part] - centre),
            atol=1e-5,
        )
        np.testing.assert_allclose(rescaled.views[index].depth, 1.7 * view.depth, rtol=1e-6)
        np.testing.assert_array_equal(rescaled.views[index].extrinsics, view.extrinsics)
    np.testing.assert_allclose(rescaled.gaussians.scales, 1.7 * gaussians.scales, rtol=1e-6)
    for name in ("rotations", "harmonics", "opacities"):
        np.testing.assert_allclose(
            getattr(rescaled.gaussians, name), getattr(gaussians, name), atol=1e-6
        )


def test_pipeline_chunks_keep_the_gaussians_of_the_emitted_views(
    small_zoo_checkpoint: Callable, frames: list[np.ndarray]
) -> None:
    """A Gaussian-head stand-in on 6 frames in chunks of 4: one grid of Gaussians per
    emitted view, finite, in the same order as the views."""
    from small_zoo import SMALL_GS, small_model

    model = small_model(small_zoo_checkpoint("small-gs")[0], SMALL_GS)
    options = InferenceOptions(
        process_res=112, chunk_size=4, infer_gaussians=True, output_resolution="processing"
    )
    found = model.predict(frames[:6], options=options)
    assert [v.chunk for v in found.views] == [0, 0, 0, 1, 1, 1]
    assert found.gaussians is not None
    views, height, width = found.gaussians.grid
    assert (views, height, width) == (6, *found.processing_size)
    assert len(found.gaussians) == 6 * height * width
    assert np.isfinite(found.gaussians.means).all()
