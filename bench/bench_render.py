#!/usr/bin/env python
"""The torch Gaussian renderer's speed: seconds per frame and peak RSS.

    python bench/bench_render.py [--gaussians 50000 340000] [--size 256x256 504x336] [--frames 3]

``da3cog.export.splat_render.torch_rasterizer`` (what the ``gaussians_video`` export uses
without gsplat's CUDA kernels) renders ``--frames`` frames of seeded random Gaussians spread in
front of the camera (centres 2-6 units away over the field of view, scales 0.5-3% of the
distance, degree-2 harmonics) for every count and size, after one warm-up frame; it prints the
median seconds a frame, the minutes a 120-frame fly-through would take at that pace, and the
peak RSS the rendering added. Random Gaussians, not a scene: the time depends on how many
cover each tile, so a real scene's can differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from peak_memory import peak_added, reset_peak

from da3cog.export.splat_render import torch_rasterizer


def random_gaussians(count: int, width: int, height: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    depth = uniform(count, low=2.0, high=6.0)
    focal = 0.8 * max(width, height)
    x = (uniform(count) - 0.5) * width / focal * depth
    y = (uniform(count) - 0.5) * height / focal * depth
    quats = torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1)
    return {
        "means": torch.stack([x, y, depth], dim=-1),
        "quats": quats,
        "scales": depth[:, None] * uniform(count, 3, low=0.005, high=0.03),
        "opacities": uniform(count, low=0.3, high=1.0),
        "harmonics": 0.3 * torch.randn(count, 3, 9, generator=generator),
        "viewmats": torch.eye(4)[None],
        "Ks": torch.tensor([[[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]]]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", type=int, nargs="+", default=[50_000, 340_000])
    parser.add_argument("--size", nargs="+", default=["256x256", "504x336"])
    parser.add_argument("--frames", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| Gaussians | frame | seconds a frame | 120 frames (min) | peak RSS added (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for count in args.gaussians:
        for size in args.size:
            width, height = (int(side) for side in size.split("x"))
            scene = random_gaussians(count, width, height)
            with torch.no_grad():
                torch_rasterizer(**scene, width=width, height=height)  # warm-up
                before = reset_peak()
                seconds = []
                for _ in range(args.frames):
                    started = time.perf_counter()
                    torch_rasterizer(**scene, width=width, height=height)
                    seconds.append(time.perf_counter() - started)
                added = peak_added(before)
            median = statistics.median(seconds)
            print(
                f"| {count} | {width}x{height} | {median:.2f} | {120 * median / 60:.1f} | "
                f"{added / 2**20:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
