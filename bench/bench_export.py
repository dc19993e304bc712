#!/usr/bin/env python
"""Export speed: da3cog's exporters against upstream's ``depth_anything_3.utils.export``.

    python bench/bench_export.py [--views 8] [--size 378 504] [--repeats 3] [--tmp /dev/shm]

Data: the synthetic room of ``tests/test_export_scene.py`` (exact depth, cameras and colours
from ``--views`` known poses) at ``--size`` (height width; default 378 x 504, what a 4:3 photo
becomes at ``process_res=504``). No model runs. Every timing is the median of ``--repeats`` runs,
each writing into a fresh temporary folder, after one warm-up run.

Ours (each includes fusing the point cloud from the depth maps where it needs one):
  glb            ``export_glb`` (points + frustums + glTF cameras)
  ply            ``export_ply``
  depth_png16    ``export_depth_png16`` (16-bit PNG + scale per view)
  depth_vis      ``export_depth_vis`` (colour PNG beside the image per view; (jpg): JPEG q95)
  glb+ply+png16  ``export_all(["glb", "ply", "depth_png16"])`` (one shared fusion + manifest)
  served         what the cog model writes by default: GLB, depth NPY and visualisation PNG per
                 view, cameras JSON (``export_all``)

Upstream (depth-anything-3 0.1.1, from the same arrays in its own ``specs.Prediction``):
  glb            ``export_to_glb(..., export_depth_vis=False)`` (trimesh: points + frustums)
  depth_vis      ``export_to_depth_vis`` (image | colour JPEG per view, matplotlib colormap)
Upstream has no exporter for a plain point-cloud PLY (its ``gs_ply`` writes 3D Gaussians, which
need the Gaussian head) nor for 16-bit depth PNGs, so the set "glb + ply + depth PNGs" has no
upstream twin; the closest, upstream glb + depth_vis, is timed and printed beside ours with that
caveat. Upstream's package ``__init__`` imports its Gaussian-splat video code (moviepy, gsplat);
the bench loads the ``glb`` and ``depth_vis`` modules without that ``__init__``. If they still
cannot be imported (trimesh, matplotlib missing), the reason is printed and only ours are timed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_export_scene import make_prediction  # noqa: E402

from da3cog.export.depth import export_depth_png16, export_depth_vis  # noqa: E402
from da3cog.export.glb import export_glb  # noqa: E402
from da3cog.export.manifest import export_all  # noqa: E402
from da3cog.export.ply import export_ply  # noqa: E402
from da3cog.export.points import fuse_points  # noqa: E402

# The cog model's default: da3cog.serve.outputs.base_formats for an any-view model + "glb".
SERVED_FORMATS = ["depth_npy", "depth_vis", "cameras_json", "glb"]


def timed(
    runs: dict[str, Callable[[Path], object]],
    repeats: int,
    tmp: str | None = None,
    inputs: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds of each ``run(fresh_folder)`` over ``repeats`` rounds after one warm-up
    round; a round runs every exporter once, so ours and upstream's see the same machine load.
    A run named in ``inputs`` is called as ``run(fresh_folder, inputs[name]())``, its input
    made before the clock starts."""
    durations: dict[str, list[float]] = {name: [] for name in runs}
    inputs = inputs or {}
    for attempt in range(repeats + 1):
        for name, run in runs.items():
            scratch = Path(tempfile.mkdtemp(prefix="da3cog-bench-", dir=tmp))
            made = (inputs[name](),) if name in inputs else ()
            try:
                started = time.perf_counter()
                run(scratch / "out", *made)
                elapsed = time.perf_counter() - started
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if attempt:
                durations[name].append(elapsed)
    return {name: statistics.median(values) for name, values in durations.items()}


