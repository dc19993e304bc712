"""The model's inputs, once: names, types, defaults, choices, bounds and descriptions.

``predict.py`` repeats these values literally in its ``run()`` signature, because ``cog build``
reads that signature statically (it resolves literals and module-level constants of
``predict.py`` only, not imports); ``tests/test_cog_schema.py`` checks that both agree and that
the generated OpenAPI schema carries them. The request validation
(:func:`da3cog.serve.request.check_values`) enforces the same bounds for callers that do not
go through the cog server's own validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODES: tuple[str, ...] = ("monocular", "multi-view", "gaussian-splat")
MODEL_SIZES: tuple[str, ...] = ("giant", "large", "base", "small")
CHECKPOINT_VERSIONS: tuple[str, ...] = ("latest", "1.1", "1.0")
EXPORT_FORMATS: tuple[str, ...] = ("glb", "ply", "npz", "colmap", "all", "none")
OUTPUT_RESOLUTIONS: tuple[str, ...] = ("input", "processing")

PROCESS_RESOLUTION_RANGE = (140, 1008)
CONFIDENCE_PERCENTILE_RANGE = (0.0, 99.0)
MAX_POINTS_RANGE = (1_000, 10_000_000)
VIDEO_FPS_RANGE = (0.1, 30.0)
MAX_FRAMES_RANGE = (1, 1000)
SEED_RANGE = (0, 2**31 - 1)

MAX_VIEWS = 1000
"""Views in one request, whatever their source (zip, video frames, further images). Whether
they can run is decided by the memory estimate (one pass, or aligned chunks) and the time
budget (:attr:`da3cog.serve.limits.Limits.predict_seconds`); this bound keeps the listing,
decoding and bookkeeping of one request finite."""

IMAGE_ACCEPT = "image/*,video/*,.zip,.heic,.heif"
IMAGES_ACCEPT = "image/*,.heic,.heif"
CAMERAS_ACCEPT = ".json,application/json"


class Required:
    """Marker: the input has no default."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = Required()


@dataclass(frozen=True)
class InputSpec:
    """One input of ``Runner.run``.

    Attributes:
        name: parameter name.
        annotation: the parameter's type as written in ``predict.py``.
        description: what users see in the schema and on Replicate.
        default: the default, or :data:`REQUIRED`.
        choices: allowed values (strings), or None.
        ge: inclusive lower bound, or None.
        le: inclusive upper bound, or None.
        accept: allowed file types for file inputs (HTML ``accept`` syntax), or None.
    """

    name: str
    annotation: str
    description: str
    default: Any = REQUIRED
    choices: tuple[str, ...] | None = None
    ge: int | float | None = None
    le: int | float | None = None
    accept: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


