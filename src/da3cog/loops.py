"""Loop closure for chunked reconstruction: the parts that need no model.

A long sequence aligned chunk by chunk drifts: each overlap's small error carries into every
later chunk, so when the camera comes back to a place it has seen, the two visits do not meet.
:func:`da3cog.chunked.reconstruct_in_chunks` (with ``loop_closure=True``) closes such loops in
three steps; this module holds the first and the last:

1. Retrieval (:func:`appearance_descriptor`, :func:`find_loops`): every view gets a global
   appearance descriptor, a small blurred colour thumbnail made zero-mean and unit-length
   (the "tiny image" of classic relocalisers); pairs of views at least two chunk lengths apart
   whose descriptors agree (cosine similarity at least a threshold) are loop candidates,
   thinned by non-maximum suppression so that one revisit gives one candidate.
2. Verification and measurement (in :mod:`da3cog.chunked`): the views around both ends of a
   candidate run as one extra chunk; a candidate is kept only when, in that chunk, the two
   look-alike views see each other's surfaces (a look-alike place fails this) and both ends
   fit their chunks as placed in the world about as tightly as the sequential overlaps do;
   it then measures the similarity between the two chunks.
3. The pose graph (:func:`optimise_pose_graph`): every chunk's placement in the world is
   re-solved by least squares over similarities, with the sequential overlaps and the loops
   as relative constraints and the first chunk fixed.

Upstream's streaming does the same with a learned retrieval network (SALAD, whose weights are
not part of DA3) and a Levenberg-Marquardt solver on pypose; retrieval here is model-free and
the solver is a Levenberg-Marquardt of its own on scipy's sparse linear algebra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from da3cog.geometry import (
    Similarity,
    compose_similarities,
    invert_similarity,
    matrices_to_rotation_vectors,
    rotation_vectors_to_matrices,
)

# Thumbnail (width, height) of the appearance descriptor, and its blur (in thumbnail pixels):
# on the room of the tests, views 3 degrees apart correlate at 0.96, 14 degrees apart at 0.63.
DESCRIPTOR_SIZE = (16, 12)
DESCRIPTOR_BLUR = 0.5
# Rows of the similarity matrix computed at once (memory: this many x the number of views).
_RETRIEVAL_BLOCK = 1024
_TIE_DECIMALS = 4


def appearance_descriptor(image: np.ndarray) -> np.ndarray:
    """A view's global appearance: its ``(H, W, 3)`` uint8 RGB image as a blurred 16x12
    colour thumbnail, zero-mean and unit-length, ``(576,)`` float32, so that the dot product
    of two descriptors is their normalised cross-correlation (0 for a uniform image)."""
    width, height = DESCRIPTOR_SIZE
    # Area-average to 4x the thumbnail first, so the blur costs the same at any image size.
    larger = cv2.resize(
        np.ascontiguousarray(image), (4 * width, 4 * height), interpolation=cv2.INTER_AREA
    ).astype(np.float32)
    blurred = cv2.GaussianBlur(larger, (0, 0), 4 * DESCRIPTOR_BLUR)
    thumbnail = cv2.resize(blurred, DESCRIPTOR_SIZE, interpolation=cv2.INTER_AREA)
    descriptor = thumbnail.ravel()
    descriptor -= descriptor.mean()
    norm = float(np.linalg.norm(descriptor))
    return descriptor / norm if norm > 1e-6 else np.zeros_like(descriptor)


@dataclass(frozen=True)
class LoopCandidate:
    """Two views that look alike: ``earlier`` and ``later`` (view indices, ``earlier <
    later``), their descriptors' cosine ``similarity``."""

    earlier: int
    later: int
    similarity: float


def find_loops(
    descriptors: np.ndarray,
    *,
    min_gap: int,
    threshold: float,
    suppression: int,
    limit: int,
) -> list[LoopCandidate]:
    """Loop candidates among views with unit ``descriptors (N, D)`` in sequence order: for
    each view, the best-matching view at least ``min_gap`` views later, kept at
    ``threshold`` or above; then, best first, a candidate within ``suppression`` views of a
    kept one at both ends is dropped; at most ``limit`` kept.

    Chunked runs ask for two chunk lengths: the two ends' chunks then share no view (those
    that do are aligned on them already) and at least a chunk's worth of views lies between
    them. Nearer look-alikes are a slow camera, not a return (a gap of one chunk let views
    seven frames apart at a degree a frame take the candidates' places)."""
    count = len(descriptors)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    positions = np.arange(count)
    found: list[LoopCandidate] = []
    for start in range(0, count, _RETRIEVAL_BLOCK):
        rows = np.arange(start, min(start + _RETRIEVAL_BLOCK, count))
        scores = descriptors[rows] @ descriptors.T
        scores[positions[None, :] - rows[:, None] < min_gap] = -np.inf
        best = scores.argmax(axis=1)
        best_score = scores[np.arange(len(rows)), best]
        for row, column, score in zip(rows, best, best_score, strict=True):
            if score >= threshold:
                found.append(LoopCandidate(int(row), int(column), float(score)))
    kept: list[LoopCandidate] = []
    # Similarities equal to _TIE_DECIMALS decimals are ties, taken earliest first: the last bits
    # of a float32 product depend on the BLAS build, and must not decide which loop is kept.
    ranked = sorted(found, key=lambda c: (-round(c.similarity, _TIE_DECIMALS), c.earlier))
    for candidate in ranked:
        if len(kept) == limit:
            break
        if all(
            abs(candidate.earlier - other.earlier) >= suppression
            or abs(candidate.later - other.later) >= suppression
            for other in kept
        ):
            kept.append(candidate)
    return kept


