"""DualDPT: DA3's any-view head, predicting depth + confidence and a ray map + confidence from
two fusion chains over the same token pyramid."""

from __future__ import annotations

from dataclasses import dataclass

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

_HIDDEN = 32
_RAY_CHANNELS = 6
# The official checkpoints carry four ray-head levels (a training-time deep supervision); only
# the finest one produces the output.
_RAY_LEVELS = 4


class Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


@dataclass(frozen=True)
class DualDPTOutput:
    """Head outputs for ``N`` images of size ``H x W``.

    Attributes:
        depth_logits: ``(N, H, W)`` before ``exp``.
        depth_conf_logits: ``(N, H, W)`` before ``exp(.) + 1``.
        rays: ``(N, h, w, 6)`` ray direction (3) and origin (3), ``h, w = 8 x patch grid``.
        ray_conf_logits: ``(N, h, w)`` before ``exp(.) + 1``.
    """

    depth_logits: torch.Tensor
    depth_conf_logits: torch.Tensor
    rays: torch.Tensor
    ray_conf_logits: torch.Tensor


class DualDPTHead(TokenPyramid):
    def __init__(self, dim_in: int, spec: DPTSpec, patch_size: int = 14) -> None:
        super().__init__(dim_in, spec, pre_norm=True, position_embedding=True)
        self.patch_size = patch_size
        features = spec.features
        make_refinenets(self.scratch, features)
        make_refinenets(self.scratch, features, suffix="_aux")
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, _HIDDEN, 3, 1, 1),
            # In place: the full-resolution convolution output is needed by nothing else.
            nn.ReLU(inplace=True),
            nn.Conv2d(_HIDDEN, 2, 1, 1, 0),
        )
        self.scratch.output_conv1_aux = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(features, features // 2, 3, 1, 1),
                nn.Conv2d(features // 2, features, 3, 1, 1),
                nn.Conv2d(features, features // 2, 3, 1, 1),
                nn.Conv2d(features // 2, features, 3, 1, 1),
                nn.Conv2d(features, features // 2, 3, 1, 1),
            )
            for _ in range(_RAY_LEVELS)
        )
        # One LayerNorm shared by every level, as trained: the official files store it once
        # (under level 0) and the loader ties the others to it.
        shared_norm = nn.LayerNorm(_HIDDEN)
        self.scratch.output_conv2_aux = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(features // 2, _HIDDEN, 3, 1, 1),
                Permute((0, 2, 3, 1)),
                shared_norm,
                Permute((0, 3, 1, 2)),
                nn.ReLU(),
                nn.Conv2d(_HIDDEN, _RAY_CHANNELS + 1, 1, 1, 0),
            )
            for _ in range(_RAY_LEVELS)
        )

    def forward(
        self,
        features: list[torch.Tensor],
        image_height: int,
        image_width: int,
        tail_views: int = 1,
    ) -> DualDPTOutput:
        """features: four ``(N, h*w, dim_in)`` tensors from the backbone's output layers;
        ``tail_views``: images the full-resolution depth tail runs on at once."""
        maps = self.pyramid(features, image_height, image_width, self.patch_size)
        scratch = self.scratch

        depth = scratch.output_conv1(fuse(scratch, maps))
        rows = image_height // self.patch_size * self.patch_size
        cols = image_width // self.patch_size * self.patch_size
        depth = views_at_a_time(
            lambda image: scratch.output_conv2(
                add_uv_position_embedding(
                    interpolate_bilinear(image, (rows, cols)), image_height, image_width
                )
            ),
            tail_views,
            depth,
        )

        rays = scratch.output_conv1_aux[-1](fuse(scratch, maps, suffix="_aux"))
        rays = add_uv_position_embedding(rays, image_height, image_width)
        rays = scratch.output_conv2_aux[-1](rays).permute(0, 2, 3, 1)
        return DualDPTOutput(
            depth_logits=depth[:, 0],
            depth_conf_logits=depth[:, 1],
            rays=rays[..., :_RAY_CHANNELS],
            ray_conf_logits=rays[..., _RAY_CHANNELS],
        )
