"""One request end to end: check, gather views, load the model, predict, write files.

Each request works in its own new temporary folder. Its returned files must outlive
``run()`` (the cog server uploads them after it returns), so a request's folder is removed
when the next request starts, or at once when the request fails or is cancelled; ``setup()``
removes the folders a killed worker left. Before any model runs, a request's files are
checked for provenance (:mod:`da3cog.serve.provenance`), its views bounded
(:mod:`da3cog.serve.limits`) and its peak memory estimated against what the worker has
(:mod:`da3cog.memory`): a request that cannot fit is refused with the limit it hit.
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from da3cog import memory
from da3cog.chunked import (
    SpillFailed,
    TimeBudgetExceeded,
    UnalignableChunks,
    check_pace,
    time_left,
)
from da3cog.io import PATCH_SIZE, CameraFileError, exif_focal
from da3cog.io.preprocess import processing_size
from da3cog.model.presets import get_preset
from da3cog.pipeline import DepthAnything3, InferenceOptions, Prediction, default_device
from da3cog.processes import process_alive
from da3cog.serve.limits import DEFAULT_LIMITS, Limits, predict_seconds
from da3cog.serve.media import View, gather_views, input_label
from da3cog.serve.models import ModelCache, warm_up
from da3cog.serve.outputs import (
    GAUSSIAN_VIDEO_NAME,
    OutputFolder,
    depth_video,
    export_prediction,
    write_manifest,
)
from da3cog.serve.provenance import RequestFiles
from da3cog.serve.request import (
    EXPORT_FORMATS_MAP,
    POINT_FORMATS,
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
# A request folder is named after the worker process that made it: da3cog-request-<pid>-xxxx.
_REQUEST_FOLDER = re.compile(rf"^{REQUEST_PREFIX}(\d+)-")

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
        limits: resource bounds of one request.
        files: which input files a request may read (default: those the cog runtime wrote
            for it, see :class:`~da3cog.serve.provenance.RequestFiles`).
    """

    def __init__(
        self,
        device: torch.device | None = None,
        tmp_root: Path | None = None,
        cache: ModelCache | None = None,
        limits: Limits = DEFAULT_LIMITS,
        files: RequestFiles | None = None,
    ) -> None:
        self.device = device or default_device()
        self.cache = cache or ModelCache.for_device(self.device)
        root = tmp_root or os.environ.get(TMP_ENV) or tempfile.gettempdir()
        self.tmp_root = Path(root)
        self.limits = limits
        self.files = files or RequestFiles.from_environment()
        self._kept: list[Path] = []

    def setup(self, model: str | None = None, progress: Progress = print_progress) -> None:
        """Load the default model (``$DA3COG_SETUP_MODEL``, else giant) and warm it up;
        other models load on first use. Raises RuntimeError naming what failed."""
        name = model or os.environ.get(SETUP_MODEL_ENV) or DEFAULT_SETUP_MODEL
        # A bad $DA3COG_TIME_BUDGET_S or $DA3COG_MEMORY_BUDGET_GB fails the boot, not every
        # request.
        progress(f"time budget of a chunked prediction: {predict_seconds(self.limits):.0f}s")
        try:
            budget = memory.host_budget()
        except ValueError as error:
            raise RuntimeError(str(error)) from error
        if budget is not None:
            progress(f"memory a request may plan on now: {budget / memory.GIB:.1f} GiB of RAM")
        try:
            preset = get_preset(name).name
        except ValueError as error:
            raise RuntimeError(f"{SETUP_MODEL_ENV}: {error}") from error
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        removed = remove_orphaned_folders(self.tmp_root)
        if removed:
            progress(f"removed {removed} request folder(s) left by an earlier worker")
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
        self.files.ready()

    def handle(self, values: RequestValues, progress: Progress = print_progress) -> list[Path]:
        """Run one request; returns the files to send back (``manifest.json`` first)."""
        try:
            return self._handle(values, progress)
        finally:
            self.files.done()
            memory.trim_heap()

    def _handle(self, values: RequestValues, progress: Progress) -> list[Path]:
        started = time.perf_counter()
        check_values(values)
        self.files.check(values)
        choice = choose_model(
            values.mode, values.model_size, values.metric, values.checkpoint_version
        )
        if values.render_video and values.mode == "gaussian-splat":
            problem = gaussian_video_problem()
            if problem is not None:
                raise RequestError(problem)
        progress(f"model: {choice.reason}")
        self._release_previous()
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{REQUEST_PREFIX}{os.getpid()}-", dir=self.tmp_root))
        try:
            files = self._run(values, choice, folder, progress)
        except BaseException:
            # Failed or cancelled (coglet raises CancelationException, a BaseException,
            # between two Python steps): nothing of the request stays behind, in files or
            # in memory.
            shutil.rmtree(folder, ignore_errors=True)
            release_memory(self.device)
            raise
        self._kept.append(folder)
        progress(f"request done in {time.perf_counter() - started:.1f}s, {len(files)} files")
        return files

    def _check_memory(
        self, values: RequestValues, choice: ModelChoice, views: list[View]
    ) -> int | None:
        """How the request fits the memory the worker has: None in one pass, else the
        largest chunk of views (multi-view and gaussian-splat requests run as aligned chunks:
        only one chunk's activations are held). A request that fits neither way is refused,
        naming the largest one of the same views that would fit."""
        # The model is loaded after this check: what loading it takes is not the request's.
        preset = choice.spec
        load_host, load_device = self.cache.load_cost(choice.key)
        host, device = memory.host_budget(load_host), None
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            device = memory.device_budget(self.device, load_device)
        points = values.max_points if exports_points(values.export_format) else 0
        tracked = exports_tracks(values.export_format)
        gaussians = values.mode == "gaussian-splat"
        monocular = values.mode == "monocular"

        def size_of(
            chosen: list[View], output: str, resolution: int = values.process_resolution
        ) -> memory.RequestSize:
            # Upright, as the pipeline fits them (EXIF orientation, display rotation); a
            # monocular request runs each view at its own shape.
            return memory.request_size(
                [v.display_size for v in chosen],
                resolution,
                output,
                gaussians,
                points,
                tracked,
                mixed_shapes=None if monocular else "resize",
            )

        def needed(
            count: int, output: str, resolution: int = values.process_resolution
        ) -> memory.MemoryEstimate:
            """The least ``count`` of the views can run with: monocular requests one view at
            a time (keeping every view's outputs: as chunks of one view), others in the
            smallest chunks when there are more views than one."""
            chunk = 1 if monocular else memory.MIN_CHUNK if count > memory.MIN_CHUNK else None
            return memory.estimate(
                preset, size_of(views[:count], output, resolution), on_gpu, chunk=chunk
            )

        def fits(estimate: memory.MemoryEstimate) -> bool:
            return memory.fits(estimate, host, device)

        size = size_of(views, values.output_resolution)
        if fits(memory.estimate(preset, size, on_gpu, chunk=1 if monocular else None)):
            return None
        if not monocular:
            chunk = memory.plan_chunk(preset, size, on_gpu, host, device)
            if chunk is not None and fits(memory.estimate(preset, size, on_gpu, chunk=chunk)):
                return chunk
        estimate = needed(len(views), values.output_resolution)
        have = [f"{host / memory.GIB:.1f} GiB of RAM" if host is not None else ""]
        if device is not None:
            have.append(f"{device / memory.GIB:.1f} GiB of GPU memory")
        advice = []
        # More views need more memory: the first count that does not fit, by bisection.
        largest = bisect.bisect_left(
            range(1, len(views)), True, key=lambda n: not fits(needed(n, values.output_resolution))
        )
        if largest:
            advice.append(f"at most {largest} of these views")
        if values.output_resolution == "input" and fits(needed(len(views), "processing")):
            advice.append("output_resolution=processing")
        if values.process_resolution > 280 and _fits_at(
            lambda: fits(needed(len(views), values.output_resolution, 280))
        ):
            advice.append("process_resolution=280")
        what = " or ".join(advice) if advice else "fewer or smaller views"
        raise RequestError(
            f"this request ({len(views)} view(s) at process_resolution="
            f"{values.process_resolution}) needs about {estimate.describe()}; this worker has "
            f"{' and '.join(h for h in have if h)} for a request. Send {what}"
        )

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
            limits=self.limits,
            progress=progress,
        )
        progress(f"{len(views)} view(s) from {input_kind} input")
        for view in views:
            if view.downscaled:
                progress(f"{view.label}: {_size(view.input_size)} read at {_size(view.size)}")
        cameras = None
        if values.cameras:
            label = input_label("cameras", Path(values.cameras))
            cameras = fit_cameras(read_cameras(values.cameras, len(views), label), views, label)
        check_cameras(cameras, choice.spec)
        missing_focal = []
        if not choice.spec.cameras and (cameras is None or cameras.intrinsics is None):
            missing_focal = [v.name for v in views if isinstance(exif_focal(v.path), str)]
        check_formats(values, choice.spec, cameras, missing_focal)
        check_view_shapes(views, values.process_resolution)
        chunk = self._check_memory(values, choice, views)
        if chunk is not None:
            progress(f"{len(views)} views do not fit in one pass: chunks of {chunk} views")

        model = self.cache.get(choice.key, progress)
        options = InferenceOptions(
            process_res=values.process_resolution,
            output_resolution=values.output_resolution,  # type: ignore[arg-type]
            seed=values.seed,
            infer_gaussians=values.mode == "gaussian-splat",
            chunk_size=chunk,
            time_budget=predict_seconds(self.limits),
            loop_closure=values.loop_closure,
        )
        refusal = None
        try:
            predictions = self._predict(model, views, cameras, options, values.mode, progress)
        except UnalignableChunks as error:
            # The server chose the chunks (the request does not fit one pass): the way round
            # is the request's, not a chunk option it cannot set.
            refusal = (
                f"{in_user_terms(error.reason, views)}. It ran in chunks because it does not "
                "fit this worker's memory in one pass: send fewer views or a lower "
                "process_resolution"
            )
        except TimeBudgetExceeded as error:
            advice = "fewer views (max_frames, video_fps) or a lower process_resolution"
            refusal = f"{error}. Send {advice}"
        except ValueError as error:
            # The views were checked when read; what the pipeline still refuses names our
            # copies of them, which mean nothing to the user.
            refusal = in_user_terms(str(error), views)
        except SpillFailed as error:
            refusal = f"this worker ran out of disk for the request's outputs ({error})"
        except (RuntimeError, MemoryError) as error:
            ran_out = memory.out_of_memory(error)
            if ran_out is None:
                raise
            refusal = out_of_memory_refusal(values, len(views), chunk, ran_out)
        if refusal is not None:
            # Raised out here, not chained to the failure: its frames hold the request's
            # tensors (a chunked run's outputs so far), which are free only once it is gone.
            release_memory(self.device)
            raise RequestError(refusal)

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
            views,
            predictions,
            documents,
            notes,
        )
        shutil.rmtree(work, ignore_errors=True)
        return [manifest, *(entry.path for entry in outputs.files)]

    def _predict(
        self,
        model: DepthAnything3,
        views: list[View],
        cameras: UserCameras | None,
        options: InferenceOptions,
        mode: str,
        progress: Progress,
    ) -> list[Prediction]:
        def run(chosen: list[View], cams: UserCameras | None) -> Prediction:
            return model.predict(
                [str(view.path) for view in chosen],
                extrinsics=None if cams is None else cams.extrinsics,
                intrinsics=None if cams is None else cams.intrinsics,
                options=options,
                progress=progress,
            )

        if mode != "monocular":
            return [run(views, cameras)]
        # Monocular: every view on its own, in its own camera frame, under the time budget
        # of a chunked run (each view a chunk of one).
        predictions: list[Prediction] = []
        singles = [range(index, index + 1) for index in range(len(views))]
        started = time.perf_counter()
        for index, view in enumerate(views):
            eta = time_left(index, len(views), time.perf_counter() - started)
            progress(f"view {index + 1}/{len(views)}: {view.label}{eta}")
            predictions.append(run([view], None if cameras is None else cameras.for_view(index)))
            if options.time_budget is not None and index + 1 < len(views):
                elapsed = time.perf_counter() - started
                check_pace(singles, index + 1, elapsed, options.time_budget, "view")
        return predictions

    def _extra_files(
        self,
        prediction: Prediction,
        values: RequestValues,
        outputs: OutputFolder,
        progress: Progress,
    ) -> list[str]:
        """The Gaussian fly-through or the depth video; returns notes for the manifest. (The
        Gaussians' PLY is one of the export formats, see ``outputs.base_formats``.)"""
        from da3cog.export.gaussians import gaussian_keep_mask
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
                # The Gaussians gaussians.ply has (the border band, the far background and the
                # invalid ones left out), as the library's gaussians_video renders.
                keep, _ = gaussian_keep_mask(prediction)
                path = outputs.new_path(GAUSSIAN_VIDEO_NAME)
                frames = render_flythrough(prediction, path, keep=keep)
                outputs.record(path, "gaussian_video", prediction=0, details={"frames": frames})
        elif values.render_video:
            depth_video(outputs, values.video_fps)
            notes.append("depth_video: one frame per view, each coloured on its own depth range")
        return notes


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def in_user_terms(message: str, views: list[View]) -> str:
    """``message`` with our copies of the views replaced by the names the user knows."""
    for view in views:
        message = message.replace(str(view.path), view.label)
    return message