# Rotations (n, 3, 3), translations (n, 3) and scales (n,) of n similarities.
_Placed = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Constraint:
    """What a measurement says of two chunks: ``relative`` maps the ``later`` chunk's frame
    (its own unit) into the ``earlier`` one's, i.e. ``placement[earlier]^-1 o
    placement[later]``."""

    earlier: int
    later: int
    relative: Similarity


def rotation_disagreement(placements: Sequence[Similarity], constraint: Constraint) -> float:
    """Degrees between the rotation ``constraint`` measures from its earlier chunk to its
    later one and the rotation ``placements`` (the chunks' current placements) put there:
    how far the chain has drifted around a loop."""
    chained = compose_similarities(
        invert_similarity(placements[constraint.earlier]), placements[constraint.later]
    )
    difference = (constraint.relative.rotation @ chained.rotation.T)[None]
    return math.degrees(float(np.linalg.norm(matrices_to_rotation_vectors(difference))))


def _stack(similarities: Sequence[Similarity]) -> _Placed:
    """Rotations ``(n, 3, 3)``, translations ``(n, 3)`` and scales ``(n,)`` of similarities."""
    return (
        np.stack([similarity.rotation for similarity in similarities]),
        np.stack([similarity.translation for similarity in similarities]),
        np.array([similarity.scale for similarity in similarities]),
    )


def _take(placed: _Placed, index: np.ndarray) -> _Placed:
    return placed[0][index], placed[1][index], placed[2][index]


def pose_graph_residuals(
    placements: Sequence[Similarity], units: Sequence[float], constraints: Sequence[Constraint]
) -> np.ndarray:
    """``(len(constraints), 7)``: how far each constraint is from holding for ``placements``
    (each chunk's frame -> world): the log of ``relative^-1 o placement[earlier]^-1 o
    placement[later]`` as a rotation vector (radians), a translation relative to the later
    chunk's scene size ``units`` and a log scale."""
    graph = _Graph(units, constraints)
    placed = _stack(placements)
    return graph.residuals(_take(placed, graph.earlier), _take(placed, graph.later))


class _Graph:
    """The constraints as arrays, for residuals of all of them at once."""

    def __init__(self, units: Sequence[float], constraints: Sequence[Constraint]) -> None:
        self.earlier = np.array([c.earlier for c in constraints])
        self.later = np.array([c.later for c in constraints])
        self.units = np.asarray(units, dtype=np.float64)[self.later]
        rotation, translation, scale = _stack([c.relative for c in constraints])
        # The inverse of each measurement: what the residual composes with.
        self.rotation = np.transpose(rotation, (0, 2, 1))
        self.translation = -np.einsum("nij,nj->ni", self.rotation, translation) / scale[:, None]
        self.scale = 1.0 / scale

    def residuals(self, earlier: _Placed, later: _Placed) -> np.ndarray:
        """``(constraints, 7)`` for the placements of each constraint's two chunks."""
        inverse = np.transpose(earlier[0], (0, 2, 1))
        # placement[earlier]^-1 o placement[later] ...
        rotation = inverse @ later[0]
        translation = np.einsum("nij,nj->ni", inverse, later[1] - earlier[1]) / earlier[2][:, None]
        scale = later[2] / earlier[2]
        # ... after the measurement's inverse.
        error_translation = (
            self.scale[:, None] * np.einsum("nij,nj->ni", self.rotation, translation)
            + self.translation
        )
        return np.concatenate(
            (
                matrices_to_rotation_vectors(self.rotation @ rotation),
                error_translation / self.units[:, None],
                np.log(self.scale * scale)[:, None],
            ),
            axis=1,
        )


