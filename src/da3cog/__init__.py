"""da3cog: Depth Anything 3 as a library, a CLI and a Replicate model.

Public names are imported on first use, so ``import da3cog.weights`` (or the CLI's ``--help``)
does not pay for the image-decoding stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from da3cog.pipeline import DepthAnything3, InferenceOptions, Prediction, ViewPrediction
    from da3cog.weights import CheckpointError, load_model

_EXPORTS = {
    "DepthAnything3": "da3cog.pipeline",
    "InferenceOptions": "da3cog.pipeline",
    "Prediction": "da3cog.pipeline",
    "ViewPrediction": "da3cog.pipeline",
    "CheckpointError": "da3cog.weights",
    "load_model": "da3cog.weights",
}
__all__ = [
    "CheckpointError",
    "DepthAnything3",
    "InferenceOptions",
    "Prediction",
    "ViewPrediction",
    "load_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'da3cog' has no attribute {name!r}")