def fit_cameras(cameras: UserCameras, views: list[View], label: str) -> UserCameras:
    """User intrinsics (pixels of the images as sent, upright), checked against those
    images, then moved to the views as read (smaller when a view was downscaled)."""
    if cameras.intrinsics is None:
        return cameras
    try:
        cameras.check_images([view.sent_display_size for view in views], label)
    except CameraFileError as error:
        raise RequestError(str(error)) from error
    intrinsics = cameras.intrinsics.copy()
    for index, view in enumerate(views):
        scale_x, scale_y = view.display_scale
        intrinsics[index, 0] *= scale_x
        intrinsics[index, 1] *= scale_y
    return UserCameras(np.ascontiguousarray(intrinsics), cameras.extrinsics)


def _fits_at(check: Callable[[], bool]) -> bool:
    """``check()``, False where a view is too elongated for the resolution it tries."""
    try:
        return check()
    except ValueError:
        return False


def exports_points(export_format: str) -> bool:
    """Whether ``export_format`` writes a point cloud (:data:`da3cog.memory.POINT_BYTES` a
    point kept)."""
    return export_format == "all" or bool(set(EXPORT_FORMATS_MAP[export_format]) & POINT_FORMATS)


def exports_tracks(export_format: str) -> bool:
    """Whether ``export_format`` writes a COLMAP model, whose points carry multi-view tracks
    (:data:`da3cog.memory.TRACKED_POINT_BYTES`)."""
    return export_format in ("colmap", "all")


