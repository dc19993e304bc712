"""One scene, start to end, on whichever worker runs it: the in-process runner and every Ray
actor call the same :class:`SceneRunner`.

A scene's inputs are read by the worker (remote ones fetched into its staging folder), the
model predicts them, the exports, ``result.json`` and the completion marker are written into a
fresh staging folder that then moves into place (:meth:`OutputRoot.publish`). Any failure is
the scene's result row; nothing escapes :meth:`SceneRunner.run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from da3cog.batch.manifest import Scene, scene_settings
from da3cog.batch.storage import (
    COMPLETE_NAME,
    MAX_SCENE_ATTEMPTS,
    RESULT_NAME,
    SCENE_MARKER,
    OutputRoot,
    fetch_inputs,
)
from da3cog.geometry import camera_centres
from da3cog.io.inputs import DEFAULT_SAMPLING, FrameSampling, check_images, expand_inputs
from da3cog.pipeline import DepthAnything3, InferenceOptions, Precision, Prediction

DEFAULT_FORMATS = ("depth_npy", "depth_vis", "cameras_json")


@dataclass(frozen=True)
class BatchSettings:
    """What every scene of a batch shares (a scene's manifest ``options`` override the
    inference, export and sampling parts).

    Attributes:
        model: preset (optionally ``@version``), Hub id or checkpoint folder; each worker loads it.
        device: torch device, None for CUDA when available.
        precision: the backbone's dtype (:class:`da3cog.pipeline.DepthAnything3`).
        cache_dir: Hub download cache.
        options: inference options.
        formats: export formats per scene.
        export_options: keyword options of :func:`da3cog.export.manifest.export_all`.
        sampling: frame sampling of video inputs.
    """

    model: str = "small"
    device: str | None = None
    precision: Precision = "auto"
    cache_dir: str | None = None
    options: InferenceOptions = field(default_factory=InferenceOptions)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    export_options: dict[str, Any] = field(default_factory=dict)
    sampling: FrameSampling = DEFAULT_SAMPLING

    def load_model(self) -> DepthAnything3:
        return DepthAnything3.from_pretrained(
            self.model,
            device=self.device,
            cache_dir=None if self.cache_dir is None else Path(self.cache_dir),
            precision=self.precision,
        )


@dataclass(frozen=True)
class SceneResult:
    """One scene's row of the index.

    Attributes:
        scene: its id.
        status: ``done`` or ``failed``.
        views: views predicted (0 when it failed).
        seconds: wall time of the scene on its worker (as first run, for a resumed scene).
        timings: seconds per stage: ``inputs`` (fetch, decode videos, check), ``predict``,
            ``export`` (write and move into place).
        folder: its output folder (path or URI), when done.
        files: its output files, relative to that folder.
        cameras: a summary: ``metric`` (depth in metres), ``cameras_estimated``,
            ``median_focal_px`` and ``path_length`` (summed distance between consecutive
            camera centres, in the depth unit), when done.
        worker: ``host:pid`` of the process that ran it.
        error: why it failed.
    """

    scene: str
    status: str
    views: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    folder: str | None = None
    files: tuple[str, ...] = ()
    cameras: dict[str, Any] | None = None
    worker: str = ""
    error: str | None = None

    def document(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "files": list(self.files)}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> SceneResult:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in document.items() if k in known}
        return cls(**{**values, "files": tuple(values.get("files", ()))})


def _in_user_terms(error: ValueError, local: Sequence[Path], given: Sequence[str]) -> ValueError:
    """``error`` with the local copies of fetched inputs named by the locations the manifest
    gave (a temporary copy, gone by the time the user reads the index, means nothing)."""
    message = str(error)
    for path, location in sorted(
        zip(local, given, strict=True), key=lambda pair: -len(str(pair[0]))
    ):
        if str(path) != location:
            message = message.replace(str(path), location)
    if message == str(error):
        return error
    try:
        return type(error)(message)
    except TypeError:
        return ValueError(message)


class SceneRunner:
    """Runs scenes with one loaded model into one output root."""

    def __init__(self, model: DepthAnything3, settings: BatchSettings, root: OutputRoot) -> None:
        self.model = model
        self.settings = settings
        self.root = root
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, scene: Scene) -> SceneResult:
        """Predict, export and publish ``scene``; its result row either way. A scene another
        attempt already landed is not run again (its stored row is returned)."""
        landed = self.root.completed(scene.id)
        if landed is not None:
            return SceneResult.from_document(landed)
        record, dead = self.root.begin_attempt(scene.id)
        if dead >= MAX_SCENE_ATTEMPTS:
            # Its worker died every time (a kill takes no row with it): a retry would too.
            self.root.end_attempt(scene.id, record, clear=True)
            return SceneResult(
                scene.id,
                "failed",
                worker=self.worker,
                error=f"WorkerDied: {dead} attempt(s) ended with their worker killed (out of "
                "memory, or a crash in a decoder); not tried again in this run",
            )
        started = time.perf_counter()
        staging = self.root.staging(scene.id)
        landed_now = False
        try:
            outputs = staging / "outputs"
            result = self._run(scene, staging, outputs, started)
            (outputs / RESULT_NAME).write_text(json.dumps(result.document(), indent=2))
            (outputs / SCENE_MARKER).write_text("")
            (outputs / COMPLETE_NAME).write_text("")
            landed_now = True
            if not self.root.publish(scene.id, outputs):
                landed = self.root.completed(scene.id)
                if landed is not None:
                    return SceneResult.from_document(landed)
            return result
        # Any failure of a scene (bad input, decoding, the model, a full disk) is its row.
        except Exception as error:
            landed_now = False
            return SceneResult(
                scene.id,
                "failed",
                seconds=round(time.perf_counter() - started, 3),
                worker=self.worker,
                error=f"{type(error).__name__}: {error}",
            )
        finally:
            self.root.release(staging)
            self.root.end_attempt(scene.id, record, clear=landed_now)

    def _run(self, scene: Scene, staging: Path, outputs: Path, started: float) -> SceneResult:
        from da3cog.export.manifest import export_all, options_taken
        from da3cog.io.cameras import read_camera_file
        from da3cog.io.images import source_size

        options, formats, sampling = scene_settings(
            scene.options, self.settings.options, self.settings.formats, self.settings.sampling
        )
        marks = [time.perf_counter()]
        local_inputs = fetch_inputs(scene.inputs, staging / "inputs")
        try:
            views = expand_inputs(local_inputs, staging / "frames", sampling)
            check_images(views)
        except ValueError as error:
            raise _in_user_terms(error, local_inputs, scene.inputs) from None
        cameras = None
        if scene.cameras is not None:
            (camera_file,) = fetch_inputs([scene.cameras], staging / "cameras")
            cameras = read_camera_file(camera_file, len(views), label=scene.cameras)
            cameras.check_images([source_size(view) for view in views], scene.cameras)
        marks.append(time.perf_counter())
        try:
            prediction = self.model.predict(
                [str(view) for view in views],
                extrinsics=None if cameras is None else cameras.extrinsics,
                intrinsics=None if cameras is None else cameras.intrinsics,
                options=options,
            )
        except ValueError as error:  # an image that fails to decode past its header
            raise _in_user_terms(error, local_inputs, scene.inputs) from None
        marks.append(time.perf_counter())
        # The batch's export options, as far as this scene's formats take them, and the
        # scene's seed for the point-cloud subsample (as the predict command passes it).
        export_options = options_taken(
            formats, {**self.settings.export_options, "seed": options.seed}
        )
        export_all(prediction, outputs, list(formats), **export_options)
        marks.append(time.perf_counter())
        stages = ("inputs", "predict", "export")
        return SceneResult(
            scene.id,
            "done",
            views=len(prediction.views),
            seconds=round(marks[-1] - started, 3),
            timings={
                s: round(b - a, 3) for s, a, b in zip(stages, marks[:-1], marks[1:], strict=True)
            },
            folder=self.root.scene_location(scene.id),
            files=tuple(
                sorted(p.relative_to(outputs).as_posix() for p in outputs.rglob("*") if p.is_file())
            ),
            cameras=cameras_summary(prediction),
            worker=self.worker,
        )


def cameras_summary(prediction: Prediction) -> dict[str, Any]:
    """A few numbers that tell whether a scene's cameras look sane, for the index."""
    summary: dict[str, Any] = {
        "metric": prediction.is_metric,
        "cameras_estimated": prediction.cameras_estimated,
    }
    focals = [float(v.intrinsics[0, 0]) for v in prediction.views if v.intrinsics is not None]
    summary["median_focal_px"] = round(float(np.median(focals)), 2) if focals else None
    poses = [v.extrinsics for v in prediction.views if v.extrinsics is not None]
    path_length = None
    if poses and len(poses) == len(prediction.views):
        steps = np.diff(camera_centres(np.stack(poses)), axis=0)
        path_length = round(float(np.linalg.norm(steps, axis=1).sum()), 4)
    summary["path_length"] = path_length
    return summary
