"""Loop closure: similarity algebra, retrieval, the Sim(3) pose graph, and chunked runs of a
synthetic camera loop whose chunks drift (each chunk's geometry warped a little more per
view, as a biased model would), with and without closing the loop."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from test_export_scene import (
    _rotation_y,
    add_gaussians,
    make_prediction,
    make_view,
    surface_points,
)

from da3cog.chunked import (
    IDENTITY,
    LOOP_WINDOW,
    chunk_ranges,
    emitted_views,
    fit_chunk,
    fit_overlap,
    reconstruct_in_chunks,
    transform_view,
)
from da3cog.geometry import (
    Similarity,
    camera_centres,
    compose_similarities,
    invert_similarity,
    matrices_to_rotation_vectors,
    rotation_vectors_to_matrices,
    umeyama,
)
from da3cog.loops import (
    Constraint,
    appearance_descriptor,
    find_loops,
    optimise_pose_graph,
    pose_graph_residuals,
)
from da3cog.pipeline import (
    DepthAnything3,
    InferenceOptions,
    Prediction,
    ViewPrediction,
)


def _similarity(degrees: float, axis: Sequence[float], translation, scale: float) -> Similarity:
    rotation = Rotation.from_rotvec(np.radians(degrees) * np.asarray(axis, dtype=float))
    return Similarity(rotation.as_matrix(), np.asarray(translation, dtype=float), scale)


def _apply(similarity: Similarity, points: np.ndarray) -> np.ndarray:
    return similarity.scale * points @ similarity.rotation.T + similarity.translation


def _distance(a: Similarity, b: Similarity) -> float:
    """Largest difference of two similarities' matrices (scale folded into rotation)."""
    return float(
        max(
            np.abs(a.scale * a.rotation - b.scale * b.rotation).max(),
            np.abs(a.translation - b.translation).max(),
        )
    )


def test_composition_and_inverse_of_similarities() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(20, 3))
    outer = _similarity(30, (0, 1, 0), (1, 2, 3), 2.0)
    inner = _similarity(-70, (1, 0, 0), (-3, 0.5, 1), 0.3)
    composed = compose_similarities(outer, inner)
    np.testing.assert_allclose(
        _apply(composed, points), _apply(outer, _apply(inner, points)), atol=1e-12
    )
    np.testing.assert_allclose(
        _apply(invert_similarity(composed), _apply(composed, points)), points, atol=1e-12
    )


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def test_appearance_descriptors_match_the_same_place_and_not_another() -> None:
    """The room seen from one pose, then from a pose 3 degrees away, then facing the other
    way: the first two correlate far above the threshold, the third does not."""
    here, near, away = (
        make_view(0, 96, 128, extrinsics=_outward_camera(math.radians(angle))).image
        for angle in (0.0, 3.0, 180.0)
    )
    assert float(appearance_descriptor(here) @ appearance_descriptor(near)) > 0.95
    assert float(appearance_descriptor(here) @ appearance_descriptor(away)) < 0.5
    descriptor = appearance_descriptor(here)
    assert descriptor.shape == (576,) and abs(float(np.linalg.norm(descriptor)) - 1) < 1e-5
    flat = appearance_descriptor(np.full((10, 10, 3), 7, dtype=np.uint8))
    assert not np.any(flat)  # no texture: matches nothing (and no division by zero)


