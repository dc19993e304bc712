"""da3cog: Depth Anything 3 as a library, a CLI and a Replicate model."""

from da3cog.pipeline import DepthAnything3, InferenceOptions, Prediction, ViewPrediction
from da3cog.weights import CheckpointError, load_model

__all__ = [
    "CheckpointError",
    "DepthAnything3",
    "InferenceOptions",
    "Prediction",
    "ViewPrediction",
    "load_model",
]
__version__ = "0.1.0"
