"""The ``da3cog`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from da3cog.io.cameras import UserCameras

DEFAULT_EXPORTS = ("depth_npy", "depth_vis", "cameras_json")
# Added to the default exports by --gaussians.
GAUSSIAN_EXPORT = "gaussians_ply"


def _parser() -> argparse.ArgumentParser:
    from da3cog import __version__
    from da3cog.export.manifest import FORMATS
    from da3cog.io import MIXED_SHAPES, PROCESS_METHODS
    from da3cog.model.presets import ALIASES
    from da3cog.model.reference_view import REFERENCE_STRATEGIES

    parser = argparse.ArgumentParser(
        prog="da3cog", description="Depth Anything 3: depth and cameras from images."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict", help="predict depth and cameras for one or more images"
    )
    predict.add_argument(
        "images",
        nargs="*",
        type=Path,
        help=(
            "image files (JPEG, PNG, WebP, HEIC, TIFF, BMP), one per view; folders (their "
            "images, in name order); videos (MP4, MOV, WebM, MKV, AVI, GIF: frames sampled "
            "by --fps or --stride)"
        ),
    )
    sampling = predict.add_mutually_exclusive_group()
    sampling.add_argument(
        "--fps", type=float, default=None, help="video inputs: frames per second kept (default 2)"
    )
    sampling.add_argument(
        "--stride", type=int, default=None, help="video inputs: keep every N-th frame instead"
    )
    predict.add_argument(
        "--max-frames",
        type=int,
        default=1000,
        help="video inputs: at most this many frames from each video (default 1000)",
    )
    predict.add_argument(
        "--sample",
        action="store_true",
        help="add the two sample photos shipped with da3cog (a rocket, a coffee cup) as views",
    )
    predict.add_argument(
        "--model",
        default="small",
        help=(
            f"preset ({', '.join(ALIASES)}; its newest release, or an older one as giant@1.0), "
            "Hub id or checkpoint folder (default: small)"
        ),
    )
    predict.add_argument(
        "--out", type=Path, required=True, help="output folder (must not exist or be empty)"
    )
    predict.add_argument(
        "--process-res", type=int, default=504, help="network input size (default 504)"
    )
    predict.add_argument("--resize-method", choices=PROCESS_METHODS, default="upper_bound_resize")
    predict.add_argument(
        "--reference-view", choices=REFERENCE_STRATEGIES, default="saddle_balanced"
    )
    predict.add_argument(
        "--mixed-shapes",
        choices=MIXED_SHAPES,
        default="resize",
        help=(
            "photos of different shapes: resize the odd ones whole to the most common shape "
            "(default: nothing is cut off) or centre-crop all to the smallest (upstream's way)"
        ),
    )
    predict.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default="auto",
        metavar="N|auto|none",
        help=(
            "run more views than N as overlapping chunks aligned into one world (memory stays "
            "that of one chunk); auto (default): one pass if the memory model says it fits, "
            "else the largest chunk that does; none: always one pass"
        ),
    )
    predict.add_argument(
        "--chunk-overlap",
        type=int,
        default=None,
        help="views each chunk shares with the previous one (default: half the chunk)",
    )
    predict.add_argument(
        "--ray-pose",
        action="store_true",
        help="cameras from the ray map instead of the camera head",
    )
    predict.add_argument(
        "--output-resolution",
        choices=("input", "processing"),
        default="input",
        help="depth maps at each input's size (default) or at the processing size",
    )
    cameras = predict.add_mutually_exclusive_group()
    cameras.add_argument(
        "--cameras",
        type=Path,
        help=(
            "JSON with 'extrinsics' (N x 3|4 x 4 world-to-camera, OpenCV axes) and 'intrinsics' "
            "(N x 3 x 3, or one 3 x 3 for all views, pixels of the input images) for "
            "pose-conditioned depth (any-view models), or 'intrinsics' alone for the metric "
            "model; a cameras.json written by da3cog works too"
        ),
    )
    cameras.add_argument(
        "--intrinsics",
        type=Path,
        help=(
            "like --cameras, with 'intrinsics' only (N x 3 x 3, or one 3 x 3 for all views): "
            "the focal lengths that make the single-view metric model's depth metric"
        ),
    )
    predict.add_argument(
        "--gaussians",
        action="store_true",
        help=(
            "also predict 3D Gaussians (models with a Gaussian head: giant, nested) and, by "
            f"default, export them as a 3DGS PLY ({GAUSSIAN_EXPORT})"
        ),
    )
    predict.add_argument(
        "--export",
        nargs="+",
        choices=(*FORMATS, "all"),
        default=None,
        metavar="FORMAT",
        help=(
            f"files to write: {', '.join(FORMATS)} or all (default: "
            f"{' '.join(DEFAULT_EXPORTS)}, plus {GAUSSIAN_EXPORT} with --gaussians)"
        ),
    )
    predict.add_argument(
        "--video-frames",
        type=int,
        default=None,
        help="frames of the gaussians_video fly-through (default 120; fewer renders faster)",
    )
    predict.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seed for every random step: pose RANSAC, sampling, point subsampling (default 42)",
    )
    predict.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    predict.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Hub download cache (default: $DA3COG_CACHE_DIR or the HF cache)",
    )
    return parser


def _chunk_size(text: str) -> int | str | None:
    """``--chunk-size``: a number of views, ``auto`` or ``none``."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, auto or none, got {text!r}") from None


