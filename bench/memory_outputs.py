#!/usr/bin/env python
"""What a served request's outputs cost in memory per view, against the memory model.

    python bench/memory_outputs.py [--views 4 16] [--side 1200]
                                   [--formats none glb ply npz colmap all]

Many views at their input resolution make the outputs, not the network, the bulk of a
request: the memory model (:func:`da3cog.memory.estimate`) counts ``DECODED_BYTES_PER_PIXEL``
+ ``OUTPUT_BYTES_PER_PIXEL`` for every output pixel of every view, plus a few exporters'
images and the point cloud, which do not grow with the views. This measures that slope: for
each served ``export_format`` a fresh subprocess runs the cog model's handler
(:class:`da3cog.serve.handler.Server`, random-weight small, process_resolution 140 so that the
network is small beside the outputs) on ``N`` views of ``side`` x ``side * 3/4`` pixels,
outputs at the input size, and reads the peak RSS the request added (``VmHWM`` after a reset,
minus the RSS before). The peak's growth between the two view counts, per added output pixel,
is what each view costs; the estimate's own growth over the same views is printed beside it
(meant as an upper bound: measured / estimate <= 1). The last run's table is in
bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from random_checkpoints import ROOT, checkpoint

sys.path.insert(0, str(ROOT / "tests"))
from served_peak import measure_served_request, served_estimate

from da3cog.serve.request import EXPORT_FORMATS_MAP

PROCESS_RES = 140


def measure(folder: Path, views: int, side: int, export: str) -> int:
    """The peak RSS one request added, in a fresh process."""
    with tempfile.TemporaryDirectory() as scratch:
        row = measure_served_request(folder, Path(scratch), views, side, export, PROCESS_RES)
    if not str(row["outcome"]).startswith("ran"):
        raise RuntimeError(f"{export}, {views} views: {row['outcome']}")
    return int(row["added"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--views", type=int, nargs=2, default=[4, 16])
    parser.add_argument("--side", type=int, default=1200)
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=list(EXPORT_FORMATS_MAP),
        default=["none", "glb", "ply", "npz", "colmap", "all"],
    )
    args = parser.parse_args()
    few, many = args.views
    if not 1 <= few < many:
        parser.error("--views takes two counts, the smaller first")
    folder = checkpoint("da3-small")
    pixels = args.side * (args.side * 3 // 4)
    added_pixels = (many - few) * pixels
    print(
        f"small, process_resolution {PROCESS_RES}, views of {args.side}x{args.side * 3 // 4} "
        f"({pixels / 1e6:.2f} MP), outputs at the input size; {few} -> {many} views"
    )
    print(
        f"| export_format | peak added at {few} / {many} views (MiB) | estimate (MiB) "
        "| growth per added output pixel, measured / estimate (bytes) | measured / estimate |"
    )
    print("| --- | --- | --- | --- | --- |")
    for export in args.formats:
        small, large = (measure(folder, n, args.side, export) for n in (few, many))
        low, high = (served_estimate(n, args.side, export, PROCESS_RES).host for n in (few, many))
        slope, model_slope = (large - small) / added_pixels, (high - low) / added_pixels
        print(
            f"| {export} | {small / 2**20:.0f} / {large / 2**20:.0f} | {low / 2**20:.0f} / "
            f"{high / 2**20:.0f} | {slope:.1f} / {model_slope:.1f} | "
            f"{small / low:.2f} / {large / high:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
