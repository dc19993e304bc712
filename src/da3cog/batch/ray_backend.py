"""Scenes on a Ray cluster through Ray Data (the ``batch`` extra: ``pip install
'da3cog[batch]'``).

The manifest's pending scenes become a dataset of small rows (the scene as JSON: no decoded
pixels move between machines); ``map_batches`` runs them one at a time on a pool of actors,
each of which loads the model once (:class:`SceneActor`) and reuses it for every scene it is
given. Each actor reads its scene's inputs and writes its outputs itself; only the result row
comes back. Ray Data restarts an actor that dies and resubmits its scene (at-least-once: the
scene's staging folder is unique per attempt and :meth:`OutputRoot.publish` keeps the first
one that lands).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from da3cog.batch.manifest import Scene
from da3cog.batch.storage import OutputRoot
from da3cog.batch.worker import BatchSettings, SceneResult, SceneRunner


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a batch runs on Ray.

    Attributes:
        address: the cluster (``auto`` for the one ``ray start`` runs here, ``ray://host:10001``
            for a remote one); None starts a local one for this run (or uses the one this
            process already joined).
        min_actors: the pool's lower bound.
        max_actors: its upper bound; None for one actor per GPU of the cluster when actors
            take GPUs, else 1 (a CPU actor already uses every core it is given for torch).
        gpus_per_actor: GPUs each actor reserves; None for 1 when the cluster has GPUs, else 0.
        cpus_per_actor: CPUs each actor reserves.
    """

    address: str | None = None
    min_actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.min_actors < 1:
            raise ValueError(f"the pool needs at least 1 actor, got {self.min_actors}")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(
                f"max actors ({self.max_actors}) is below min actors ({self.min_actors})"
            )
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"GPUs per actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"CPUs per actor must be > 0, got {self.cpus_per_actor}")


class SceneActor:
    """A Ray Data actor: one model, loaded when the actor starts, for every scene it runs.

    A model that cannot load on this worker (a Hub download failing on one node) does not
    fail the job: each scene given to this actor becomes an error row saying so."""

    def __init__(self, settings: BatchSettings, root: str) -> None:
        self.runner: SceneRunner | None = None
        self.load_error: str | None = None
        try:
            model = settings.load_model()
        # The message of whatever stopped the load is what the user needs in the index.
        except Exception as error:
            self.load_error = f"model {settings.model!r} did not load on this worker: {error}"
        else:
            self.runner = SceneRunner(model, settings, OutputRoot(root))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        results = []
        for text in batch["scene"]:
            scene = Scene.from_document(json.loads(str(text)))
            if self.runner is None:
                result = SceneResult(scene.id, "failed", error=self.load_error)
            else:
                result = self.runner.run(scene)
            results.append(json.dumps(result.document()))
        return {"result": results}


def run_on_ray(
    scenes: Sequence[Scene], settings: BatchSettings, root: OutputRoot, options: RayOptions
) -> Iterator[SceneResult]:
    """The result of every scene of ``scenes``, in the order they finish."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--ray needs Ray Data: pip install 'da3cog[batch]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=options.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    # Ray Data's execution reports (plans, statistics, the notice that its bars are off) go
    # to its log file; the batch's own progress is what the user reads.
    data_logger = logging.getLogger("ray.data")
    data_level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        gpus, actors = _pool(ray.cluster_resources(), options)
        context = ray.data.DataContext.get_current()
        # Our own progress line replaces Ray Data's bars.
        context.enable_progress_bars = False
        rows = [{"scene": json.dumps(scene.document())} for scene in scenes]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        dataset = dataset.map_batches(
            SceneActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                min_size=min(options.min_actors, actors), max_size=actors
            ),
            num_gpus=gpus,
            num_cpus=options.cpus_per_actor,
            fn_constructor_kwargs={"settings": _for_actors(settings, gpus), "root": root.location},
        )
        for row in dataset.iter_rows():
            yield SceneResult.from_document(json.loads(row["result"]))
    finally:
        data_logger.setLevel(data_level)
        if started_here:
            ray.shutdown()


def _pool(resources: dict[str, Any], options: RayOptions) -> tuple[float, int]:
    """GPUs per actor and the pool's upper bound for a cluster with ``resources``."""
    cluster_gpus = int(resources.get("GPU", 0))
    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus else 0.0
    if gpus > cluster_gpus:
        raise ValueError(f"each actor asks for {gpus:g} GPU(s) but the cluster has {cluster_gpus}")
    actors = options.max_actors
    if actors is None:
        actors = max(options.min_actors, int(cluster_gpus // gpus) if gpus else 1)
    return gpus, actors


def _for_actors(settings: BatchSettings, gpus: float) -> BatchSettings:
    """Actors without a GPU run on the CPU even on a machine that has one (torch would pick
    the GPU Ray did not give them)."""
    if settings.device is None and gpus == 0:
        from dataclasses import replace

        return replace(settings, device="cpu")
    return settings
