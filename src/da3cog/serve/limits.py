"""What one request may cost, decided before the expensive step.

Every bound here is checked on what a request's files *claim* (file sizes, zip directories,
image headers, video stream headers) before the bytes are expanded or the pixels decoded, and
the memory estimate (:mod:`da3cog.memory`) before any model runs. A request past a bound
is refused with the bound it hit. docs/replicate.md ("Limits") states these numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from da3cog.io.images import DEFAULT_MAX_PIXELS
from da3cog.serve.inputs import MAX_VIEWS

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class Limits:
    """Resource bounds of one request.

    Attributes:
        max_input_bytes: one input file as the runtime handed it over.
        max_decode_pixels: an image decoded in full (PNG, WebP, HEIC, TIFF, BMP), from its
            header.
        max_jpeg_pixels: a JPEG, from its header; JPEGs above ``max_view_pixels`` are decoded
            at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), so their full size never exists
            in memory. At most Pillow's own limit (:data:`~da3cog.io.images.DEFAULT_MAX_PIXELS`,
            179 MP), which it applies to every image it opens.
        max_view_pixels: each view handed to the model, which is also the size of its
            outputs at ``output_resolution=input``; larger views are downscaled when they are
            read, and the manifest says so.
        max_views: views in one request (zip members, video frames and further images).
        zip_max_entries: entries in a zip's directory (files and folders, images or not).
        zip_max_member_bytes: one zip member, expanded.
        zip_max_total_bytes: a zip's image members together, expanded.
        zip_max_ratio: expanded / compressed size of one member.
        max_video_frame_pixels: a video's frame size, from its stream header.
        video_decode_seconds: wall time to decode and sample a video.
        video_max_decoded_frames: frames decoded from one video (sampled or not).
        predict_seconds: wall time of the prediction of a request run as chunks: once the
            pace of its first chunks projects more, it stops and is refused with the number
            of views that would fit (``$DA3COG_TIME_BUDGET_S`` overrides it, see
            :func:`predict_seconds`).
    """

    max_input_bytes: int = 2 * GIB
    max_decode_pixels: int = 100_000_000
    max_jpeg_pixels: int = DEFAULT_MAX_PIXELS
    max_view_pixels: int = 16_777_216
    max_views: int = MAX_VIEWS
    zip_max_entries: int = 10_000
    zip_max_member_bytes: int = 512 * MIB
    zip_max_total_bytes: int = 2 * GIB
    zip_max_ratio: int = 1_000
    max_video_frame_pixels: int = 7680 * 4320
    video_decode_seconds: float = 120.0
    video_max_decoded_frames: int = 100_000
    predict_seconds: float = 600.0


DEFAULT_LIMITS = Limits()

TIME_BUDGET_ENV = "DA3COG_TIME_BUDGET_S"


def predict_seconds(limits: Limits) -> float:
    """The prediction's time budget: ``$DA3COG_TIME_BUDGET_S`` when set (a deployment with a
    longer or shorter platform timeout), else ``limits.predict_seconds``."""
    override = os.environ.get(TIME_BUDGET_ENV)
    if not override:
        return limits.predict_seconds
    try:
        value = float(override)
    except ValueError:
        raise RuntimeError(f"{TIME_BUDGET_ENV}={override!r} is not a number of seconds") from None
    if not value > 0:
        raise RuntimeError(f"{TIME_BUDGET_ENV} must be > 0 seconds, got {override!r}")
    return value