def _read_user_cameras(args: argparse.Namespace) -> UserCameras | None:
    """The cameras of ``--cameras`` or ``--intrinsics``, one per input image, or None.
    Raises ValueError (:class:`CameraFileError`) before any model is loaded."""
    from da3cog.io.cameras import read_camera_file

    path = args.cameras or args.intrinsics
    if path is None:
        return None
    cameras = read_camera_file(path, len(args.images), label=str(path))
    if args.intrinsics is not None and cameras.extrinsics is not None:
        # Poses given here would be silently unused: say where they belong.
        raise ValueError(
            f"{path} has 'extrinsics' too: pass it with --cameras for pose-conditioned depth"
        )
    return cameras


def _exports(args: argparse.Namespace) -> list[str]:
    """The formats to write: ``--export``, else the defaults (plus the 3DGS PLY with
    ``--gaussians``). ValueError when the 3DGS PLY is asked for without ``--gaussians``, before
    any model is loaded."""
    if args.export is None:
        exports = [*DEFAULT_EXPORTS, *([GAUSSIAN_EXPORT] if args.gaussians else [])]
    else:
        for name in (GAUSSIAN_EXPORT, "gaussians_video"):
            if name in args.export and not args.gaussians:
                raise ValueError(f"--export {name} needs --gaussians (to predict them)")
        exports = list(args.export)
    if args.video_frames is not None and "gaussians_video" not in exports:
        raise ValueError("--video-frames applies to --export gaussians_video only")
    if args.video_frames is not None and args.video_frames < 1:
        raise ValueError(f"--video-frames must be at least 1, got {args.video_frames}")
    return exports


def _fresh_output(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder: choose a new folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"output folder {folder} exists and is not empty: choose a new one")


def _expand_inputs(args: argparse.Namespace, frames_folder: Path) -> list[Path]:
    """The views the inputs name, in order: a folder gives its image files (by content, in
    name order), a video its sampled frames (written as PNGs into ``frames_folder``),
    anything else stays as given (and is checked as an image next)."""
    from PIL import Image

    from da3cog.io.images import HEADER_BYTES, sniff_image_format
    from da3cog.io.video import sample_frames, sniff_video_format

    def head(path: Path) -> bytes:
        with path.open("rb") as stream:
            return stream.read(HEADER_BYTES)

    if args.max_frames < 1:
        raise ValueError(f"--max-frames must be at least 1, got {args.max_frames}")
    views: list[Path] = []
    for number, path in enumerate(args.images):
        if path.is_dir():
            members = sorted(p for p in path.iterdir() if p.is_file())
            images = [p for p in members if sniff_image_format(head(p)) is not None]
            if not images:
                raise ValueError(f"{path}: a folder with no image files")
            views.extend(images)
        elif path.is_file() and sniff_video_format(head(path)) is not None:
            sampling = {"stride": args.stride} if args.stride else {"fps": args.fps or 2.0}
            folder = frames_folder / f"{number:03d}"
            folder.mkdir(parents=True)
            count = 0
            for count, frame in enumerate(
                sample_frames(path, str(path), max_frames=args.max_frames, **sampling), start=1
            ):
                target = folder / f"{path.stem}_frame_{count - 1:04d}.png"
                Image.fromarray(frame.picture).save(target, compress_level=1)
                views.append(target)
            print(f"[da3cog] {path}: {count} frame(s) sampled", file=sys.stderr)
        else:
            views.append(path)
    return views


def _check_images(paths: list[Path]) -> None:
    """Every input is an existing image file in an accepted format with a readable header,
    checked before any model is loaded (or downloaded). ValueError naming the file."""
    from da3cog.io.images import read_image_header

    for path in paths:
        if not path.exists():
            raise ValueError(f"{path}: no such file")
        if not path.is_file():
            raise ValueError(f"{path}: not a file")
        read_image_header(path, str(path))


def predict(args: argparse.Namespace) -> list[Path]:
    if args.sample:
        from da3cog.samples import sample_paths

        args.images = [*args.images, *sample_paths()]
    if not args.images:
        raise ValueError("no images: name image files, or pass --sample for the bundled photos")
    _fresh_output(args.out)
    with tempfile.TemporaryDirectory(prefix="da3cog-frames-") as frames_folder:
        args.images = _expand_inputs(args, Path(frames_folder))
        return _predict_views(args)


def _predict_views(args: argparse.Namespace) -> list[Path]:
    from da3cog.export.manifest import export_all
    from da3cog.pipeline import DepthAnything3, InferenceOptions

    _check_images(args.images)
    exports = _exports(args)
    options = InferenceOptions(
        process_res=args.process_res,
        resize_method=args.resize_method,
        reference_strategy=args.reference_view,
        pose_from_rays=args.ray_pose,
        output_resolution=args.output_resolution,
        seed=args.seed,
        infer_gaussians=args.gaussians,
        mixed_shapes=args.mixed_shapes,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
    )
    cameras = _read_user_cameras(args)
    model = DepthAnything3.from_pretrained(args.model, device=args.device, cache_dir=args.cache_dir)
    prediction = model.predict(
        [str(p) for p in args.images],
        extrinsics=None if cameras is None else cameras.extrinsics,
        intrinsics=None if cameras is None else cameras.intrinsics,
        options=options,
        progress=lambda message: print(f"[da3cog] {message}", file=sys.stderr),
    )
    print(f"[da3cog] writing {', '.join(exports)}", file=sys.stderr)
    # The point-cloud subsample is the only seeded export step.
    seeded = {"ply", "glb", "colmap", "colmap_text", "colmap_binary", "all"}
    export_options: dict[str, int] = {"seed": args.seed} if seeded & set(exports) else {}
    if args.video_frames is not None:
        export_options["video_frames"] = args.video_frames
    manifest = export_all(prediction, args.out, exports, **export_options)
    for note in prediction.notes:
        print(f"[da3cog] note: {note}", file=sys.stderr)
    return manifest.paths


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[da3cog] %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    from da3cog.weights import CheckpointError

    try:
        written = predict(args)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"da3cog: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