def test_find_loops_skips_neighbouring_chunks_and_keeps_one_candidate_per_revisit() -> None:
    rng = np.random.default_rng(1)
    descriptors = rng.normal(size=(40, 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    # Views 36-39 revisit views 1-4; view 12 looks like view 8, in the neighbouring chunk.
    descriptors[36:40] = descriptors[1:5] + 0.05 * rng.normal(size=(4, 16))
    descriptors[12] = descriptors[8]
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    loops = find_loops(descriptors, min_gap=10, threshold=0.9, suppression=5, limit=10)
    assert len(loops) == 1, loops
    assert 1 <= loops[0].earlier <= 4 and loops[0].later == loops[0].earlier + 35
    # Without suppression each revisited view is a candidate; the limit caps them.
    every = find_loops(descriptors, min_gap=10, threshold=0.9, suppression=1, limit=10)
    assert sorted((c.earlier, c.later) for c in every) == [(v, v + 35) for v in range(1, 5)]
    capped = find_loops(descriptors, min_gap=10, threshold=0.9, suppression=1, limit=2)
    assert len(capped) == 2
    assert find_loops(descriptors, min_gap=10, threshold=0.999, suppression=1, limit=10) == []


def test_find_loops_needs_the_gap_between_the_ends() -> None:
    """Look-alike views nearer than ``min_gap`` in the sequence are no loop; at the gap they
    are."""
    rng = np.random.default_rng(3)
    descriptors = rng.normal(size=(24, 16)).astype(np.float32)
    descriptors[13] = descriptors[4]
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    assert find_loops(descriptors, min_gap=10, threshold=0.9, suppression=1, limit=5) == []
    descriptors[14] = descriptors[4]
    (loop,) = find_loops(descriptors, min_gap=10, threshold=0.9, suppression=1, limit=5)
    assert (loop.earlier, loop.later) == (4, 14)


def test_find_loops_breaks_ties_by_position_not_by_rounding_noise() -> None:
    """Revisits that match equally well (identical frames) are taken earliest first, whatever
    the last bits of their float32 similarities (which differ between BLAS builds): a later
    pair scoring 1e-6 higher does not win the single slot."""
    rng = np.random.default_rng(2)
    descriptors = rng.normal(size=(30, 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    descriptors[29], descriptors[27] = descriptors[0], descriptors[2]
    noisy = descriptors.copy()
    noisy[0] *= 1 - 1e-6  # view 0 and 29 now correlate a hair under views 2 and 27
    for case in (descriptors, noisy):
        (loop,) = find_loops(case, min_gap=10, threshold=0.9, suppression=5, limit=1)
        assert (loop.earlier, loop.later) == (0, 29)


# --------------------------------------------------------------------------------------------
# The pose graph
# --------------------------------------------------------------------------------------------


def _ring(count: int) -> list[Similarity]:
    """Chunk placements around a circle, each chunk in its own unit."""
    return [
        Similarity(
            Rotation.from_rotvec([0, 2 * math.pi * k / count, 0]).as_matrix(),
            np.array(
                [3 * math.cos(2 * math.pi * k / count), 0, 3 * math.sin(2 * math.pi * k / count)]
            ),
            1.0 if k == 0 else float(np.exp(0.2 * math.sin(k))),
        )
        for k in range(count)
    ]


def _relative(placements: Sequence[Similarity], a: int, b: int) -> Similarity:
    return compose_similarities(invert_similarity(placements[a]), placements[b])


def test_pose_graph_spreads_a_loops_error_over_the_chain() -> None:
    """Ten chunks on a ring; each sequential measurement is off by the same small similarity
    (drift), the loop from the last chunk to the first is exact. Chaining the sequential
    measurements misplaces the last chunk by far; the optimised graph places every chunk
    closer to the truth, the worst one within a third of the chain's error, and satisfies
    the loop."""
    truth = _ring(10)
    drift = _similarity(1.5, (0, 1, 0), (0.03, 0.0, 0.02), 1.02)
    measured = [compose_similarities(_relative(truth, k - 1, k), drift) for k in range(1, 10)]
    chained = [truth[0]]
    for relative in measured:
        chained.append(compose_similarities(chained[-1], relative))
    constraints = [Constraint(k - 1, k, measured[k - 1]) for k in range(1, 10)]
    loop = Constraint(0, 9, _relative(truth, 0, 9))
    units = [3.0] * 10
    unchanged = optimise_pose_graph(chained, units, constraints)  # nothing to resolve
    assert max(_distance(u, c) for u, c in zip(unchanged, chained, strict=True)) < 1e-12

    solved = optimise_pose_graph(chained, units, [*constraints, loop])
    assert solved[0] is chained[0]  # the first chunk holds the world
    chain_error = [_distance(c, t) for c, t in zip(chained, truth, strict=True)]
    solved_error = [_distance(s, t) for s, t in zip(solved, truth, strict=True)]
    assert max(solved_error) < max(chain_error) / 3, (solved_error, chain_error)
    before = np.abs(pose_graph_residuals(chained, units, [loop])).max()
    after = np.abs(pose_graph_residuals(solved, units, [loop])).max()
    assert after < before / 5, (before, after)


def test_pose_graph_recovers_exact_measurements_from_a_bad_start() -> None:
    """Consistent measurements (sequential and loop alike) and a start far off: the solver
    returns the truth."""
    truth = _ring(6)
    constraints = [Constraint(k - 1, k, _relative(truth, k - 1, k)) for k in range(1, 6)]
    constraints.append(Constraint(0, 5, _relative(truth, 0, 5)))
    start = [truth[0]] + [
        compose_similarities(placed, _similarity(8, (1, 1, 0), (0.3, -0.2, 0.1), 1.1))
        for placed in truth[1:]
    ]
    solved = optimise_pose_graph(start, [3.0] * 6, constraints)
    assert max(_distance(s, t) for s, t in zip(solved, truth, strict=True)) < 1e-6


# --------------------------------------------------------------------------------------------
# Chunked runs of a camera loop that drifts
# --------------------------------------------------------------------------------------------

FRAMES, SIZE, OVERLAP = 60, 12, 6
STEP_DEGREES = 7.0  # 60 frames turn 413 degrees: frames 52-59 come back to frames 0-7
CENTRE = np.array([0.0, -0.6, 2.0])


def _outward_camera(angle: float) -> np.ndarray:
    """World-to-camera of a camera on a circle around the cube, looking outward."""
    rotation = _rotation_y(math.degrees(angle))  # camera-to-world
    centre = CENTRE + 1.3 * rotation[:, 2]
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = rotation.T
    extrinsics[:3, 3] = -rotation.T @ centre
    return extrinsics


def _loop_truth(frames: int = FRAMES, step: float = STEP_DEGREES) -> list[ViewPrediction]:
    return [
        make_view(
            index,
            36,
            48,
            name=f"f{index:03d}",
            extrinsics=_outward_camera(math.radians(step * index)),
        )
        for index in range(frames)
    ]


# Each view a chunk predicts is warped by this similarity once more than the one before it:
# a model that turns and grows the scene a little too much from view to view.
BIAS = _similarity(0.25, (0, 1, 0), (0.004, 0.0, 0.0), 1.003)


def _power(similarity: Similarity, times: int) -> Similarity:
    result = Similarity(np.eye(3), np.zeros(3), 1.0)
    for _ in range(times):
        result = compose_similarities(similarity, result)
    return result


def _drifting_predictor(
    truth: Sequence[ViewPrediction], wrong_loops: bool = False, gaussians: bool = False
) -> tuple[Callable[[Sequence[int]], Prediction], list[list[int]]]:
    """A chunk predictor returning the true views warped by ``BIAS`` once per position in
    the chunk, each chunk in a random frame and unit; it records the views of every call.
    ``wrong_loops``: a chunk of non-consecutive views (a loop chunk) gets its second part
    from views half the loop away, as a model fooled by a look-alike place might."""
    rng = np.random.default_rng(3)
    template = make_prediction(views=1)
    calls: list[list[int]] = []

    def predict(views: Sequence[int]) -> Prediction:
        views = list(views)
        calls.append(views)
        jumps = [i + 1 for i, (a, b) in enumerate(itertools.pairwise(views)) if b - a != 1]
        if wrong_loops and jumps:
            jump = jumps[0]
            views = views[:jump] + [(v - len(truth) // 2) % len(truth) for v in views[jump:]]
        gauge = Similarity(
            Rotation.random(random_state=rng.integers(1 << 31)).as_matrix(),
            rng.normal(size=3),
            float(np.exp(rng.normal() * 0.5)),
        )
        moved = [
            transform_view(transform_view(truth[view], _power(BIAS, position)), gauge)
            for position, view in enumerate(views)
        ]
        prediction = dataclasses.replace(template, views=tuple(moved))
        return add_gaussians(prediction) if gaussians else prediction

    return predict, calls


def _trajectory_error(found: Prediction, truth: Sequence[ViewPrediction]) -> float:
    """Largest camera-centre error after the best similarity onto the truth, relative to the
    trajectory's size."""
    estimated = camera_centres(np.stack([v.extrinsics for v in found.views]).astype(np.float64))
    true = camera_centres(np.stack([v.extrinsics for v in truth]).astype(np.float64))
    fit = umeyama(estimated, true)
    size = float(np.linalg.norm(true - true.mean(axis=0), axis=1).max())
    return float(np.linalg.norm(_apply(fit, estimated) - true, axis=1).max()) / size


def test_closing_the_loop_undoes_most_of_the_drift() -> None:
    """60 frames around a loop in chunks of 12 sharing 6; every chunk drifts. Aligned chunk by
    chunk, the last frames land far from the first ones they revisit. With loop closure the
    look-alike views are checked in loop chunks of two windows: the revisit (start and end of
    the loop) is kept, the look-alikes on other walls are rejected (the two views do not see
    each other's surfaces), and the worst camera-centre error shrinks by more than 2.5x;
    every frame still comes back once, and the first chunk's views stay where they were (the
    world is the first chunk's)."""
    truth = _loop_truth()
    predict, _ = _drifting_predictor(truth)
    drifting = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict)
    predict, calls = _drifting_predictor(truth)
    notes: list[str] = []
    closed = reconstruct_in_chunks(
        FRAMES, SIZE, OVERLAP, predict, loop_closure=True, progress=notes.append
    )

    assert [v.name for v in closed.views] == [f"f{i:03d}" for i in range(FRAMES)]
    window = min(SIZE // 2, LOOP_WINDOW)
    loop_calls = calls[9:]  # 9 sequential chunks, then one loop chunk per candidate
    assert all(len(call) == 2 * window for call in loop_calls)
    kept = [n for n in notes if n.endswith("kept (chunks 1 and 9)")]
    assert len(kept) == 1, notes
    revisit = loop_calls[int(kept[0].split()[1].rstrip(":")) - 1]
    assert max(revisit[:window]) < 12 and min(revisit[window:]) >= 48, revisit
    summary = f"1 of {len(loop_calls)} candidate loop(s) kept ({len(loop_calls) - 1} rejected"
    assert any(summary in note for note in closed.notes), closed.notes

    before, after = _trajectory_error(drifting, truth), _trajectory_error(closed, truth)
    assert before > 0.3, before  # the drift is real
    assert after < before / 2.5, (before, after)
    for found, reference in zip(closed.views[:6], drifting.views[:6], strict=True):
        np.testing.assert_allclose(found.extrinsics, reference.extrinsics, atol=1e-5)
        np.testing.assert_allclose(found.depth, reference.depth, rtol=1e-6)


def test_a_slow_cameras_neighbours_are_no_loop() -> None:
    """At 2 degrees a frame, views a chunk apart still look alike: they took loop candidates'
    places and were kept as loops (f044 and f051, in chunks two apart, the same place
    indeed), each one more chunk to predict. Only the return to the start is a loop."""
    frames = 200
    predict, _ = _drifting_predictor(_loop_truth(frames, 2.0))
    notes: list[str] = []
    reconstruct_in_chunks(frames, SIZE, OVERLAP, predict, loop_closure=True, progress=notes.append)
    candidates = {
        int(found[1]): int(found[3]) - int(found[2])
        for found in (re.match(r"loop (\d+)/\d+: f(\d+) and f(\d+) look alike", n) for n in notes)
        if found
    }
    kept = [int(found[1]) for found in (re.match(r"loop (\d+): kept", n) for n in notes) if found]
    assert candidates and min(candidates.values()) >= 2 * SIZE, candidates
    assert kept and all(candidates[k] >= frames - 2 * SIZE for k in kept), (kept, candidates)


def test_alignment_residuals_are_read_again_after_the_loop_closes() -> None:
    """The drifting chunks align exactly on their overlaps (each overlap differs from the
    chunk before by one similarity), so the sequential residuals are nil; closing the loop
    spreads its error over the chain, so the overlaps no longer agree exactly. Each view's
    alignment_residual is then its chunk's overlap residual with both chunks where they end
    up: checked against the chunks' own predictions placed by the similarity that takes each
    chunk's emitted views onto the returned ones."""
    truth = _loop_truth()
    drifting, _ = _drifting_predictor(truth)
    predictions: list[Prediction] = []

    def predict(views: Sequence[int]) -> Prediction:
        predictions.append(drifting(views))
        return predictions[-1]

    notes: list[str] = []
    closed = reconstruct_in_chunks(
        FRAMES, SIZE, OVERLAP, predict, loop_closure=True, progress=notes.append
    )
    assert any("1 of" in note and "kept" in note for note in closed.notes), closed.notes
    assert any("overlap residuals now" in note for note in closed.notes), closed.notes
    chunks = chunk_ranges(FRAMES, SIZE, OVERLAP)
    placed = []
    for chunk, emit, prediction in zip(chunks, emitted_views(chunks), predictions, strict=False):
        own = np.concatenate(
            [surface_points(prediction.views[v - chunk.start], np.float64) for v in emit]
        )
        final = np.concatenate([surface_points(closed.views[v], np.float64) for v in emit])
        placed.append(umeyama(own, final))
    assert closed.views[0].alignment_residual is None
    for index in range(1, len(chunks)):
        shared = range(chunks[index].start, chunks[index - 1].stop)
        earlier = [
            transform_view(
                predictions[index - 1].views[v - chunks[index - 1].start], placed[index - 1]
            )
            for v in shared
        ]
        later = [
            transform_view(predictions[index].views[v - chunks[index].start], placed[index])
            for v in shared
        ]
        _, sequential = fit_chunk(
            [predictions[index - 1].views[v - chunks[index - 1].start] for v in shared],
            [predictions[index].views[v - chunks[index].start] for v in shared],
        )
        expected = fit_overlap(earlier, later)[2].residual(IDENTITY, IDENTITY)
        found = {v.alignment_residual for v in closed.views if v.chunk == index}
        assert len(found) == 1, found
        (residual,) = found
        assert sequential < 1e-6, sequential
        assert expected > 1e-4, expected
        np.testing.assert_allclose(residual, expected, rtol=0.02)


def test_gaussians_move_with_their_chunk_when_loops_close() -> None:
    """With Gaussians on every pixel's surface point, each chunk's correction moves its
    Gaussians with its views: after closing the loop every Gaussian still sits on its pixel's
    surface point of the returned view."""
    truth = _loop_truth()
    predict, _ = _drifting_predictor(truth, gaussians=True)
    closed = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict, loop_closure=True)
    assert any("1 of" in note and "kept" in note for note in closed.notes), closed.notes
    assert closed.gaussians is not None and closed.gaussians.grid == (FRAMES, 36, 48)
    means = closed.gaussians.means.reshape(FRAMES, -1, 3)
    for view, placed in zip(closed.views, means, strict=True):
        expected = surface_points(view, np.float64)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(placed, expected, atol=1e-4 * scale)


@pytest.mark.parametrize(("drift", "reads"), [(60.0, 60.0), (190.0, 170.0)])
def test_the_drift_around_a_loop_is_read_before_closing_it(drift: float, reads: float) -> None:
    """A ring of 100 chunks whose chain turns a little too much at every overlap: the
    rotation the loop measures (the truth) and the one the chain put there disagree by the
    drift, read up to 180 degrees. Loop closure keeps only loops under MAX_LOOP_DRIFT_DEGREES:
    past 180 the pose graph, which starts from the chain, closed them the wrong way round (a
    ring drifting 190 degrees ended with chunks on its far side)."""
    from da3cog.chunked import MAX_LOOP_DRIFT_DEGREES
    from da3cog.loops import rotation_disagreement

    count = 100
    step = _similarity(360.0 / count, (0, 1, 0), (0.3, 0.0, 0.0), 1.0)
    drifted_step = _similarity(360.0 / count + drift / (count - 1), (0, 1, 0), (0.3, 0, 0), 1.0)
    truth = [_power(step, k) for k in range(count)]
    chain = [_power(drifted_step, k) for k in range(count)]
    loop = Constraint(
        0, count - 1, compose_similarities(invert_similarity(truth[0]), truth[count - 1])
    )
    assert rotation_disagreement(chain, loop) == pytest.approx(reads, abs=1e-6)
    assert rotation_disagreement(truth, loop) == pytest.approx(0.0, abs=1e-6)
    assert (rotation_disagreement(chain, loop) > MAX_LOOP_DRIFT_DEGREES) == (drift > 90)


def test_spilled_gaussians_move_in_place_with_their_chunk(tmp_path) -> None:
    """A spilled run keeps its Gaussians in one file per array, each chunk's moved there in
    place when the loop closes: the same values as a run that kept them in memory."""
    truth = _loop_truth()
    kept = reconstruct_in_chunks(
        FRAMES, SIZE, OVERLAP, _drifting_predictor(truth, gaussians=True)[0], loop_closure=True
    )
    spilled = reconstruct_in_chunks(
        FRAMES,
        SIZE,
        OVERLAP,
        _drifting_predictor(truth, gaussians=True)[0],
        loop_closure=True,
        spill_to=tmp_path,
    )
    assert kept.gaussians is not None and spilled.gaussians is not None
    assert spilled.gaussians.grid == kept.gaussians.grid
    for name in ("means", "scales", "rotations", "harmonics", "opacities"):
        found = getattr(spilled.gaussians, name)
        assert isinstance(found, np.memmap), name
        np.testing.assert_allclose(found, getattr(kept.gaussians, name), rtol=1e-6, atol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_look_alikes_in_a_sequence_that_never_comes_back_change_nothing() -> None:
    """The same drifting chunks along an arc of 177 degrees: the room's repeating texture
    makes views on different walls look alike, the loop chunk shows they do not see each
    other, and the output is identical to the run without loop closure."""
    truth = _loop_truth(step=3.0)
    predict, _ = _drifting_predictor(truth)
    plain = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict)
    predict, calls = _drifting_predictor(truth)
    closed = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict, loop_closure=True)
    assert len(calls) > 9  # candidates were checked
    assert any("0 of" in note and "placements unchanged" in note for note in closed.notes)
    for a, b in zip(plain.views, closed.views, strict=True):
        np.testing.assert_array_equal(a.extrinsics, b.extrinsics)
        np.testing.assert_array_equal(a.depth, b.depth)


def test_a_loop_chunk_that_saw_another_place_is_rejected() -> None:
    """A model fooled at the true revisit (its loop chunk shows, at one end, views half the
    loop away): the loop is rejected and nothing moves."""
    truth = _loop_truth()
    predict, _ = _drifting_predictor(truth)
    plain = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict)
    predict, calls = _drifting_predictor(truth, wrong_loops=True)
    fooled = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict, loop_closure=True)
    assert len(calls) > 9
    assert any("0 of" in n and "placements unchanged" in n for n in fooled.notes), fooled.notes
    for a, b in zip(plain.views, fooled.views, strict=True):
        np.testing.assert_array_equal(a.extrinsics, b.extrinsics)


def test_loop_chunks_stop_at_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With time for the sequential chunks but not one more, the loops are left unchecked
    (and said so) rather than overrunning the budget."""
    import da3cog.chunked as chunked

    clock = {"now": 0.0}
    monkeypatch.setattr(chunked.time, "perf_counter", lambda: clock["now"])
    truth = _loop_truth()
    predict, calls = _drifting_predictor(truth)

    def timed(views: Sequence[int]) -> Prediction:
        clock["now"] += 1.0
        return predict(views)

    found = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, timed, loop_closure=True, time_budget=9.5)
    assert len(calls) == 9
    assert any("unchecked for lack of time" in note for note in found.notes), found.notes


# --------------------------------------------------------------------------------------------
# The pipeline (random-weight small model: the plumbing, not the quality)
# --------------------------------------------------------------------------------------------


def test_pipeline_checks_a_revisit_in_a_loop_chunk_and_keeps_one_view_per_frame(
    small_model: DepthAnything3, photo
) -> None:
    """A camera panning across a photo and back to where it started, in chunks of 4 sharing
    2, with loop closure: the revisit is found and checked by one more forward pass of the
    views around both ends (non-consecutive views, named as the user's inputs), the run says
    what it decided, and every frame comes back once at its input size."""
    picture = photo("coffee")
    offsets = [0, 40, 80, 120, 160, 200, 240, 200, 160, 120, 80, 40, 0]
    frames = [np.ascontiguousarray(picture[100:196, x : x + 128]) for x in offsets]
    messages: list[str] = []
    options = InferenceOptions(process_res=112, chunk_size=4, chunk_overlap=2, loop_closure=True)
    found = small_model.predict(frames, options=options, progress=messages.append)
    assert [v.name for v in found.views] == [f"view_{i:04d}" for i in range(len(frames))]
    assert all(v.depth.shape == (96, 128) for v in found.views)
    checked = [m for m in messages if m.startswith("loop 1/")]
    assert checked and "view_0000 and view_0012 look alike" in checked[0], messages
    assert any(note.startswith("loop closure: ") for note in found.notes), found.notes


def test_rotation_vectors_round_trip() -> None:
    """Rodrigues both ways, batched, against scipy: near zero and up to half a turn."""
    axis = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])
    degrees = np.array([0.0, 1e-9, 1e-4, 0.5, 90.0, 179.0, 180.0])
    vectors = np.radians(degrees)[:, None] * axis
    matrices = rotation_vectors_to_matrices(vectors)
    np.testing.assert_allclose(matrices, Rotation.from_rotvec(vectors).as_matrix(), atol=1e-12)
    back = matrices_to_rotation_vectors(matrices)
    # +axis and -axis are the same half turn.
    back[-1] *= np.sign(back[-1] @ vectors[-1])
    np.testing.assert_allclose(back, vectors, atol=1e-9)


def test_loop_closure_says_when_it_has_nothing_to_do() -> None:
    """Chunks in one frame already (the user's poses) and runs too short for a loop: no loop
    chunk, a note saying why."""
    truth = _loop_truth()
    predict, calls = _drifting_predictor(truth)
    posed = reconstruct_in_chunks(FRAMES, SIZE, OVERLAP, predict, align=False, loop_closure=True)
    assert len(calls) == 9
    assert any("chunks share one frame already" in note for note in posed.notes)
    # Three chunks of 12 sharing 6 span 24 views: none two chunk lengths apart.
    for views, chunks in ((18, 2), (24, 3)):
        predict, calls = _drifting_predictor(truth)
        short = reconstruct_in_chunks(views, SIZE, OVERLAP, predict, loop_closure=True)
        assert len(calls) == chunks
        assert any(f"not run, {views} views: no two are 2 chunk" in n for n in short.notes)


def test_a_single_pass_says_it_had_no_loops_to_close(small_model: DepthAnything3, photo) -> None:
    picture = photo("coffee")
    frames = [np.ascontiguousarray(picture[100:196, x : x + 128]) for x in (0, 40)]
    options = InferenceOptions(process_res=112, chunk_size=None, loop_closure=True)
    found = small_model.predict(frames, options=options)
    assert any("ran in one pass" in note for note in found.notes), found.notes
