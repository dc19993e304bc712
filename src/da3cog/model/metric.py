"""Sky handling and metric scale: the steps DA3's single-view and nested models run after
their heads, with upstream's thresholds, and with every random draw taken from a caller's
generator (upstream draws from torch's global RNG).

Each function works on one scene: tensors ``(S, H, W)`` for its ``S`` views.
"""

from __future__ import annotations

import torch

SKY_THRESHOLD = 0.3
"""Pixels whose sky score is at or above this are sky (upstream's ``compute_sky_mask``)."""

METRIC_FOCAL = 300.0
"""Canonical focal length in pixels: metric depth = canonical depth x focal / 300."""

FAR_DEPTH = 200.0
"""Upper bound, in metres, of the far value nested models give sky pixels."""

MIN_PIXELS = 10
"""Sky filling and metric fitting need more than this many pixels of each kind."""

MAX_QUANTILE_SAMPLES = 100_000
"""Quantiles are taken over at most this many samples (upstream's memory bound)."""

_MIN_DEPTH = 1e-3
_MIN_METRIC_DEPTH = 1e-2
_FAR_QUANTILE = 0.99


def _sample_with_replacement(
    values: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    if values.numel() <= MAX_QUANTILE_SAMPLES:
        return values
    index = torch.randint(
        0,
        values.numel(),
        (MAX_QUANTILE_SAMPLES,),
        generator=generator,
        device=values.device,
    )
    return values[index]


def _sample_without_replacement(
    values: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    if values.numel() <= MAX_QUANTILE_SAMPLES:
        return values
    order = torch.randperm(values.numel(), generator=generator, device=values.device)
    return values.flatten()[order[:MAX_QUANTILE_SAMPLES]]


def _far_value(depth: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.quantile(_sample_with_replacement(depth, generator), _FAR_QUANTILE)


def fill_sky_relative(
    depth: torch.Tensor, sky: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Single-view models: sky pixels get the 99th percentile of the non-sky depth.

    Left unchanged when either kind has at most :data:`MIN_PIXELS` pixels (an all-sky or a
    sky-free image). ``depth`` and ``sky`` (score) are ``(S, H, W)``; returns a new tensor.
    """
    non_sky = sky < SKY_THRESHOLD
    count = int(non_sky.sum())
    if count <= MIN_PIXELS or non_sky.numel() - count <= MIN_PIXELS:
        return depth
    filled = depth.clone()
    filled[~non_sky] = _far_value(depth[non_sky], generator)
    return filled


def canonical_to_metric(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Canonical depth ``(..., S, H, W)`` -> metres, with each view's mean focal length
    ``(fx + fy) / 2`` from ``intrinsics`` ``(..., S, 3, 3)`` in pixels of the processing image
    (the image the network saw: the same scene at another resolution has another focal)."""
    focal = (intrinsics[..., 0, 0] + intrinsics[..., 1, 1]) / 2
    return depth * (focal[..., None, None] / METRIC_FOCAL)


def fit_metric_scale(
    depth: torch.Tensor,
    confidence: torch.Tensor,
    metric_depth: torch.Tensor,
    sky: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """Least-squares scale ``s`` with ``metric_depth ~ s x depth`` over confident non-sky
    pixels (confidence at or above its non-sky median, metric depth > 1 cm, depth > 1e-3).

    All ``(S, H, W)``. Returns a 0-d tensor, or None when there are at most
    :data:`MIN_PIXELS` non-sky pixels or the fit is not positive and finite (upstream asserts
    or returns 0 there).
    """
    non_sky = sky < SKY_THRESHOLD
    if int(non_sky.sum()) <= MIN_PIXELS:
        return None
    samples = _sample_without_replacement(confidence[non_sky], generator)
    median = torch.quantile(samples, 0.5)
    usable = (
        (confidence >= median) & non_sky & (metric_depth > _MIN_METRIC_DEPTH) & (depth > _MIN_DEPTH)
    )
    ours, target = depth[usable], metric_depth[usable]
    scale = torch.dot(target, ours) / torch.dot(ours, ours).clamp_min(1e-12)
    if not bool(usable.any()) or not bool(torch.isfinite(scale)) or float(scale) <= 0:
        return None
    return scale


def fill_sky_far(
    depth: torch.Tensor,
    confidence: torch.Tensor,
    sky: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested models, after metric scaling: sky pixels get the 99th percentile of the non-sky
    depth capped at :data:`FAR_DEPTH` metres, and confidence 1 (the lowest).

    Needs more than :data:`MIN_PIXELS` non-sky pixels (as :func:`fit_metric_scale`). All
    ``(S, H, W)``; returns new tensors.
    """
    non_sky = sky < SKY_THRESHOLD
    if int(non_sky.sum()) <= MIN_PIXELS:
        raise ValueError("filling the sky needs non-sky pixels to take a far value from")
    far = _far_value(depth[non_sky], generator).clamp_max(FAR_DEPTH)
    depth, confidence = depth.clone(), confidence.clone()
    depth[~non_sky] = far
    confidence[~non_sky] = 1.0
    return depth, confidence
