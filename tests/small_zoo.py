"""ViT-S stand-ins for the big presets (our side of ``oracle.small_configs``): the same code
paths as da3-giant's Gaussians, da3metric-large / da3mono-large and da3nested-giant-large at a
size CI can run in seconds. Not registered presets: tests build and load them directly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from da3cog.model.network import Network, build_network
from da3cog.model.presets import PRESETS, ModelPreset
from da3cog.pipeline import DepthAnything3
from da3cog.weights import KEY_PREFIX, WEIGHTS_NAME, LoadedModel, assign_weights

_SMALL = PRESETS["da3-small"]
_METRIC = PRESETS["da3metric-large"]

SMALL_GS = replace(_SMALL, name="small-gs", gaussian_head=_SMALL.head, hub_repos=())
METRIC_SMALL = replace(
    _METRIC,
    name="metric-small",
    backbone=replace(
        _METRIC.backbone, embed_dim=384, depth=12, num_heads=6, out_layers=(2, 5, 8, 11)
    ),
    head=_SMALL.head,
    hub_repos=(),
)
# da3mono-large has da3metric-large's architecture; only the meaning of its depth differs.
MONO_SMALL = replace(METRIC_SMALL, name="mono-small", canonical_metric=False)
NESTED_SMALL = replace(SMALL_GS, name="nested-small", metric_branch=METRIC_SMALL)
SMALL_ZOO: dict[str, ModelPreset] = {p.name: p for p in (SMALL_GS, METRIC_SMALL, NESTED_SMALL)}


def load_small(folder: Path, preset: ModelPreset) -> Network:
    """Our network for ``preset`` with the weights of a Hub-layout folder (strict, as
    ``load_model`` loads registered presets)."""
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        state = {k.removeprefix(KEY_PREFIX): handle.get_tensor(k) for k in handle.keys()}
    with torch.device("meta"):
        network = build_network(preset)
    assign_weights(network, state)
    return network


def small_model(folder: Path, preset: ModelPreset) -> DepthAnything3:
    """The pipeline on our network for ``preset`` loaded from ``folder``, on the CPU."""
    loaded = LoadedModel(load_small(folder, preset), preset, preset.name, folder)
    return DepthAnything3(loaded, torch.device("cpu"))


