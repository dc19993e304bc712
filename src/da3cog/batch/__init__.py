"""Many scenes: a manifest of scenes, each predicted and exported into its own folder, with an
index of results (:func:`da3cog.batch.runner.run_batch`), in this process or on a Ray cluster
(:mod:`da3cog.batch.ray_backend`)."""

from da3cog.batch.manifest import Scene, read_manifest
from da3cog.batch.ray_backend import RayOptions
from da3cog.batch.runner import BatchProgress, run_batch
from da3cog.batch.worker import BatchSettings, SceneResult

__all__ = [
    "BatchProgress",
    "BatchSettings",
    "RayOptions",
    "Scene",
    "SceneResult",
    "read_manifest",
    "run_batch",
]
