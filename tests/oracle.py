"""The parity oracle: upstream DA3 (``depth-anything-3==0.1.1``) built with random weights.

Test-only: product code never imports ``depth_anything_3``. Checkpoint folders are written with
the Hub mixin's own ``save_pretrained`` on a wrapper shaped like upstream's ``DepthAnything3``
(``self.model``, init argument ``model_name``), which gives exactly the official file layout,
shared-tensor de-duplication included. (Upstream's ``api`` module itself cannot be imported
here: it pulls torchvision, moviepy, pycolmap and more, while the network needs none of them.)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


def _object(path: str, name: str) -> dict:
    return {"__object__": {"path": f"depth_anything_3.model.{path}", "name": name,
                           "args": "as_params"}}


def small_configs() -> dict[str, dict]:
    """Upstream configs of ViT-S stand-ins for the big presets, derived from the official
    yaml files with only the sizes changed (ours: ``small_zoo.py``):

    * ``small-gs``: da3-small plus da3-giant's GS head (at da3-small's head size) and adapter;
    * ``metric-small``: da3metric-large (= da3mono-large) on a ViT-S;
    * ``nested-small``: upstream's nested network over those two.
    """
    from depth_anything_3.cfg import load_config
    from depth_anything_3.registry import MODEL_REGISTRY
    from omegaconf import OmegaConf

    def official(name: str) -> dict:
        return OmegaConf.to_container(load_config(MODEL_REGISTRY[name]))

    small, giant, metric = official("da3-small"), official("da3-giant"), official("da3metric-large")
    small_head = {"features": 64, "out_channels": [48, 96, 192, 384]}
    small_gs = {
        **small,
        "gs_head": {**giant["gs_head"], "dim_in": small["head"]["dim_in"], **small_head},
        "gs_adapter": giant["gs_adapter"],
    }
    metric_small = {
        **metric,
        "net": {**metric["net"], "name": "vits", "out_layers": [2, 5, 8, 11]},
        "head": {**metric["head"], "dim_in": 384, **small_head},
    }
    nested = {
        **_object("da3", "NestedDepthAnything3Net"),
        "anyview": small_gs,
        "metric": metric_small,
    }
    return {"small-gs": small_gs, "metric-small": metric_small, "nested-small": nested}


def build_upstream(model_name: str) -> nn.Module:
    """An official preset (upstream's registry names) or one of :func:`small_configs`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from depth_anything_3.cfg import create_object, load_config
        from depth_anything_3.registry import MODEL_REGISTRY
        from omegaconf import OmegaConf

        small = small_configs()
        if model_name in small:
            return create_object(OmegaConf.create(small[model_name])).eval()
        return create_object(load_config(MODEL_REGISTRY[model_name])).eval()


class UpstreamCheckpoint(nn.Module, PyTorchModelHubMixin):
    """Same attribute and init-argument names as upstream's ``DepthAnything3``."""

    def __init__(self, model_name: str = "da3-small") -> None:
        super().__init__()
        self.model_name = model_name
        self.model = build_upstream(model_name)


@torch.no_grad()
def rerandomize(module: nn.Module, seed: int) -> None:
    """Give every parameter seeded values that make outputs vary strongly across the image.

    PyTorch's default init makes DA3's final depth nearly constant, which would let a broken
    port pass a relative-error check; these scales keep activations O(1) through 40 blocks while
    every layer visibly shapes the output.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, param in module.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        shape = param.shape
        if name.endswith("fc_fov.0.bias"):  # fields of view around 1 rad, not clipped by ReLU
            values = 1.0 + 0.2 * torch.randn(shape, generator=generator)
        elif name.endswith("fc_fov.0.weight"):
            values = 0.1 * torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        elif name.endswith("gamma"):  # LayerScale
            values = 0.2 + 0.3 * torch.rand(shape, generator=generator)
        elif param.ndim == 1 and name.endswith("weight"):  # LayerNorms
            values = 1.0 + 0.2 * torch.randn(shape, generator=generator)
        elif param.ndim == 1:
            values = 0.1 * torch.randn(shape, generator=generator)
        elif "token" in name or "pos_embed" in name:
            values = torch.randn(shape, generator=generator)
        else:
            transposed = "resize_layers.0" in name or "resize_layers.1" in name
            fan_in = shape[0] if transposed else math.prod(shape[1:])
            values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        param.copy_(values)


def save_checkpoint(model_name: str, folder: Path, seed: int) -> UpstreamCheckpoint:
    wrapper = UpstreamCheckpoint(model_name)
    rerandomize(wrapper, seed)
    wrapper.save_pretrained(folder)
    return wrapper
