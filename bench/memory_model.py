#!/usr/bin/env python
"""Measure the network's activation peak and compare it with the served model's estimate.

    python bench/memory_model.py [--models small base] [--device cpu] [--quick] [--all-tails]
                                 [--points 32x280 64x280]
    python bench/memory_model.py --fit LOG [LOG ...]

For every (model, views, processing size) of the grid a fresh subprocess builds the network
with random weights (activations do not depend on the weights' values), runs one forward on a
random batch of ``views`` images of ``res`` x ``res * 3/4`` (rounded to the patch size), as
the pipeline runs it (``keep_intermediates=False``: a nested network's any-view branch does
not hold its backbone's features while the metric branch runs; rows before 2026-12-04 late
were measured with them kept, which changes only nested rows), and reports the memory the
forward added on top of the loaded network, warmed up by a one-view forward at 140 px as the
served model is in its setup. The heads' full-resolution tails run
one image at a time, as on a CPU, or with ``--all-tails`` over every view at once (what a GPU
does when they fit, :func:`da3cog.memory.head_views`):

* CPU: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
  network is built) minus the resident set before the forward;
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the forward (the
  backbone under bf16 autocast, as the pipeline runs it).

Each row prints the estimate of :func:`da3cog.memory.network_bytes` and the ratio
measured / estimate: the estimate is meant as an upper bound (ratio <= 1), and the ratio's
spread says how loose it is. The last run's table is in bench/README.md.

``--fit`` measures nothing: it reads the rows of earlier runs' output (logs of this script;
the rows of nested presets, whose estimate composes two branches, are left out) and fits the
network's three constants (:func:`da3cog.memory.network_terms`) as the tightest upper bound
of the measured peaks, a linear programme: the smallest sum of estimate / measured with no
estimate under its measured peak. It prints the fitted constants, the same with a margin
(``FIT_MARGIN``, what ``da3cog.memory`` is meant to ship) and, for the constants it ships,
the ratio measured / estimate of every row.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from random_checkpoints import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
GRID = ((1, 280), (4, 280), (8, 280), (16, 280), (1, 504), (4, 504))
QUICK_GRID = ((1, 280), (4, 280), (4, 504))

CHILD = r"""
import json, sys
import torch
from da3cog.model.network import build_network
from da3cog.model.presets import PRESETS
from da3cog.io.preprocess import PATCH_SIZE

preset_name, views, res, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
head_views = int(sys.argv[5])
torch.set_num_threads(2)
torch.manual_seed(0)
cuda = device.startswith("cuda")
with torch.device(device):
    network = build_network(PRESETS[preset_name])
height = round(res * 3 / 4 / PATCH_SIZE) * PATCH_SIZE
width = res // PATCH_SIZE * PATCH_SIZE
images = torch.randn(1, views, 3, height, width, device=device)
# The served model warms up in setup: one-off costs (thread pools, kernel caches) are not a
# request's.
with torch.inference_mode():
    network(torch.randn(1, 1, 3, 98, 140, device=device),
            autocast_dtype=torch.bfloat16 if cuda else None, keep_intermediates=False)

sys.path.insert(0, "tests")
from peak_memory import peak_added, reset_peak

if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    before = reset_peak()
with torch.inference_mode():
    # As the pipeline runs it: the backbone's features are not kept past the heads.
    network(images, autocast_dtype=torch.bfloat16 if cuda else None, head_views=head_views,
            keep_intermediates=False)
if cuda:
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
else:
    added = peak_added(before)
print(json.dumps({"added": added, "height": height, "width": width}))
"""


def measure(preset: str, views: int, res: int, device: str, head_views: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, preset, str(views), str(res), device, str(head_views)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{preset} {views}x{res} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# The shipped constants are the fitted ones times this, rounded up: the same point measured on
# another day differs by up to 40% (the allocator's reuse of freed blocks), and the tightest
# bound of the rows measured so far is as high as the worst of them.
FIT_MARGIN = 1.2
ROW = re.compile(r"^\| (\w+) \| (\d+) \| (\d+)x(\d+) \| (\d+) \|")
ALL_TAILS = "head tails every view at once"
# (model, views, processing pixels, all tails at once, measured bytes)
Row = tuple[str, int, int, bool, int]


def read_rows(logs: list[Path]) -> list[Row]:
    """``(model, views, processing pixels, all tails at once, measured bytes)`` of every
    measured row in ``logs``."""
    rows = []
    for log in logs:
        all_tails = False
        for line in log.read_text().splitlines():
            if line.startswith("device:"):
                all_tails = ALL_TAILS in line
            match = ROW.match(line)
            if match and match[1] in MODEL_NAMES:
                model, views, width, height, mib = match.groups()
                pixels = int(width) * int(height)
                rows.append((model, int(views), pixels, all_tails, int(mib) * 2**20))
    return rows


def fit_constants(
    rows: list[Row],
) -> tuple[np.ndarray, list[Row], np.ndarray, np.ndarray]:
    """The network's three constants fitted to the rows of any-view presets (nested ones left
    out): ``(fitted, rows kept, terms, measured)``, ``terms`` one row of
    :func:`da3cog.memory.network_terms` per row kept. Raises ``ValueError`` when no row is
    kept or the programme has no solution."""
    from scipy.optimize import linprog

    from da3cog import memory
    from da3cog.model.presets import PRESETS

    kept = [row for row in rows if PRESETS[MODEL_NAMES[row[0]]].metric_branch is None]
    terms, measured = [], []
    for model, views, pixels, all_tails, added in kept:
        preset = PRESETS[MODEL_NAMES[model]]
        size = memory.RequestSize((pixels,) * views, (pixels,) * views, (pixels,) * views)
        terms.append(memory.network_terms(preset, size, views if all_tails else 1))
        measured.append(added)
    if not measured:
        raise ValueError("no measured rows of an any-view preset")
    terms_array, measured_array = np.array(terms, float), np.array(measured, float)
    solution = linprog(
        (terms_array / measured_array[:, None]).sum(axis=0),
        A_ub=-terms_array,
        b_ub=-measured_array,
        bounds=[(0, None)] * 3,
    )
    if not solution.success:
        raise ValueError(f"no fit: {solution.message}")
    return solution.x, kept, terms_array, measured_array


def shipped_constants() -> np.ndarray:
    """The three constants :mod:`da3cog.memory` ships, in :func:`fit_constants`' order."""
    from da3cog import memory

    return np.array(
        [
            memory.ACTIVATION_BYTES_PER_TOKEN_CHANNEL,
            memory.HEAD_BYTES_PER_PIXEL_CHANNEL,
            memory.TAIL_BYTES_PER_PIXEL_CHANNEL,
        ],
        float,
    )


