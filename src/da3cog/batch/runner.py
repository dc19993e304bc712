"""Run the scenes of a manifest, each into its own folder, in this process or on Ray.

Every scene is one unit of work (:class:`da3cog.batch.worker.SceneRunner`): its inputs are
read and checked by the worker that runs it, the model predicts it, its exports land in
``OUT/<scene>/`` with ``result.json`` and a completion marker last. A scene that fails becomes
a failed row with its message; the others go on. A rerun of the same command skips the scenes
whose folder is complete (a killed run resumes where it stopped; failed scenes are tried
again) and replaces what a killed run left half-written. The index (``OUT/index.jsonl``, and
``OUT/index.parquet`` with pyarrow) lists every scene of the manifest exactly once, in
manifest order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from da3cog.batch.manifest import Scene, check_scene_ids, scene_settings
from da3cog.batch.ray_backend import RayOptions, run_on_ray
from da3cog.batch.storage import OutputRoot
from da3cog.batch.worker import BatchSettings, SceneResult, SceneRunner
from da3cog.pipeline import DepthAnything3


@dataclass(frozen=True)
class BatchProgress:
    """Where a batch stands, after each scene.

    Attributes:
        total: scenes in the manifest.
        done: scenes done (skipped ones included).
        failed: scenes failed.
        skipped: scenes done by an earlier run.
        views: views predicted by this run.
        elapsed: seconds since this run's first scene started.
        last: the scene that just finished.
        resumed: True when ``last`` was done by an earlier run.
    """

    total: int
    done: int
    failed: int
    skipped: int
    views: int
    elapsed: float
    last: SceneResult
    resumed: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed

    @property
    def views_per_second(self) -> float:
        return self.views / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def message(self) -> str:
        last = self.last
        finished = self.done + self.failed
        head = f"scene {finished}/{self.total} {last.scene}: "
        if self.resumed:
            return head + "done earlier, skipped"
        ran = finished - self.skipped
        eta = self.elapsed / ran * self.remaining if ran else 0.0
        return head + (
            f"{last.status} in {last.seconds:.1f}s ({self.done} done, {self.failed} failed, "
            f"{self.remaining} to go, {self.views_per_second:.2f} views/s, {eta:.0f}s left)"
        )


def run_batch(
    scenes: Sequence[Scene],
    out: str | Path,
    settings: BatchSettings,
    *,
    model: DepthAnything3 | None = None,
    ray: RayOptions | None = None,
    progress: Callable[[BatchProgress], None] | None = None,
) -> list[SceneResult]:
    """Predict and export every scene (see the module docstring); returns the index rows in
    manifest order.

    Args:
        scenes: the manifest's scenes.
        out: the output folder, a path or an fsspec URI.
        settings: the model and the options every scene shares.
        model: an already loaded model for the in-process run (else loaded from
            ``settings.model`` when a scene needs it); not used with ``ray``.
        ray: run on Ray Data with these options instead of in this process.
        progress: called after each scene.
    """
    if ray is not None and model is not None:
        raise ValueError("with Ray each actor loads settings.model; do not pass a loaded model")
    check_scene_ids(scenes)
    # A scene's options with the batch's (the manifest checked them alone): a clash (say
    # chunk_overlap under the batch's chunk_size=None) is refused before any model loads.
    for scene in scenes:
        try:
            scene_settings(scene.options, settings.options, settings.formats, settings.sampling)
        except (TypeError, ValueError) as error:
            raise ValueError(f"scene {scene.id}: options: {error}") from None
    root = OutputRoot(out)
    root.prepare([scene.id for scene in scenes])
    results: dict[str, SceneResult] = {}
    pending: list[Scene] = []
    for scene in scenes:
        stored = root.completed(scene.id)
        if stored is None:
            pending.append(scene)
        else:
            results[scene.id] = SceneResult.from_document(stored)
    skipped = len(results)
    report = progress or (lambda _: None)
    for number, result in enumerate(results.values(), start=1):
        report(BatchProgress(len(scenes), number, 0, skipped, 0, 0.0, result, resumed=True))
    done, failed, views = skipped, 0, 0
    started = time.perf_counter()
    if pending:
        if ray is not None:
            from da3cog.weights import check_source

            check_source(settings.model)
            finished = run_on_ray(pending, settings, root, ray)
        else:
            finished = _in_process(pending, settings, root, model)
        for result in finished:
            if result.scene in results:
                continue
            results[result.scene] = result
            done += result.status == "done"
            failed += result.status != "done"
            views += result.views
            report(
                BatchProgress(
                    len(scenes), done, failed, skipped, views, time.perf_counter() - started, result
                )
            )
    ordered = [results[scene.id] for scene in scenes]
    root.write_index([result.document() for result in ordered])
    root.finish()
    return ordered


def _in_process(
    scenes: Sequence[Scene],
    settings: BatchSettings,
    root: OutputRoot,
    model: DepthAnything3 | None,
) -> Iterator[SceneResult]:
    runner = SceneRunner(model or settings.load_model(), settings, root)
    for scene in scenes:
        yield runner.run(scene)
