"""One request end to end: check, gather views, load the model, predict, write files.

Each request works in its own new temporary folder. Its returned files must outlive
``run()`` (the cog server uploads them after it returns), so a request's folder is removed
when the next request starts, or at once when the request fails or is cancelled.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from da3cog.io import exif_focal
from da3cog.model.presets import get_preset
from da3cog.pipeline import DepthAnything3, InferenceOptions, Prediction, default_device
from da3cog.serve.inputs import MAX_VIEWS
from da3cog.serve.media import gather_views
from da3cog.serve.models import ModelCache, warm_up
from da3cog.serve.outputs import (
    GAUSSIAN_VIDEO_NAME,
    OutputFolder,
    depth_video,
    export_prediction,
    write_manifest,
)
from da3cog.serve.request import (
    ModelChoice,
    RequestError,
    RequestValues,
    UserCameras,
    check_cameras,
    check_formats,
    check_values,
    choose_model,
    read_cameras,
)

logger = logging.getLogger(__name__)

TMP_ENV = "DA3COG_SERVE_TMP"
SETUP_MODEL_ENV = "DA3COG_SETUP_MODEL"
DEFAULT_SETUP_MODEL = "giant"
REQUEST_PREFIX = "da3cog-request-"

Progress = Callable[[str], None]


def gaussian_video_problem() -> str | None:
    """Why this server refuses a Gaussian fly-through, or None. The library renders one on any
    machine (:mod:`da3cog.export.video` falls back to a pure-torch CPU renderer), but at the
    giant model's processing size and 120 frames that takes many minutes on a CPU, so the
    server asks for gsplat on a CUDA GPU."""
    from da3cog.export.video import gsplat_problem

    problem = gsplat_problem()
    if problem is None:
        return None
    return (
        f"render_video with mode=gaussian-splat renders the Gaussians with gsplat: {problem} "
        "(the Gaussians are still returned as gaussians.ply; render_video in the other modes "
        "makes a depth video on any machine)"
    )


def print_progress(message: str) -> None:
    """Progress lines: the cog server routes a request's stdout into its logs."""
    print(f"[da3cog] {message}", flush=True)