def fit(logs: list[Path]) -> int:
    try:
        fitted, rows, terms_array, measured_array = fit_constants(read_rows(logs))
    except ValueError as error:
        print(f"{error} in {', '.join(map(str, logs))}", file=sys.stderr)
        return 2
    shipped = shipped_constants()
    names = ("backbone per token-channel", "head per pixel-channel", "tails per pixel-channel")
    print(f"{len(rows)} measured rows from {len(logs)} log(s)")
    print(f"| constant (bytes) | fitted (tightest bound) | x {FIT_MARGIN}, rounded up | shipped |")
    print("| --- | --- | --- | --- |")
    for name, value, ships in zip(names, fitted, shipped, strict=True):
        print(f"| {name} | {value:.2f} | {math.ceil(value * FIT_MARGIN)} | {ships:.0f} |")
    print()
    print("| model | views | pixels | tails | measured (MiB) | shipped estimate (MiB) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    shipped_estimates = terms_array @ shipped
    ratios = measured_array / shipped_estimates
    for (model, views, pixels, all_tails, added), estimate, ratio in zip(
        rows, shipped_estimates, ratios, strict=True
    ):
        tails = "all" if all_tails else "one"
        print(
            f"| {model} | {views} | {pixels} | {tails} | {added / 2**20:.0f} | "
            f"{estimate / 2**20:.0f} | {ratio:.2f} |"
        )
    fitted_ratios = measured_array / (terms_array @ fitted)
    print(
        f"measured / estimate: fitted {fitted_ratios.min():.2f}-{fitted_ratios.max():.2f} "
        f"(median {np.median(fitted_ratios):.2f}); shipped {ratios.min():.2f}-"
        f"{ratios.max():.2f} (median {np.median(ratios):.2f})"
    )
    return 1 if ratios.max() > 1 else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["small", "base"], choices=MODEL_NAMES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="three points per model")
    parser.add_argument(
        "--all-tails", action="store_true", help="the heads' tails over every view at once"
    )
    parser.add_argument(
        "--points",
        nargs="+",
        metavar="VIEWSxRES",
        help="measure these (views, processing size) points instead of the grid, e.g. 32x280",
    )
    parser.add_argument(
        "--fit",
        nargs="+",
        type=Path,
        metavar="LOG",
        help="fit the network's constants to the rows of these logs of earlier runs",
    )
    args = parser.parse_args()
    if args.fit:
        return fit(args.fit)
    grid = QUICK_GRID if args.quick else GRID
    if args.points:
        try:
            grid = tuple(tuple(int(n) for n in point.split("x")) for point in args.points)
        except ValueError:
            parser.error(f"--points takes VIEWSxRES, e.g. 32x280, got {args.points}")
        if any(len(point) != 2 or min(point) < 1 for point in grid):
            parser.error(f"--points takes VIEWSxRES, e.g. 32x280, got {args.points}")

    from da3cog import memory
    from da3cog.model.presets import PRESETS

    tails = "every view at once" if args.all_tails else "one image at a time"
    print(f"device: {args.device}; head tails {tails}")
    print(
        "| model | views | processing size | measured (MiB) | estimate (MiB) "
        "| measured / estimate |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    ratios = []
    for model in args.models:
        preset = MODEL_NAMES[model]
        for views, res in grid:
            head_views = views if args.all_tails else 1
            row = measure(preset, views, res, args.device, head_views)
            pixels = row["height"] * row["width"]
            size = memory.RequestSize((pixels,) * views, (pixels,) * views, (pixels,) * views)
            estimate = memory.network_bytes(PRESETS[preset], size, head_views)
            ratio = row["added"] / estimate
            ratios.append(ratio)
            print(
                f"| {model} | {views} | {row['width']}x{row['height']} | "
                f"{row['added'] / 2**20:.0f} | {estimate / 2**20:.0f} | {ratio:.2f} |",
                flush=True,
            )
    print(f"ratio measured / estimate: min {min(ratios):.2f}, max {max(ratios):.2f}")
    return 1 if max(ratios) > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
