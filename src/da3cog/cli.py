"""The ``da3cog`` command."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from da3cog.batch import BatchProgress, SceneResult
    from da3cog.io.cameras import UserCameras
    from da3cog.io.inputs import FrameSampling
    from da3cog.pipeline import InferenceOptions

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
            "image files (JPEG, PNG, WebP, HEIC/HEIF, TIFF, BMP), one per view; folders (their "
            "images, in name order); videos (MP4, MOV, WebM, MKV, AVI, MPEG-PS, GIF: frames "
            "sampled by --fps or --stride)"
        ),
    )
    _add_sampling(predict)
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
        "--loop-closure",
        action="store_true",
        help=(
            "in a chunked run, find the places the sequence comes back to and close those "
            "loops (one more chunk per look-alike pair checked)"
        ),
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
    _add_precision(predict)
    predict.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Hub download cache (default: $DA3COG_CACHE_DIR or the HF cache)",
    )
    batch = commands.add_parser(
        "batch",
        help="predict every scene of a manifest, each into its own folder, with an index",
        description=(
            "Scenes from a .jsonl, .csv or .parquet manifest (see da3cog.batch.manifest), in "
            "this process with one model, or on a Ray cluster with --ray; paths or fsspec URIs "
            "(s3://, gs://... with their filesystem package installed). A rerun skips the "
            "scenes already done."
        ),
    )
    batch.add_argument("manifest", help="the scenes (.jsonl, .csv or .parquet; path or URI)")
    batch.add_argument(
        "--out", required=True, help="output folder or URI (one folder per scene, an index)"
    )
    batch.add_argument(
        "--model", default="small", help="preset (optionally @version), Hub id or folder"
    )
    batch.add_argument("--process-res", type=int, default=504)
    batch.add_argument(
        "--export",
        nargs="+",
        choices=(*FORMATS, "all"),
        default=list(DEFAULT_EXPORTS),
        metavar="FORMAT",
        help=f"files per scene (default: {' '.join(DEFAULT_EXPORTS)})",
    )
    batch.add_argument("--chunk-size", type=_chunk_size, default="auto", metavar="N|auto|none")
    batch.add_argument("--chunk-overlap", type=int, default=None)
    batch.add_argument("--loop-closure", action="store_true")
    batch.add_argument(
        "--gaussians",
        action="store_true",
        help="also predict 3D Gaussians (giant, nested), for the gaussians_* export formats",
    )
    _add_sampling(batch)
    batch.add_argument("--seed", type=int, default=42)
    batch.add_argument("--device", default=None)
    _add_precision(batch)
    batch.add_argument("--cache-dir", default=None)
    batch.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=(
            "run on Ray Data (pip install 'da3cog[batch]'): no ADDRESS starts a local cluster, "
            "'auto' joins the one `ray start` runs here, ray://HOST:10001 a remote one"
        ),
    )
    batch.add_argument(
        "--actors",
        type=_actor_range,
        default=None,
        metavar="N|MIN-MAX",
        help="with --ray: actor pool size (default: one per GPU, or 1 on a CPU cluster)",
    )
    batch.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="with --ray: GPUs each actor reserves (default: 1 if the cluster has GPUs, else 0)",
    )
    batch.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="with --ray: CPUs each actor reserves"
    )
    return parser


def _add_precision(parser: argparse.ArgumentParser) -> None:
    from da3cog.pipeline import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help=(
            "dtype of the backbone (heads stay float32): auto = bf16 on GPUs that support it, "
            "else fp32, the official code's exact arithmetic; bf16 on a CPU with AVX-512 BF16 "
            "is faster at a cost in fidelity (docs/library.md)"
        ),
    )


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument(
        "--fps", type=float, default=None, help="video inputs: frames per second kept (default 2)"
    )
    sampling.add_argument(
        "--stride", type=int, default=None, help="video inputs: keep every N-th frame instead"
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=1000,
        help="video inputs: at most this many frames from each video (default 1000)",
    )


def _actor_range(text: str) -> tuple[int, int]:
    """``--actors``: ``N`` or ``MIN-MAX``."""
    low, separator, high = text.partition("-")
    try:
        bounds = (int(low), int(high) if separator else int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


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
    from da3cog.io.images import source_size

    path = args.cameras or args.intrinsics
    if path is None:
        return None
    cameras = read_camera_file(path, len(args.images), label=str(path))
    if args.intrinsics is not None and cameras.extrinsics is not None:
        # Poses given here would be silently unused: say where they belong.
        raise ValueError(
            f"{path} has 'extrinsics' too: pass it with --cameras for pose-conditioned depth"
        )
    cameras.check_images([source_size(image) for image in args.images], str(path))
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


# InferenceOptions fields set by a flag of another name.
_FLAGS = {
    "reference_strategy": "--reference-view",
    "pose_from_rays": "--ray-pose",
    "infer_gaussians": "--gaussians",
}


def _inference_options(**values: object) -> InferenceOptions:
    """The options the flags set; a refusal names the flags, not the fields behind them."""
    from da3cog.pipeline import InferenceOptions

    try:
        return InferenceOptions(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        message = str(error)
        for name in sorted(values, key=len, reverse=True):
            flag = _FLAGS.get(name, f"--{name.replace('_', '-')}")
            message = re.sub(rf"\b{name}\b", flag, message)
        raise ValueError(message) from None


def _sampling(args: argparse.Namespace) -> FrameSampling:
    """``--fps`` / ``--stride`` / ``--max-frames``, checked (errors name the flags)."""
    from da3cog.io.inputs import FrameSampling, check_sampling

    check_sampling(
        args.fps, args.stride, args.max_frames, name=lambda option: f"--{option.replace('_', '-')}"
    )
    return FrameSampling(args.fps, args.stride, args.max_frames)


def _fresh_output(folder: Path) -> None:
    from da3cog.export.manifest import output_target

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder: choose a new folder")
    target = output_target(folder, "--out")
    # The results are written beside the target and renamed to it when complete: an
    # existing one needs a writable parent.
    writable_folder(folder, "--out", target.parent if target.is_dir() else target)


def writable_folder(folder: Path, option: str, written: Path | None = None) -> None:
    """ValueError, before any work, unless ``written`` (default: ``folder``, given as
    ``option``) is or can be made a folder we can write in: its nearest existing ancestor is
    a folder (not a file) a folder can be made in (tried: permissions do not tell for root,
    read-only mounts or immutable folders)."""
    existing = (written or folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {folder}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".da3cog-write-test-"))
    except OSError as error:
        raise ValueError(
            f"{option} {folder}: {existing} is not writable ({error.strerror or error})"
        ) from None


def predict(args: argparse.Namespace) -> list[Path]:
    if args.sample:
        from da3cog.samples import sample_paths

        args.images = [*args.images, *sample_paths()]
    if not args.images:
        raise ValueError("no images: name image files, or pass --sample for the bundled photos")
    _fresh_output(args.out)
    from da3cog.io.inputs import expand_inputs

    # Options first: a bad one is reported before any video is decoded.
    exports = _exports(args)
    options = _inference_options(
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
        loop_closure=args.loop_closure,
    )
    sampling = _sampling(args)
    with tempfile.TemporaryDirectory(prefix="da3cog-frames-") as frames_folder:
        args.images = expand_inputs(args.images, Path(frames_folder), sampling, _say)
        return _predict_views(args, exports, options)


def _seeded(exports: list[str], seed: int) -> dict[str, int]:
    """The export options for ``exports``: the seed of the point-cloud subsample, the only
    seeded export step, when a point format is among them."""
    seeded = {"ply", "glb", "colmap", "colmap_text", "colmap_binary", "all"}
    return {"seed": seed} if seeded & set(exports) else {}


def _say(message: str) -> None:
    print(f"[da3cog] {message}", file=sys.stderr)


def _check_model_can(
    args: argparse.Namespace,
    exports: list[str],
    options: InferenceOptions,
    cameras: UserCameras | None,
) -> None:
    """What the model cannot do with these inputs and exports, refused before it is loaded
    or downloaded (where the preset is known beforehand: a preset, an official Hub id or a
    local folder): options it does not take, and a single-view model asked to place views in
    space without the cameras that needs."""
    from da3cog.export.manifest import CAMERA_FORMATS
    from da3cog.io.exif import exif_focal
    from da3cog.model.presets import short_name
    from da3cog.pipeline import check_request
    from da3cog.weights import preset_of

    preset = preset_of(args.model)
    if preset is None:
        return
    given_poses = cameras is not None and cameras.extrinsics is not None
    given_focals = cameras is not None and cameras.intrinsics is not None
    check_request(preset, given_poses, given_focals, options)
    needing = [name for name in exports if name in CAMERA_FORMATS]
    if preset.cameras or not needing:
        return
    what = f"--export {', '.join(needing)}"
    model = f"{short_name(preset.name)} (a single-view model) estimates no cameras"
    if len(args.images) > 1:
        raise ValueError(
            f"{what} places the views in one world, which needs camera poses, and {model}: "
            "export the views one at a time, or use an any-view model"
        )
    focal = None if given_focals else exif_focal(args.images[0])
    if isinstance(focal, str):
        raise ValueError(
            f"{what} needs the view's focal length, and {model}: {args.images[0]} has no "
            f"usable EXIF focal length ({focal}); give intrinsics with --cameras"
        )


def _predict_views(
    args: argparse.Namespace, exports: list[str], options: InferenceOptions
) -> list[Path]:
    from da3cog.export.manifest import export_all
    from da3cog.io.inputs import check_images
    from da3cog.pipeline import DepthAnything3

    check_images(args.images)
    cameras = _read_user_cameras(args)
    _check_model_can(args, exports, options, cameras)
    model = DepthAnything3.from_pretrained(
        args.model, device=args.device, cache_dir=args.cache_dir, precision=args.precision
    )
    prediction = model.predict(
        [str(p) for p in args.images],
        extrinsics=None if cameras is None else cameras.extrinsics,
        intrinsics=None if cameras is None else cameras.intrinsics,
        options=options,
        progress=_say,
    )
    _say(f"writing {', '.join(exports)}")
    export_options = _seeded(exports, args.seed)
    if args.video_frames is not None:
        export_options["video_frames"] = args.video_frames
    try:
        manifest = export_all(prediction, args.out, exports, **export_options)
    except FileNotFoundError as error:
        # The output's folder went away while it was written: the machine's doing (exit 3),
        # not the request's, whose missing inputs are refused before this.
        raise OSError(f"{args.out}: could not be written ({error})") from error
    for note in prediction.notes:
        print(f"[da3cog] note: {note}", file=sys.stderr)
    return manifest.paths


def _check_device(device: str | None) -> None:
    """``--device`` names a torch device (ValueError before anything runs)."""
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device}: not a torch device ({error})") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[da3cog] %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    from da3cog.chunked import SpillFailed
    from da3cog.weights import CheckpointError

    try:
        _check_device(args.device)
        if args.command == "batch":
            return run_batch_command(args)
        written = predict(args)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"da3cog: error: {error}", file=sys.stderr)
        return 2
    except (SpillFailed, OSError) as error:
        # The machine, not the request: a full disk, a folder it may not write to.
        print(f"da3cog: error: {error}", file=sys.stderr)
        return 3
    except (RuntimeError, MemoryError) as error:
        from da3cog.memory import out_of_memory

        ran_out = out_of_memory(error)
        if ran_out is None:
            raise
        print(
            f"da3cog: error: ran out of {ran_out} ({str(error).splitlines()[0]}). Try a smaller "
            "--chunk-size, a lower --process-res or --output-resolution processing",
            file=sys.stderr,
        )
        return 3
    for path in written:
        print(path)
    return 0


def run_batch_command(args: argparse.Namespace) -> int:
    """``da3cog batch``: 0 when every scene is done, 1 when some failed (their errors are in
    the index and the summary table)."""
    from da3cog.batch import BatchSettings, RayOptions, read_manifest, run_batch
    from da3cog.batch.storage import is_uri
    from da3cog.weights import absolute_model

    if not is_uri(str(args.out)):
        writable_folder(Path(args.out), "--out")

    ray_only = {"--actors": args.actors, "--gpus-per-actor": args.gpus_per_actor}
    for flag, value in ray_only.items():
        if value is not None and args.ray is None:
            raise ValueError(f"{flag} applies with --ray only")
    ray = None
    if args.ray is not None:
        low, high = args.actors or (1, None)
        ray = RayOptions(
            address=args.ray or None,
            min_actors=low,
            max_actors=high,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
        )
    settings = BatchSettings(
        model=absolute_model(args.model),
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
        options=_inference_options(
            process_res=args.process_res,
            seed=args.seed,
            chunk_size=args.chunk_size,
            chunk_overlap=args.chunk_overlap,
            loop_closure=args.loop_closure,
            infer_gaussians=args.gaussians,
        ),
        formats=tuple(args.export),
        export_options=_seeded(args.export, args.seed),
        sampling=_sampling(args),
    )
    scenes = read_manifest(args.manifest)
    view = _BatchView(len(scenes))
    try:
        results = run_batch(scenes, args.out, settings, ray=ray, progress=view)
    finally:
        view.close()
    _print_table(results)
    failed = [r for r in results if r.status != "done"]
    print(f"{len(results) - len(failed)} scene(s) done, {len(failed)} failed: {args.out}")
    return 1 if failed else 0


class _BatchView:
    """Batch progress on stderr: a bar (scenes done / failed / left, views/s) on a terminal,
    one line per scene otherwise (logs)."""

    def __init__(self, total: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="scene", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, progress: BatchProgress) -> None:
        if self.bar is None:
            _say(progress.message)
            return
        self.bar.update(1)
        self.bar.set_postfix(
            done=progress.done,
            failed=progress.failed,
            left=progress.remaining,
            views_s=f"{progress.views_per_second:.2f}",
        )
        if progress.last.status != "done":
            self.bar.write(f"[da3cog] {progress.message}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_table(results: list[SceneResult]) -> None:
    rows = [("scene", "status", "views", "seconds", "views/s", "error")]
    for r in results:
        rate = f"{r.views / r.seconds:.2f}" if r.seconds and r.views else ""
        error = r.error.splitlines()[0] if r.error else ""
        rows.append((r.scene, r.status, str(r.views), f"{r.seconds:.1f}", rate, error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())


if __name__ == "__main__":
    sys.exit(main())
