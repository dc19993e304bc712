"""DA3 networks: nn.Modules only (tensors in, typed results out)."""

from da3cog.model.network import (
    DepthAnything3Network,
    NestedDepthAnything3Network,
    NetworkOutput,
    build_network,
)
from da3cog.model.presets import PRESETS, ModelPreset, get_preset

__all__ = [
    "PRESETS",
    "DepthAnything3Network",
    "ModelPreset",
    "NestedDepthAnything3Network",
    "NetworkOutput",
    "build_network",
    "get_preset",
]