# Levenberg-Marquardt: rounds at most, the step of the finite differences, and the relative
# change in cost below which it stops.
_MAX_ROUNDS = 100
_DIFFERENCE_STEP = 1e-6
_TOLERANCE = 1e-12


def optimise_pose_graph(
    placements: Sequence[Similarity], units: Sequence[float], constraints: Sequence[Constraint]
) -> list[Similarity]:
    """The chunks' placements (each chunk's frame -> world) that best satisfy every
    constraint in the least-squares sense (:func:`pose_graph_residuals`, every constraint
    weighted alike), the first chunk held where it is. ``units``: each chunk's scene size in
    its own unit (median depth), which makes translations comparable across chunks.

    Each placement is updated as ``placement o exp(delta)``, a change in the chunk's own frame
    and unit (rotation vector, translation in ``units``, log scale). Levenberg-Marquardt on
    the sparse normal equations: a constraint involves two chunks, so its rows of the
    Jacobian are two 7x7 blocks, taken by central differences for every constraint at once
    (28 evaluations of all residuals a round). Measured: 300 chunks in 0.4 s, 1000 in
    2.1 s (``bench/bench_loops.py``)."""
    # Imported here: scipy takes a moment to import, paid only by runs that close loops.
    from scipy.sparse import coo_matrix, diags
    from scipy.sparse.linalg import spsolve

    count = len(placements)
    if count < 2 or not constraints:
        return list(placements)
    graph = _Graph(units, constraints)
    start = _stack(placements)
    scene = np.asarray(units, dtype=np.float64)

    def moved(deltas: np.ndarray) -> _Placed:
        """The placements after ``deltas`` ``(count, 7)`` (row 0 ignored: the first chunk)."""
        deltas = np.concatenate((np.zeros((1, 7)), deltas[1:]))
        step_rotation = rotation_vectors_to_matrices(deltas[:, :3])
        step_translation = deltas[:, 3:6] * scene[:, None]
        return (
            start[0] @ step_rotation,
            start[2][:, None] * np.einsum("nij,nj->ni", start[0], step_translation) + start[1],
            start[2] * np.exp(deltas[:, 6]),
        )

    def residuals(deltas: np.ndarray) -> np.ndarray:
        placed = moved(deltas)
        return graph.residuals(_take(placed, graph.earlier), _take(placed, graph.later))

    def jacobian(deltas: np.ndarray):
        """``(7 x constraints, 7 x (count - 1))`` sparse, by central differences."""
        rows, columns, values = [], [], []
        base = np.arange(len(constraints))[:, None] * 7 + np.arange(7)[None, :]
        fixed = moved(deltas)
        unmoved = (_take(fixed, graph.earlier), _take(fixed, graph.later))
        for side, chunks in ((0, graph.earlier), (1, graph.later)):
            free = chunks > 0
            for parameter in range(7):
                shifted = []
                for sign in (1.0, -1.0):
                    nudged = deltas.copy()
                    nudged[:, parameter] += sign * _DIFFERENCE_STEP
                    pair = list(unmoved)
                    pair[side] = _take(moved(nudged), chunks)
                    shifted.append(graph.residuals(*pair))
                derivative = (shifted[0] - shifted[1]) / (2 * _DIFFERENCE_STEP)
                rows.append(base[free].ravel())
                columns.append(np.repeat(7 * (chunks[free] - 1) + parameter, 7))
                values.append(derivative[free].ravel())
        shape = (7 * len(constraints), 7 * (count - 1))
        return coo_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape
        ).tocsr()

    deltas = np.zeros((count, 7))
    current = residuals(deltas).ravel()
    cost = float(current @ current)
    damping = 1e-4
    for _ in range(_MAX_ROUNDS):
        if cost == 0.0:
            break
        matrix = jacobian(deltas)
        normal = (matrix.T @ matrix).tocsc()
        gradient = matrix.T @ current
        diagonal = normal.diagonal() + 1e-12
        improved = False
        while damping < 1e12:
            damped = (normal + diags(damping * diagonal)).tocsc()
            step = spsolve(damped, -gradient).reshape(count - 1, 7)
            trial = deltas.copy()
            trial[1:] += step
            candidate = residuals(trial).ravel()
            trial_cost = float(candidate @ candidate)
            if trial_cost < cost:
                improved = True
                break
            damping *= 10.0
        if not improved:
            break
        change = (cost - trial_cost) / cost
        deltas, current, cost = trial, candidate, trial_cost
        damping = max(damping / 10.0, 1e-12)
        if change < _TOLERANCE:
            break
    rotation, translation, scale = moved(deltas)
    return [placements[0]] + [
        Similarity(rotation[k], translation[k], float(scale[k])) for k in range(1, count)
    ]
