"""Run the scenes of a manifest, in this process, each into its own folder.

Every scene is one unit of work: its inputs are expanded and checked, the model (loaded once)
predicts it, its exports are written into ``OUT/.partial/<scene>/`` with ``result.json`` and
a completion marker last, and the folder is then moved to ``OUT/<scene>/`` in one rename. A
scene that fails becomes a failed result with its message; the others go on. A rerun of the
same command skips the scenes whose folder is complete (a killed run resumes where it
stopped; failed scenes are tried again) and removes what a killed run left half-written.
``OUT/index.jsonl`` lists every scene of the manifest exactly once, in manifest order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from da3cog.batch.manifest import Scene
from da3cog.export.manifest import export_all
from da3cog.io.cameras import read_camera_file
from da3cog.io.inputs import DEFAULT_SAMPLING, FrameSampling, check_images, expand_inputs
from da3cog.pipeline import DepthAnything3, InferenceOptions

RESULT_NAME = "result.json"
COMPLETE_NAME = ".complete"
PARTIAL_FOLDER = ".partial"
INDEX_NAME = "index.jsonl"


@dataclass(frozen=True)
class SceneResult:
    """One scene's row of the index.

    Attributes:
        scene: its id.
        status: ``done`` or ``failed``.
        views: views predicted (0 when it failed).
        seconds: wall time of the scene (as first run, for a resumed scene).
        folder: its output folder, relative to the batch's output folder, when done.
        files: its output files, relative to that folder.
        error: why it failed.
    """

    scene: str
    status: str
    views: int = 0
    seconds: float = 0.0
    folder: str | None = None
    files: tuple[str, ...] = ()
    error: str | None = None

    def document(self) -> dict[str, Any]:
        document = asdict(self)
        document["files"] = list(self.files)
        return document

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> SceneResult:
        return cls(**{**document, "files": tuple(document.get("files", ()))})


def run_batch(
    scenes: Sequence[Scene],
    out: Path,
    model: DepthAnything3,
    *,
    options: InferenceOptions | None = None,
    formats: Sequence[str] = ("depth_npy", "depth_vis", "cameras_json"),
    export_options: dict[str, Any] | None = None,
    sampling: FrameSampling = DEFAULT_SAMPLING,
    progress: Callable[[str], None] | None = None,
) -> list[SceneResult]:
    """Predict and export every scene (see the module docstring); returns the index rows."""
    report = progress or (lambda _: None)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_FOLDER
    shutil.rmtree(partial, ignore_errors=True)
    results: list[SceneResult] = []
    started = time.perf_counter()
    for number, scene in enumerate(scenes, start=1):
        final = out / scene.id
        if (final / COMPLETE_NAME).is_file():
            results.append(SceneResult.from_document(json.loads((final / RESULT_NAME).read_text())))
            report(f"scene {number}/{len(scenes)} {scene.id}: done earlier, skipped")
            continue
        shutil.rmtree(final, ignore_errors=True)
        work = partial / scene.id
        scene_started = time.perf_counter()
        try:
            outputs = work / "outputs"
            views = _run_scene(
                scene, work, outputs, model, options, formats, export_options, sampling
            )
            result = SceneResult(
                scene.id,
                "done",
                views=views,
                seconds=round(time.perf_counter() - scene_started, 3),
                folder=scene.id,
                files=tuple(
                    sorted(
                        p.relative_to(outputs).as_posix() for p in outputs.rglob("*") if p.is_file()
                    )
                ),
            )
            (outputs / RESULT_NAME).write_text(json.dumps(result.document(), indent=2))
            (outputs / COMPLETE_NAME).write_text("")
            os.replace(outputs, final)
        # Any failure of a scene (bad input, decoding, the model, a full disk) is its row.
        except Exception as error:
            result = SceneResult(
                scene.id,
                "failed",
                seconds=round(time.perf_counter() - scene_started, 3),
                error=f"{type(error).__name__}: {error}",
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(result)
        done = sum(r.status == "done" for r in results)
        failed = len(results) - done
        elapsed = time.perf_counter() - started
        report(
            f"scene {number}/{len(scenes)} {scene.id}: {result.status} in {result.seconds:.1f}s "
            f"({done} done, {failed} failed, {len(scenes) - number} to go, "
            f"{elapsed / number * (len(scenes) - number):.0f}s left)"
        )
    _write_index(out, results)
    shutil.rmtree(partial, ignore_errors=True)
    return results


def _run_scene(
    scene: Scene,
    work: Path,
    outputs: Path,
    model: DepthAnything3,
    options: InferenceOptions | None,
    formats: Sequence[str],
    export_options: dict[str, Any] | None,
    sampling: FrameSampling,
) -> int:
    views = expand_inputs(scene.inputs, work / "frames", sampling)
    check_images(views)
    cameras = None
    if scene.cameras is not None:
        cameras = read_camera_file(scene.cameras, len(views), label=str(scene.cameras))
    prediction = model.predict(
        [str(view) for view in views],
        extrinsics=None if cameras is None else cameras.extrinsics,
        intrinsics=None if cameras is None else cameras.intrinsics,
        options=options,
    )
    export_all(prediction, outputs, list(formats), **(export_options or {}))
    return len(prediction.views)


def _write_index(out: Path, results: Sequence[SceneResult]) -> None:
    temporary = out / f".{INDEX_NAME}.{os.getpid()}"
    temporary.write_text("".join(json.dumps(r.document()) + "\n" for r in results))
    os.replace(temporary, out / INDEX_NAME)