def load_upstream() -> tuple[types.ModuleType, types.ModuleType, type] | str:
    """Upstream's glb and depth_vis exporter modules and its Prediction, or why not."""
    os.environ.setdefault("DA3_LOG_LEVEL", "WARN")  # upstream logs every export to stdout
    try:
        import depth_anything_3.utils as utils
        from depth_anything_3.specs import Prediction
    except Exception as error:
        return f"depth_anything_3 is not importable: {type(error).__name__}: {error}"
    try:
        importlib.import_module("depth_anything_3.utils.export")
    except Exception as error:
        # Skip the package __init__ (it imports the Gaussian-splat video exporter).
        package = types.ModuleType("depth_anything_3.utils.export")
        package.__path__ = [str(pathlib.Path(utils.__path__[0]) / "export")]
        sys.modules["depth_anything_3.utils.export"] = package
        print(
            f"note: upstream's depth_anything_3.utils.export __init__ fails "
            f"({type(error).__name__}: {error}); loading its glb / depth_vis modules directly"
        )
    try:
        glb = importlib.import_module("depth_anything_3.utils.export.glb")
        depth_vis = importlib.import_module("depth_anything_3.utils.export.depth_vis")
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        return f"upstream's glb / depth_vis exporters cannot be imported: {reason}"
    return glb, depth_vis, Prediction


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(378, 504), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tmp", default=None, help="folder for the output (e.g. /dev/shm: no disk writeback)"
    )
    args = parser.parse_args()

    prediction = make_prediction(views=args.views, size=tuple(args.size))
    pixels = sum(v.depth.size for v in prediction.views)
    points = len(fuse_points(prediction))
    print(
        f"synthetic prediction: {args.views} views of {args.size[0]}x{args.size[1]} "
        f"({pixels / 1e6:.2f} M pixels, {points / 1e6:.2f} M fused points after the default "
        f"40% confidence cut); {platform.processor() or platform.machine()}, "
        f"median of {args.repeats}, output in {args.tmp or tempfile.gettempdir()}"
    )

    ours = {
        "glb": lambda out: export_glb(prediction, out),
        "ply": lambda out: export_ply(prediction, out),
        "depth_png16": lambda out: export_depth_png16(prediction, out),
        "depth_vis": lambda out: export_depth_vis(prediction, out),
        "depth_vis(jpg)": lambda out: export_depth_vis(prediction, out, vis_format="jpg"),
        "glb+ply+png16": lambda out: export_all(prediction, out, ["glb", "ply", "depth_png16"]),
        "served": lambda out: export_all(prediction, out, SERVED_FORMATS),
    }
    upstream = load_upstream()
    theirs: dict[str, float] = {}
    upstream_runs: dict[str, Callable[[Path], object]] = {}
    if isinstance(upstream, str):
        print(f"upstream not timed: {upstream}")
    else:
        glb, depth_vis, UpstreamPrediction = upstream

        def upstream_prediction():
            # A fresh one per run: upstream's exporters may write into the prediction's arrays.
            return UpstreamPrediction(
                depth=np.stack([v.depth for v in prediction.views]).copy(),
                is_metric=0,
                conf=np.stack([v.confidence for v in prediction.views]).copy(),
                extrinsics=np.stack([v.extrinsics for v in prediction.views]).copy(),
                intrinsics=np.stack([v.intrinsics for v in prediction.views]).copy(),
                processed_images=np.stack([v.image for v in prediction.views]).copy(),
            )

        def upstream_glb(out: Path, given: object) -> None:
            glb.export_to_glb(given, str(out), export_depth_vis=False)

        def upstream_depth_vis(out: Path, given: object) -> None:
            depth_vis.export_to_depth_vis(given, str(out))

        def upstream_both(out: Path, given: tuple[object, object]) -> None:
            upstream_glb(out, given[0])
            upstream_depth_vis(out, given[1])

        upstream_runs = {
            "glb": upstream_glb,
            "depth_vis": upstream_depth_vis,
            "glb+depth_vis": upstream_both,
        }

    timings = timed(
        {
            **{f"ours {k}": v for k, v in ours.items()},
            **{f"up {k}": v for k, v in upstream_runs.items()},
        },
        args.repeats,
        args.tmp,
        # Upstream's Prediction is built before its clock starts, as ours is.
        {
            "up glb": upstream_prediction,
            "up depth_vis": upstream_prediction,
            "up glb+depth_vis": lambda: (upstream_prediction(), upstream_prediction()),
        }
        if upstream_runs
        else None,
    )
    results = {name: timings[f"ours {name}"] for name in ours}
    theirs = {name: timings[f"up {name}"] for name in upstream_runs}
    if theirs:
        theirs["depth_vis(jpg)"] = theirs["depth_vis"]

    print(f"\n{'export':<16}{'ours (s)':>10}{'upstream (s)':>14}{'upstream/ours':>15}")
    for name, seconds in results.items():
        other = theirs.get(name)
        ratio = f"{other / seconds:>15.2f}" if other else f"{'-':>15}"
        print(f"{name:<16}{seconds:>10.3f}{(f'{other:.3f}' if other else '-'):>14}{ratio}")
    if theirs:
        combined = theirs["glb+depth_vis"] / results["glb+ply+png16"]
        print(
            f"\nours glb+ply+png16 {results['glb+ply+png16']:.3f} s vs upstream glb+depth_vis "
            f"{theirs['glb+depth_vis']:.3f} s (no upstream PLY / 16-bit PNG exporter): "
            f"upstream/ours = {combined:.2f}"
        )
        print(
            "depth_vis: ours PNG (lossless, zlib level 1) by default, JPEG q95 with "
            "vis_format='jpg'; upstream writes JPEG q95 (the same timing on both rows)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