class Server:
    """The state a cog worker keeps between requests: the model cache and the folder of the
    last request.

    Args:
        device: where models run (default: CUDA when available).
        tmp_root: where request folders go (default ``$DA3COG_SERVE_TMP`` or the system's
            temporary folder).
        cache: a model cache (default: bounded by free GPU memory on CUDA).
    """

    def __init__(
        self,
        device: torch.device | None = None,
        tmp_root: Path | None = None,
        cache: ModelCache | None = None,
    ) -> None:
        self.device = device or default_device()
        self.cache = cache or ModelCache.for_device(self.device)
        root = tmp_root or os.environ.get(TMP_ENV) or tempfile.gettempdir()
        self.tmp_root = Path(root)
        self._kept: list[Path] = []

    def setup(self, model: str | None = None, progress: Progress = print_progress) -> None:
        """Load the default model (``$DA3COG_SETUP_MODEL``, else giant) and warm it up;
        other models load on first use. Raises RuntimeError naming what failed."""
        name = model or os.environ.get(SETUP_MODEL_ENV) or DEFAULT_SETUP_MODEL
        try:
            preset = get_preset(name).name
        except ValueError as error:
            raise RuntimeError(f"{SETUP_MODEL_ENV}: {error}") from error
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        try:
            loaded = self.cache.get(preset, progress)
        except Exception as error:
            message = f"setup could not load the default model {preset}: {error}"
            raise RuntimeError(message) from error
        progress(f"warm-up on {self.device} took {warm_up(loaded):.1f}s")
        if self.device.type == "cuda":
            # Load gsplat's kernels now (prebuilt in the image) rather than in a request.
            started = time.perf_counter()
            problem = gaussian_video_problem()
            took = time.perf_counter() - started
            progress(f"gsplat kernels: {problem or 'loaded'} ({took:.1f}s)")

    def handle(self, values: RequestValues, progress: Progress = print_progress) -> list[Path]:
        """Run one request; returns the files to send back (``manifest.json`` first)."""
        started = time.perf_counter()
        check_values(values)
        choice = choose_model(values.mode, values.model_size, values.metric)
        if values.render_video and values.mode == "gaussian-splat":
            problem = gaussian_video_problem()
            if problem is not None:
                raise RequestError(problem)
        progress(f"model: {choice.reason}")
        self._release_previous()
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=REQUEST_PREFIX, dir=self.tmp_root))
        try:
            files = self._run(values, choice, folder, progress)
        except BaseException:
            # Failed or cancelled (coglet raises CancelationException, a BaseException,
            # between two Python steps): nothing of the request stays behind.
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._kept.append(folder)
        progress(f"request done in {time.perf_counter() - started:.1f}s, {len(files)} files")
        return files

    def _release_previous(self) -> None:
        """Remove the folders of earlier requests, whose files have been sent by now."""
        while self._kept:
            shutil.rmtree(self._kept.pop(), ignore_errors=True)

    def _run(
        self, values: RequestValues, choice: ModelChoice, folder: Path, progress: Progress
    ) -> list[Path]:
        views, input_kind = gather_views(
            values.image,
            values.images,
            folder / "inputs",
            video_fps=values.video_fps,
            max_frames=values.max_frames,
            max_views=MAX_VIEWS,
            progress=progress,
        )
        progress(f"{len(views)} view(s) from {input_kind} input")
        cameras = read_cameras(values.cameras, len(views)) if values.cameras else None
        check_cameras(cameras, choice.spec)
        missing_focal = []
        if not choice.spec.cameras and (cameras is None or cameras.intrinsics is None):
            missing_focal = [v.stem for v in views if isinstance(exif_focal(v), str)]
        check_formats(values, choice.spec, cameras, missing_focal)

        model = self.cache.get(choice.preset, progress)
        options = InferenceOptions(
            process_res=values.process_resolution,
            output_resolution=values.output_resolution,  # type: ignore[arg-type]
            seed=values.seed,
            infer_gaussians=values.mode == "gaussian-splat",
        )
        predictions = self._predict(model, views, cameras, options, values.mode, progress)

        progress("writing files")
        outputs = OutputFolder(folder / "outputs")
        work = folder / "work"
        documents = []
        for index, prediction in enumerate(predictions):
            monocular = values.mode == "monocular"
            documents.append(
                export_prediction(
                    prediction,
                    index,
                    f"view_{index:04d}_" if monocular else "",
                    index if monocular else 0,
                    values,
                    work,
                    outputs,
                )
            )
        notes = self._extra_files(predictions[0], values, outputs, progress)
        manifest = write_manifest(
            outputs,
            values,
            choice,
            input_kind,
            [v.stem for v in views],
            predictions,
            documents,
            notes,
        )
        shutil.rmtree(work, ignore_errors=True)
        return [manifest, *(entry.path for entry in outputs.files)]

    def _predict(
        self,
        model: DepthAnything3,
        views: list[Path],
        cameras: UserCameras | None,
        options: InferenceOptions,
        mode: str,
        progress: Progress,
    ) -> list[Prediction]:
        def run(paths: list[Path], cams: UserCameras | None) -> Prediction:
            return model.predict(
                [str(p) for p in paths],
                extrinsics=None if cams is None else cams.extrinsics,
                intrinsics=None if cams is None else cams.intrinsics,
                options=options,
                progress=progress,
            )

        if mode != "monocular":
            return [run(views, cameras)]
        # Monocular: every view on its own, in its own camera frame.
        return [
            run([view], None if cameras is None else cameras.for_view(index))
            for index, view in enumerate(views)
        ]

    def _extra_files(
        self,
        prediction: Prediction,
        values: RequestValues,
        outputs: OutputFolder,
        progress: Progress,
    ) -> list[str]:
        """The Gaussian fly-through or the depth video; returns notes for the manifest. (The
        Gaussians' PLY is one of the export formats, see ``outputs.base_formats``.)"""
        from da3cog.export.video import render_flythrough

        notes: list[str] = []
        if values.mode == "gaussian-splat":
            gaussians = prediction.gaussians
            if gaussians is None:
                raise RuntimeError("the model returned no Gaussians")
            for entry in outputs.files:
                if entry.role == "gaussian_splats":
                    progress(f"wrote {entry.details['gaussians']} of {len(gaussians)} Gaussians")
            if values.render_video:
                path = outputs.new_path(GAUSSIAN_VIDEO_NAME)
                frames = render_flythrough(prediction, path)
                outputs.record(path, "gaussian_video", prediction=0, details={"frames": frames})
        elif values.render_video:
            depth_video(outputs, values.video_fps)
            notes.append("depth_video: one frame per view, each coloured on its own depth range")
        return notes
