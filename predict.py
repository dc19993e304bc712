"""The Replicate model: Depth Anything 3 behind cog's ``BaseRunner``.

The signature below spells out :data:`da3cog.serve.inputs.INPUTS` literally, because
``cog build`` reads it statically (literals and this module's constants only);
tests/test_cog_schema.py keeps both in step. All work happens in :mod:`da3cog.serve`.
"""

from __future__ import annotations

import sys
from pathlib import Path as _FilePath

from cog import BaseRunner, Input, Path

# The container runs this file from the project folder without installing the package.
sys.path.insert(0, str(_FilePath(__file__).resolve().parent / "src"))

from da3cog.serve.handler import Server
from da3cog.serve.request import RequestValues

MODES = ["monocular", "multi-view", "gaussian-splat"]
MODEL_SIZES = ["giant", "large", "base", "small"]
CHECKPOINT_VERSIONS = ["latest", "1.1", "1.0"]
EXPORT_FORMATS = ["glb", "ply", "npz", "colmap", "all", "none"]
OUTPUT_RESOLUTIONS = ["input", "processing"]

IMAGE_HELP = (
    "One image (JPEG, PNG, WebP, HEIC), a zip of images (each image one view, in file-name "
    "order) or a video (MP4, MOV, WebM...; frames sampled at video_fps, at most max_frames)."
)
IMAGES_HELP = "Further views (image files), appended after the views of `image` in this order."
MODE_HELP = (
    "monocular: every view on its own (own camera frame); multi-view: all views together "
    "(shared world frame, estimated cameras); gaussian-splat: multi-view plus 3D Gaussians "
    "(3DGS PLY), needs a model with a Gaussian head (model_size=giant)."
)
MODEL_SIZE_HELP = (
    "Depth Anything 3 model: giant (DA3-GIANT-1.1, 1.36B, Gaussian head, CC BY-NC 4.0), "
    "large (DA3-LARGE-1.1, 411M, CC BY-NC 4.0), base (DA3-BASE, 135M, Apache-2.0), small "
    "(DA3-SMALL, 34M, Apache-2.0)."
)
CHECKPOINT_VERSION_HELP = (
    "Release of the checkpoint: latest (default: 1.1 for giant, large and the nested "
    "metric giant, 1.0 for the others), or 1.0 to reproduce results of the first, "
    "deprecated giant / large / nested release. 1.1 exists for giant, large and nested "
    "only."
)
METRIC_HELP = (
    "Depth in metres: model_size=giant uses DA3NESTED-GIANT-LARGE-1.1 (any mode; CC BY-NC "
    "4.0); model_size=large with mode=monocular uses DA3METRIC-LARGE (Apache-2.0), which "
    "needs focal lengths from `cameras` or EXIF. Other combinations are rejected."
)
EXPORT_FORMAT_HELP = (
    "Extra files: glb (points + cameras scene), ply (point cloud), npz (all arrays), "
    "colmap (zip of a COLMAP sparse model + images), all (every format the prediction "
    "allows) or none. Depth maps (.npy + visualisation) and manifest.json are always "
    "returned, cameras.json whenever the views have cameras; gaussian-splat also returns "
    "gaussians.ply."
)
CAMERAS_HELP = (
    'JSON with "intrinsics" (N x 3 x 3 pixels of the input images, or one 3 x 3 for all '
    'views) and/or "extrinsics" (N x 3|4 x 4 world-to-camera, OpenCV axes) for '
    "pose-conditioned depth; da3cog's own cameras.json is accepted too. N = number of "
    "views. Any-view models need both; intrinsics alone set the metric model's focal length."
)
PROCESS_RESOLUTION_HELP = (
    "Longest side of the network input in pixels (rounded to a multiple of 14). Higher is "
    "sharper but slower and uses more GPU memory."
)
OUTPUT_RESOLUTION_HELP = (
    "Resolution of depth maps and cameras: input (each view at its input size) or "
    "processing (the network's resolution)."
)
CONFIDENCE_PERCENTILE_HELP = (
    "Point clouds (glb, ply, colmap) drop the pixels below this percentile of confidence."
)
MAX_POINTS_HELP = "Point clouds keep at most this many points (a seeded uniform subsample)."
RENDER_VIDEO_HELP = (
    "Also return an MP4: gaussian-splat renders a fly-through of the Gaussians along the "
    "cameras (needs a CUDA GPU); other modes show the depth visualisations, one frame per "
    "view at video_fps."
)
VIDEO_FPS_HELP = (
    "Video input: frames sampled per second of video. Also the frame rate of the depth video."
)
MAX_FRAMES_HELP = "Video input: at most this many sampled frames (views)."
LOOP_CLOSURE_HELP = (
    "Views run in chunks (long videos, many photos): find the places the camera comes back "
    "to and close those loops, against drift (one more chunk per look-alike pair checked, "
    "within the time limit)."
)
SEED_HELP = (
    "Seed for every random step (pose RANSAC, sky and metric sampling, point subsampling): "
    "the same request gives the same result."
)