def check_view_shapes(views: list[View], process_resolution: int) -> None:
    """Refuse, before any model loads, a view so elongated that at ``process_resolution`` a
    side would be narrower than one patch of the network, named as the user sent it."""
    for view in views:
        width, height = view.display_size
        try:
            processing_size((height, width), process_resolution, InferenceOptions.resize_method)
        except ValueError:
            raise RequestError(
                f"{view.label}: {width}x{height} pixels is too elongated for "
                f"process_resolution={process_resolution}, where its shorter side would be "
                f"narrower than one {PATCH_SIZE}-pixel patch; send images whose longer side is "
                f"at most about {process_resolution // (PATCH_SIZE // 2)} times the shorter"
            ) from None


def out_of_memory_refusal(
    values: RequestValues, views: int, chunk: int | None, ran_out: str
) -> str:
    """The refusal of a request that ran out of ``ran_out`` ("memory", "GPU memory") although
    its estimate fit: the request as it ran and what to send instead."""
    how = "in one pass"
    if values.mode == "monocular":
        how = "one view at a time"
    elif chunk is not None:
        how = f"in chunks of {chunk} views"
    return (
        f"this request ({views} view(s) at process_resolution={values.process_resolution}, "
        f"{how}) ran out of {ran_out} although its estimate fit this worker. Send fewer or "
        "smaller views or a lower process_resolution"
    )


def release_memory(device: torch.device) -> None:
    """Give back what a failed or cancelled request held (tensors freed by the unwinding,
    cached CUDA blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory.trim_heap()


def remove_orphaned_folders(root: Path) -> int:
    """Remove request folders under ``root`` whose worker process is gone (a killed
    server's); returns how many."""
    removed = 0
    for folder in root.glob(f"{REQUEST_PREFIX}*"):
        match = _REQUEST_FOLDER.match(folder.name)
        owner = int(match.group(1)) if match else None
        if owner is not None and owner != os.getpid() and process_alive(owner):
            continue
        if owner == os.getpid():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


