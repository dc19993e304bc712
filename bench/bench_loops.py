#!/usr/bin/env python
"""Loop closure on a synthetic camera loop whose chunks drift: how much of the drift it undoes.

    python bench/bench_loops.py [--frames 60 120] [--bias 0.1 0.25 0.5]

The scene of ``tests/test_loops.py``: cameras on a circle in a textured room, looking out,
turning 7 degrees a frame (so the last frames come back to the first ones), ray-cast exactly.
A stand-in model predicts every chunk in a random frame and unit, each view warped by a small
similarity once more than the view before it (a turn of ``--bias`` degrees, a scale of
1 + 0.012 x bias and a shift of 0.016 x bias along x a view): a model that turns and grows
the scene a little too much from view to view, which chunk-by-chunk alignment turns into
drift.

For each setting it runs ``reconstruct_in_chunks`` (chunks of 12 sharing 6) without and with
``loop_closure`` and prints the worst camera-centre error after the best similarity onto the
truth (relative to the trajectory's size), the loops checked and kept, and the time closing
them took (the run with loop closure less the run without, stand-in predictions included).
No network runs: this measures the alignment and the pose graph, not DA3's retrieval or
depth on real sequences (not measured: the real weights cannot be downloaded where this is
developed). Then it times the pose graph alone on rings of many chunks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_loops  # noqa: E402
from test_loops import _similarity  # noqa: E402

from da3cog.chunked import chunk_ranges, reconstruct_in_chunks  # noqa: E402
from da3cog.geometry import compose_similarities  # noqa: E402
from da3cog.loops import Constraint, optimise_pose_graph  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, nargs="+", default=[60, 120])
    parser.add_argument("--bias", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--graph-chunks", type=int, nargs="+", default=[30, 100, 300, 1000])
    args = parser.parse_args()
    size, overlap = test_loops.SIZE, test_loops.OVERLAP
    print(f"chunks of {size} views sharing {overlap}; 7 degrees a frame")
    print(
        "| frames | bias (degrees a view) | error, chunk by chunk | error, loops closed | "
        "ratio | loops kept / checked | closing them (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    for frames in args.frames:
        truth = test_loops._loop_truth(frames=frames)
        for bias in args.bias:
            test_loops.BIAS = _similarity(
                bias, (0, 1, 0), (0.016 * bias, 0.0, 0.0), 1.0 + 0.012 * bias
            )
            predict, _ = test_loops._drifting_predictor(truth)
            started = time.perf_counter()
            plain = reconstruct_in_chunks(frames, size, overlap, predict)
            middle = time.perf_counter()
            predict, calls = test_loops._drifting_predictor(truth)
            messages: list[str] = []
            closed = reconstruct_in_chunks(
                frames, size, overlap, predict, loop_closure=True, progress=messages.append
            )
            extra = (time.perf_counter() - middle) - (middle - started)
            checked = len(calls) - len(chunk_ranges(frames, size, overlap))
            kept = sum(1 for message in messages if ": kept (" in message)
            before = test_loops._trajectory_error(plain, truth)
            after = test_loops._trajectory_error(closed, truth)
            failed |= not after < before
            print(
                f"| {frames} | {bias} | {before:.1%} | {after:.1%} | {before / after:.1f}x | "
                f"{kept} / {checked} | {extra:.2f} |",
                flush=True,
            )
    print()
    print("The pose graph alone: a ring of chunks, each overlap off by 0.5 degrees and 0.5% in")
    print("scale, two exact loops (last to first, and across the middle)")
    print("| chunks | solve (s) | worst placement error, chained | after solving |")
    print("| --- | --- | --- | --- |")
    for count in args.graph_chunks:
        seconds, chained, solved = _solve_ring(count)
        failed |= not solved < chained
        print(f"| {count} | {seconds:.3f} | {chained:.3g} | {solved:.3g} |", flush=True)
    return 1 if failed else 0


def _solve_ring(count: int) -> tuple[float, float, float]:
    """Seconds to solve a ring of ``count`` chunks, and the worst placement error (matrix
    entries) before and after."""
    truth = test_loops._ring(count)
    drift = _similarity(0.5, (0, 1, 0), (0.01, 0.0, 0.0), 1.005)
    measured = [
        compose_similarities(test_loops._relative(truth, k - 1, k), drift) for k in range(1, count)
    ]
    chained = [truth[0]]
    for relative in measured:
        chained.append(compose_similarities(chained[-1], relative))
    constraints = [Constraint(k - 1, k, measured[k - 1]) for k in range(1, count)]
    half = count // 2
    constraints += [
        Constraint(0, count - 1, test_loops._relative(truth, 0, count - 1)),
        Constraint(1, half, test_loops._relative(truth, 1, half)),
    ]
    started = time.perf_counter()
    solved = optimise_pose_graph(chained, [3.0] * count, constraints)
    seconds = time.perf_counter() - started

    def worst(placements: list) -> float:
        return max(test_loops._distance(a, b) for a, b in zip(placements, truth, strict=True))

    return seconds, worst(chained), worst(solved)


if __name__ == "__main__":
    sys.exit(main())
