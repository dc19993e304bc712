"""GS-DPT: the per-pixel 3D Gaussian parameter head of the giant checkpoints.

This module predicts camera-space raw Gaussian parameters; turning them into world-space
Gaussians (the adapter) belongs to the Gaussian-splat feature.
"""

from __future__ import annotations

import torch
from torch import nn

from da3cog.model.dpt_blocks import (
    TokenPyramid,
    add_uv_position_embedding,
    fuse,
    interpolate_bilinear,
    make_refinenets,
    views_at_a_time,
)
from da3cog.model.presets import DPTSpec

# 37 raw Gaussian channels (depth offset, xy offset, scales, rotation, SH degree 2 colour)
# plus one density channel.
GAUSSIAN_CHANNELS = 38
_HIDDEN = 32


class GaussianHead(TokenPyramid):
    def __init__(self, dim_in: int, spec: DPTSpec, patch_size: int = 14) -> None:
        super().__init__(dim_in, spec, pre_norm=False, position_embedding=True)
        self.patch_size = patch_size
        features = spec.features
        make_refinenets(self.scratch, features)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, _HIDDEN, 3, 1, 1),
            # In place: the full-resolution convolution output is needed by nothing else.
            nn.ReLU(inplace=True),
            nn.Conv2d(_HIDDEN, GAUSSIAN_CHANNELS, 1, 1, 0),
        )
        merged = features // 2
        self.images_merger = nn.Sequential(
            nn.Conv2d(3, merged // 4, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(merged // 4, merged // 2, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(merged // 2, merged, 3, 1, 1),
            nn.GELU(),
        )

    def forward(
        self, features: list[torch.Tensor], images: torch.Tensor, tail_views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features: four ``(N, h*w, dim_in)``; images: ``(N, 3, H, W)`` normalised;
        ``tail_views``: images the full-resolution tail runs on at once.

        Returns raw parameters ``(N, H, W, 37)`` and densities in (0, 1) ``(N, H, W)``.
        """
        height, width = images.shape[-2:]
        maps = self.pyramid(features, height, width, self.patch_size)
        x = self.scratch.output_conv1(fuse(self.scratch, maps))

        def tail(neck: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
            full = interpolate_bilinear(neck, (height, width)) + self.images_merger(image)
            return self.scratch.output_conv2(add_uv_position_embedding(full, height, width))

        x = views_at_a_time(tail, tail_views, x, images).permute(0, 2, 3, 1)
        return x[..., :-1], torch.sigmoid(x[..., -1])
