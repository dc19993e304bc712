"""Exporters: a Prediction in, complete files out; they never modify the Prediction.

One module per format, each importing its heavier libraries only when called:

* :mod:`~da3cog.export.depth`: ``export_depth_npy``, ``export_depth_png16``,
  ``export_depth_vis``, ``export_confidence_png``
* :mod:`~da3cog.export.ply`: ``export_ply`` (fused point cloud)
* :mod:`~da3cog.export.glb`: ``export_glb`` (points + camera frustums, glTF axes)
* :mod:`~da3cog.export.cameras`: ``export_cameras_json``, ``export_transforms_json``
* :mod:`~da3cog.export.colmap`: ``export_colmap`` (text and / or binary sparse model)
* :mod:`~da3cog.export.npz`: ``export_npz`` / ``load_npz``
* :mod:`~da3cog.export.gaussians`: ``export_gaussians_ply`` (3D Gaussian Splatting PLY)
* :mod:`~da3cog.export.manifest`: ``export_all(prediction, folder, formats, **options)``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from da3cog.export.manifest import FORMATS, Manifest, export_all

_EXPORTS = {
    "FORMATS": "da3cog.export.manifest",
    "Manifest": "da3cog.export.manifest",
    "export_all": "da3cog.export.manifest",
}
__all__ = ["FORMATS", "Manifest", "export_all"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'da3cog.export' has no attribute {name!r}")