INPUTS: tuple[InputSpec, ...] = (
    InputSpec(
        "image",
        "Path",
        "One image (JPEG, PNG, WebP, HEIC), a zip of images (each image one view, in file-name "
        "order) or a video (MP4, MOV, WebM...; frames sampled at video_fps, at most max_frames).",
        accept=IMAGE_ACCEPT,
    ),
    InputSpec(
        "images",
        "list[Path] | None",
        "Further views (image files), appended after the views of `image` in this order.",
        default=None,
        accept=IMAGES_ACCEPT,
    ),
    InputSpec(
        "mode",
        "str",
        "monocular: every view on its own (own camera frame); multi-view: all views together "
        "(shared world frame, estimated cameras); gaussian-splat: multi-view plus 3D Gaussians "
        "(3DGS PLY), needs a model with a Gaussian head (model_size=giant).",
        default="multi-view",
        choices=MODES,
    ),
    InputSpec(
        "model_size",
        "str",
        "Depth Anything 3 model: giant (DA3-GIANT-1.1, 1.36B, Gaussian head, CC BY-NC 4.0), "
        "large (DA3-LARGE-1.1, 411M, CC BY-NC 4.0), base (DA3-BASE, 135M, Apache-2.0), small "
        "(DA3-SMALL, 34M, Apache-2.0).",
        default="giant",
        choices=MODEL_SIZES,
    ),
    InputSpec(
        "checkpoint_version",
        "str",
        "Release of the checkpoint: latest (default: 1.1 for giant, large and the nested "
        "metric giant, 1.0 for the others), or 1.0 to reproduce results of the first, "
        "deprecated giant / large / nested release. 1.1 exists for giant, large and nested "
        "only.",
        default="latest",
        choices=CHECKPOINT_VERSIONS,
    ),
    InputSpec(
        "metric",
        "bool",
        "Depth in metres: model_size=giant uses DA3NESTED-GIANT-LARGE-1.1 (any mode; CC BY-NC "
        "4.0); model_size=large with mode=monocular uses DA3METRIC-LARGE (Apache-2.0), which "
        "needs focal lengths from `cameras` or EXIF. Other combinations are rejected.",
        default=False,
    ),
    InputSpec(
        "export_format",
        "str",
        "Extra files: glb (points + cameras scene), ply (point cloud), npz (all arrays), "
        "colmap (zip of a COLMAP sparse model + images), all (every format the prediction "
        "allows) or none. Depth maps (.npy + visualisation) and manifest.json are always "
        "returned, cameras.json whenever the views have cameras; gaussian-splat also returns "
        "gaussians.ply.",
        default="glb",
        choices=EXPORT_FORMATS,
    ),
    InputSpec(
        "cameras",
        "Path | None",
        'JSON with "intrinsics" (N x 3 x 3 pixels of the input images, or one 3 x 3 for all '
        'views) and/or "extrinsics" (N x 3|4 x 4 world-to-camera, OpenCV axes) for '
        "pose-conditioned depth; da3cog's own cameras.json is accepted too. N = number of "
        "views. Any-view models need both; intrinsics alone set the metric model's focal length.",
        default=None,
        accept=CAMERAS_ACCEPT,
    ),
    InputSpec(
        "process_resolution",
        "int",
        "Longest side of the network input in pixels (rounded to a multiple of 14). Higher is "
        "sharper but slower and uses more GPU memory.",
        default=504,
        ge=PROCESS_RESOLUTION_RANGE[0],
        le=PROCESS_RESOLUTION_RANGE[1],
    ),
    InputSpec(
        "output_resolution",
        "str",
        "Resolution of depth maps and cameras: input (each view at its input size) or "
        "processing (the network's resolution).",
        default="input",
        choices=OUTPUT_RESOLUTIONS,
    ),
    InputSpec(
        "confidence_percentile",
        "float",
        "Point clouds (glb, ply, colmap) drop the pixels below this percentile of confidence.",
        default=40.0,
        ge=CONFIDENCE_PERCENTILE_RANGE[0],
        le=CONFIDENCE_PERCENTILE_RANGE[1],
    ),
    InputSpec(
        "max_points",
        "int",
        "Point clouds keep at most this many points (a seeded uniform subsample).",
        default=1_000_000,
        ge=MAX_POINTS_RANGE[0],
        le=MAX_POINTS_RANGE[1],
    ),
    InputSpec(
        "render_video",
        "bool",
        "Also return an MP4: gaussian-splat renders a fly-through of the Gaussians along the "
        "cameras (needs a CUDA GPU); other modes show the depth visualisations, one frame per "
        "view at video_fps.",
        default=False,
    ),
    InputSpec(
        "video_fps",
        "float",
        "Video input: frames sampled per second of video. Also the frame rate of the depth video.",
        default=2.0,
        ge=VIDEO_FPS_RANGE[0],
        le=VIDEO_FPS_RANGE[1],
    ),
    InputSpec(
        "max_frames",
        "int",
        "Video input: at most this many sampled frames (views).",
        default=32,
        ge=MAX_FRAMES_RANGE[0],
        le=MAX_FRAMES_RANGE[1],
    ),
    InputSpec(
        "loop_closure",
        "bool",
        "Views run in chunks (long videos, many photos): find the places the camera comes back "
        "to and close those loops, against drift (one more chunk per look-alike pair checked, "
        "within the time limit).",
        default=False,
    ),
    InputSpec(
        "seed",
        "int",
        "Seed for every random step (pose RANSAC, sky and metric sampling, point subsampling): "
        "the same request gives the same result.",
        default=42,
        ge=SEED_RANGE[0],
        le=SEED_RANGE[1],
    ),
)

INPUTS_BY_NAME: dict[str, InputSpec] = {spec.name: spec for spec in INPUTS}
