"""Loop closure for chunked reconstruction: the parts that need no model.

A long sequence aligned chunk by chunk drifts: each overlap's small error carries into every
later chunk, so when the camera comes back to a place it has seen, the two visits do not meet.
:func:`da3cog.chunked.reconstruct_in_chunks` (with ``loop_closure=True``) closes such loops in
three steps; this module holds the first and the last:

1. Retrieval (:func:`appearance_descriptor`, :func:`find_loops`): every view gets a global
   appearance descriptor, a small blurred colour thumbnail made zero-mean and unit-length
   (the "tiny image" of classic relocalisers); pairs of views in chunks that share no views whose
   descriptors agree (cosine similarity at least a threshold) are loop candidates, thinned by
   non-maximum suppression so that one revisit gives one candidate.
2. Verification and measurement (in :mod:`da3cog.chunked`): the views around both ends of a
   candidate run as one extra chunk, fitted onto each end's chunk as placed in the world; a
   candidate is kept only when both fits are about as tight as the sequential overlaps' (a
   look-alike place fails this), and then measures the similarity between the two chunks.
3. The pose graph (:func:`optimise_pose_graph`): every chunk's placement in the world is
   re-solved by least squares over similarities, with the sequential overlaps and the loops
   as relative constraints and the first chunk fixed.

Upstream's streaming does the same with a learned retrieval network (SALAD, whose weights are
not part of DA3) and its own Levenberg-Marquardt solver; retrieval here is model-free and the
solver is scipy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from da3cog.geometry import (
    Similarity,
    compose_similarities,
    invert_similarity,
    matrix_to_rotation_vector,
    rotation_vector_to_matrix,
)

# Thumbnail (width, height) of the appearance descriptor, and its blur (in thumbnail pixels):
# on the room of the tests, views 3 degrees apart correlate at 0.96, 14 degrees apart at 0.63.
DESCRIPTOR_SIZE = (16, 12)
DESCRIPTOR_BLUR = 0.5
# Rows of the similarity matrix computed at once (memory: this many x the number of views).
_RETRIEVAL_BLOCK = 1024


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
    chunk_of: np.ndarray,
    *,
    threshold: float,
    suppression: int,
    limit: int,
) -> list[LoopCandidate]:
    """Loop candidates among views with unit ``descriptors (N, D)``, predicted by the chunks
    ``chunk_of (N,)`` (non-decreasing): for each view, the best-matching view of a chunk at
    least two chunks later (neighbouring chunks share views: their overlap aligns them
    already), kept at ``threshold`` or above; then, best first, a candidate within
    ``suppression`` views of a kept one at both ends is dropped; at most ``limit`` kept."""
    count = len(descriptors)
    chunk_of = np.asarray(chunk_of)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    found: list[LoopCandidate] = []
    for start in range(0, count, _RETRIEVAL_BLOCK):
        rows = np.arange(start, min(start + _RETRIEVAL_BLOCK, count))
        scores = descriptors[rows] @ descriptors.T
        scores[chunk_of[None, :] - chunk_of[rows, None] < 2] = -np.inf
        best = scores.argmax(axis=1)
        best_score = scores[np.arange(len(rows)), best]
        for row, column, score in zip(rows, best, best_score, strict=True):
            if score >= threshold:
                found.append(LoopCandidate(int(row), int(column), float(score)))
    kept: list[LoopCandidate] = []
    for candidate in sorted(found, key=lambda c: (-c.similarity, c.earlier)):
        if len(kept) == limit:
            break
        if all(
            abs(candidate.earlier - other.earlier) >= suppression
            or abs(candidate.later - other.later) >= suppression
            for other in kept
        ):
            kept.append(candidate)
    return kept


@dataclass(frozen=True)
class Constraint:
    """What a measurement says of two chunks: ``relative`` maps the ``later`` chunk's frame
    (its own unit) into the ``earlier`` one's, i.e. ``placement[earlier]^-1 o
    placement[later]``."""

    earlier: int
    later: int
    relative: Similarity


def _exp(parameters: np.ndarray, unit: float) -> Similarity:
    """A similarity from 7 parameters: rotation vector (radians), translation (in ``unit``),
    log scale."""
    return Similarity(
        rotation=rotation_vector_to_matrix(parameters[:3]),
        translation=parameters[3:6] * unit,
        scale=float(np.exp(parameters[6])),
    )


def _log(similarity: Similarity, unit: float) -> np.ndarray:
    """Seven numbers that vanish at the identity: rotation vector (radians), translation in
    ``unit``, log scale."""
    return np.concatenate(
        (
            matrix_to_rotation_vector(similarity.rotation),
            similarity.translation / unit,
            [np.log(similarity.scale)],
        )
    )


def pose_graph_residuals(
    placements: Sequence[Similarity], units: Sequence[float], constraints: Sequence[Constraint]
) -> np.ndarray:
    """``(len(constraints), 7)``: how far each constraint is from holding for ``placements``
    (each chunk's frame -> world): the log of ``relative^-1 o placement[earlier]^-1 o
    placement[later]``, translation relative to the later chunk's scene size ``units``."""
    rows = []
    for constraint in constraints:
        error = compose_similarities(
            invert_similarity(constraint.relative),
            compose_similarities(
                invert_similarity(placements[constraint.earlier]), placements[constraint.later]
            ),
        )
        rows.append(_log(error, units[constraint.later]))
    return np.array(rows).reshape(len(constraints), 7)


def optimise_pose_graph(
    placements: Sequence[Similarity], units: Sequence[float], constraints: Sequence[Constraint]
) -> list[Similarity]:
    """The chunks' placements (each chunk's frame -> world) that best satisfy every
    constraint in the least-squares sense (:func:`pose_graph_residuals`, every constraint
    weighted alike), the first chunk held where it is. ``units``: each chunk's scene size in
    its own unit (median depth), which makes translations comparable across chunks. Each
    placement is updated as ``placement o exp(delta)``, a change expressed in the chunk's own
    frame and unit; scipy's trust-region solver with a sparse Jacobian (a constraint involves
    two chunks)."""
    # Imported here: scipy.optimize takes half a second to import, paid only by runs that
    # close loops.
    from scipy.optimize import least_squares

    count = len(placements)
    if count < 2 or not constraints:
        return list(placements)
    sparsity = np.zeros((7 * len(constraints), 7 * (count - 1)), dtype=np.int8)
    for row, constraint in enumerate(constraints):
        for chunk in (constraint.earlier, constraint.later):
            if chunk > 0:
                sparsity[7 * row : 7 * row + 7, 7 * (chunk - 1) : 7 * chunk] = 1

    def moved(parameters: np.ndarray) -> list[Similarity]:
        deltas = parameters.reshape(count - 1, 7)
        return [placements[0]] + [
            compose_similarities(placements[chunk], _exp(deltas[chunk - 1], units[chunk]))
            for chunk in range(1, count)
        ]

    def residuals(parameters: np.ndarray) -> np.ndarray:
        return pose_graph_residuals(moved(parameters), units, constraints).ravel()

    solution = least_squares(
        residuals,
        np.zeros(7 * (count - 1)),
        jac_sparsity=sparsity,
        method="trf",
        x_scale=1.0,
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
        max_nfev=200,
    )
    return moved(solution.x)
