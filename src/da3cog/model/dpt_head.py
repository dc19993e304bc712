"""DPT: the single-view head of DA3MONO-LARGE and DA3METRIC-LARGE, predicting depth and a sky
score from one fusion chain (no confidence, no ray map)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from da3cog.model.dpt_blocks import (
    TokenPyramid,
    fuse,
    interpolate_bilinear,
    make_refinenets,
    views_at_a_time,
)
from da3cog.model.presets import DPTSpec

_HIDDEN = 32


@dataclass(frozen=True)
class DPTOutput:
    """Head outputs for ``N`` images of size ``H x W``.

    Attributes:
        depth_logits: ``(N, H, W)`` before ``exp``.
        sky_logits: ``(N, H, W)`` before ``relu`` (the sky score is ``relu(sky_logits)``).
    """

    depth_logits: torch.Tensor
    sky_logits: torch.Tensor


def _output_branch(features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(features // 2, _HIDDEN, 3, 1, 1),
        # In place: the full-resolution convolution output is needed by nothing else.
        nn.ReLU(inplace=True),
        nn.Conv2d(_HIDDEN, 1, 1, 1, 0),
    )


class DPTHead(TokenPyramid):
    """Token pyramid (no pre-norm, no UV embedding, as trained) -> fusion -> a shared 3x3
    neck -> two 1-channel branches: depth (``output_conv2``) and sky (``sky_output_conv2``)."""

    def __init__(self, dim_in: int, spec: DPTSpec, patch_size: int = 14) -> None:
        super().__init__(dim_in, spec, pre_norm=False, position_embedding=False)
        self.patch_size = patch_size
        features = spec.features
        make_refinenets(self.scratch, features)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
        self.scratch.output_conv2 = _output_branch(features)
        self.scratch.sky_output_conv2 = _output_branch(features)

    def forward(
        self,
        features: list[torch.Tensor],
        image_height: int,
        image_width: int,
        tail_views: int = 1,
    ) -> DPTOutput:
        """features: four ``(N, h*w, dim_in)`` tensors from the backbone's output layers;
        ``tail_views``: images the full-resolution tail runs on at once."""
        maps = self.pyramid(features, image_height, image_width, self.patch_size)
        scratch = self.scratch
        neck = scratch.output_conv1(fuse(scratch, maps))
        rows = image_height // self.patch_size * self.patch_size
        cols = image_width // self.patch_size * self.patch_size

        def depth_and_sky(image: torch.Tensor) -> torch.Tensor:
            full = interpolate_bilinear(image, (rows, cols))
            return torch.stack(
                (scratch.output_conv2(full)[:, 0], scratch.sky_output_conv2(full)[:, 0]), dim=1
            )

        logits = views_at_a_time(depth_and_sky, tail_views, neck)
        return DPTOutput(depth_logits=logits[:, 0], sky_logits=logits[:, 1])
