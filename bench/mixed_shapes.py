#!/usr/bin/env python
"""Accuracy of the two ways to batch photos of different shapes, on a real scene with ground
truth: ``mixed_shapes="resize"`` (default: the odd view resized whole, pixels no longer
square) against ``"crop"`` (upstream: every view centre-cropped to the smallest).

    python bench/mixed_shapes.py --model small          # or a checkpoint folder, large, giant...

Scene: scikit-image's Middlebury 2014 motorcycle pair (``skimage.data.stereo_motorcycle``) with
its ground-truth disparity for the left view, turned into depth with the calibration
scikit-image documents (f = 994.978 px, baseline 193.001 mm, doffs = 31.086 px). The right view
is centre-cropped to a 300x500 portrait, so the two views have different shapes; in ``crop``
the left view (741x500) is always cut to the portrait's narrower width. Two orders:

* left first: the left view sets the batch's shape in ``resize`` and is untouched;
* portrait first: in ``resize`` the left view is the one squeezed to the portrait's shape.

Each run scores the left view's depth (at input resolution) against the ground truth on the
pixels both modes cover and the ground truth has, after a median scale fit (depth is relative):
AbsRel (lower is better) and delta < 1.25 (higher is better).

This needs the real weights to mean anything: with random-weight checkpoints (the only ones
where this project is developed) the numbers are noise. Not run here yet.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

FOCAL_PX = 994.978
BASELINE_MM = 193.001
DOFFS_PX = 31.086
PORTRAIT_WIDTH = 300


def ground_truth() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left image, portrait crop of the right image, left ground-truth depth (mm; 0 where
    unknown)."""
    import skimage.data

    left, right, disparity = skimage.data.stereo_motorcycle()
    depth = FOCAL_PX * BASELINE_MM / (disparity.astype(np.float64) + DOFFS_PX)
    width = right.shape[1]
    start = (width - PORTRAIT_WIDTH) // 2
    return left, np.ascontiguousarray(right[:, start : start + PORTRAIT_WIDTH]), depth


def score(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    ratio = np.median(truth[mask] / predicted[mask])
    scaled = predicted[mask] * ratio
    abs_rel = float(np.mean(np.abs(scaled - truth[mask]) / truth[mask]))
    delta = float(np.mean(np.maximum(scaled / truth[mask], truth[mask] / scaled) < 1.25))
    return abs_rel, delta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small", help="preset, Hub id or checkpoint folder")
    parser.add_argument("--process-res", type=int, default=504)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    from da3cog import DepthAnything3, InferenceOptions

    model = DepthAnything3.from_pretrained(args.model, device=args.device)
    left, portrait, truth = ground_truth()
    print(f"model: {model.loaded.model_id}, process_res {args.process_res}")
    print("| order | mixed_shapes | left view covered | AbsRel | delta < 1.25 |")
    print("| --- | --- | --- | --- | --- |")
    for order in ("left first", "portrait first"):
        index = 0 if order == "left first" else 1
        images = [left, portrait] if index == 0 else [portrait, left]
        runs = {}
        for mode in ("resize", "crop"):
            options = InferenceOptions(process_res=args.process_res, mixed_shapes=mode)
            view = model.predict(images, options=options).views[index]
            full = np.full(truth.shape, np.nan)
            # Whole input pixels inside the crop box, as the pipeline snaps it.
            x0, y0 = (math.ceil(value - 1e-6) for value in view.crop_box[:2])
            height, width = view.depth.shape
            full[y0 : y0 + height, x0 : x0 + width] = view.depth
            runs[mode] = (full, (x0, y0, x0 + width, y0 + height))
        with np.errstate(invalid="ignore"):
            known = np.isfinite(truth) & (truth > 0)  # unknown disparity: inf, depth 0
            mask = known & (runs["resize"][0] > 0) & (runs["crop"][0] > 0)
        for mode, (depth, box) in runs.items():
            abs_rel, delta = score(depth, truth, mask)
            print(
                f"| {order} | {mode} | x {box[0]}..{box[2]}, y {box[1]}..{box[3]} | "
                f"{abs_rel:.4f} | {delta:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