class Runner(BaseRunner):
    """Depth, cameras, point clouds and 3D Gaussians from one or many images or a video."""

    def setup(self) -> None:
        """Load the default model (giant, or $DA3COG_SETUP_MODEL) and warm it up; weights
        come from $DA3COG_WEIGHTS_DIR/<preset>/ when present, else the Hugging Face Hub."""
        self.server = Server()
        self.server.setup()

    def run(
        self,
        image: Path = Input(description=IMAGE_HELP, accept="image/*,video/*,.zip,.heic,.heif"),
        images: list[Path] | None = Input(
            default=None, description=IMAGES_HELP, accept="image/*,.heic,.heif"
        ),
        mode: str = Input(default="multi-view", choices=MODES, description=MODE_HELP),
        model_size: str = Input(default="giant", choices=MODEL_SIZES, description=MODEL_SIZE_HELP),
        checkpoint_version: str = Input(
            default="latest", choices=CHECKPOINT_VERSIONS, description=CHECKPOINT_VERSION_HELP
        ),
        metric: bool = Input(default=False, description=METRIC_HELP),
        export_format: str = Input(
            default="glb", choices=EXPORT_FORMATS, description=EXPORT_FORMAT_HELP
        ),
        cameras: Path | None = Input(
            default=None, description=CAMERAS_HELP, accept=".json,application/json"
        ),
        process_resolution: int = Input(
            default=504, ge=140, le=1008, description=PROCESS_RESOLUTION_HELP
        ),
        output_resolution: str = Input(
            default="input", choices=OUTPUT_RESOLUTIONS, description=OUTPUT_RESOLUTION_HELP
        ),
        confidence_percentile: float = Input(
            default=40.0, ge=0.0, le=99.0, description=CONFIDENCE_PERCENTILE_HELP
        ),
        max_points: int = Input(
            default=1_000_000, ge=1_000, le=10_000_000, description=MAX_POINTS_HELP
        ),
        render_video: bool = Input(default=False, description=RENDER_VIDEO_HELP),
        video_fps: float = Input(default=2.0, ge=0.1, le=30.0, description=VIDEO_FPS_HELP),
        max_frames: int = Input(default=32, ge=1, le=1000, description=MAX_FRAMES_HELP),
        loop_closure: bool = Input(default=False, description=LOOP_CLOSURE_HELP),
        seed: int = Input(default=42, ge=0, le=2147483647, description=SEED_HELP),
    ) -> list[Path]:
        """Run one request; manifest.json names every returned file and its role."""
        values = RequestValues(
            image=image,
            images=tuple(images or ()),
            mode=mode,
            model_size=model_size,
            checkpoint_version=checkpoint_version,
            metric=metric,
            export_format=export_format,
            cameras=cameras,
            process_resolution=process_resolution,
            output_resolution=output_resolution,
            confidence_percentile=confidence_percentile,
            max_points=max_points,
            render_video=render_video,
            video_fps=video_fps,
            max_frames=max_frames,
            loop_closure=loop_closure,
            seed=seed,
        )
        return [Path(path) for path in self.server.handle(values)]
