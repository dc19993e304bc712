"""Many scenes: a manifest of scenes, each predicted and exported into its own folder, with an
index of results (:func:`da3cog.batch.runner.run_batch`). This is the in-process runner; the
Ray Data backend is not built yet."""

from da3cog.batch.manifest import Scene, read_manifest
from da3cog.batch.runner import SceneResult, run_batch

__all__ = ["Scene", "SceneResult", "read_manifest", "run_batch"]
