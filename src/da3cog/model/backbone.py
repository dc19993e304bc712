"""DINOv2 ViT backbone with DA3's any-view extensions.

Submodules live under ``pretrained`` so parameter names match the official checkpoints
(``backbone.pretrained.blocks.3.attn.qkv.weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from da3cog.model.presets import BackboneSpec
from da3cog.model.reference_view import (
    MIN_VIEWS_FOR_SELECTION,
    ReferenceStrategy,
    gather_views,
    inverse_order,
    reference_first_order,
    select_reference_view,
)
from da3cog.model.transformer import Block, RopePositions, RotaryEmbedding2D

# DINOv2's offset when resampling the position grid, kept for checkpoint compatibility.
_POS_EMBED_INTERPOLATE_OFFSET = 0.1


@dataclass(frozen=True)
class BackboneOutput:
    """Backbone features for the heads.

    Attributes:
        features: one ``(B, S, h*w, feature_dim)`` tensor per output layer (patch tokens only,
            local half raw, global half layer-normed; ``h, w`` = image size / 14).
        camera_tokens: one ``(B, S, feature_dim)`` tensor per output layer (token 0, raw).
        reference_view: ``(B,)`` index of the view used as reference, or None when the views
            kept their order.
    """

    features: tuple[torch.Tensor, ...]
    camera_tokens: tuple[torch.Tensor, ...]
    reference_view: torch.Tensor | None


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINOv2 ViT-S/B/L/G with alternating local / global attention, camera tokens, QK-norm and
    2-D RoPE from the blocks the spec names."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.embed_dim
        grid = spec.pretrain_image_size // spec.patch_size
        self.patch_embed = PatchEmbed(spec.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if spec.alt_start >= 0:
            # Learned reference (index 0) and source (index 1) camera tokens.
            self.camera_token = nn.Parameter(torch.zeros(1, 2, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        rope = RotaryEmbedding2D(spec.rope_frequency) if spec.rope_start >= 0 else None
        self.blocks = nn.ModuleList(
            Block(
                dim,
                spec.num_heads,
                mlp_ratio=spec.mlp_ratio,
                feed_forward=spec.feed_forward,
                norm_eps=1e-6,
                layer_scale=1.0,
                qk_norm=0 <= spec.qknorm_start <= index,
                rope=rope if 0 <= spec.rope_start <= index else None,
            )
            for index in range(spec.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def _position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        grid = self.pos_embed.shape[1] - 1
        side = math.isqrt(grid)
        if rows == cols == side:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        patch_pos = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # A scale factor (not a target size) fixes the sampling grid DINOv2 was trained with.
        patch_pos = F.interpolate(
            patch_pos,
            scale_factor=(
                (rows + _POS_EMBED_INTERPOLATE_OFFSET) / side,
                (cols + _POS_EMBED_INTERPOLATE_OFFSET) / side,
            ),
            mode="bicubic",
            antialias=False,
        )
        if patch_pos.shape[-2:] != (rows, cols):
            raise RuntimeError(
                f"position grid resampled to {patch_pos.shape[-2:]}, not {rows, cols}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)

    def _rope_positions(
        self, batch: int, views: int, rows: int, cols: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(B, S, 1 + rows*cols, 2)`` for local blocks (patch grid, 1-based, class
        token at 0) and global blocks (every patch at 1, so only patch vs token differs)."""
        grid = torch.cartesian_prod(
            torch.arange(rows, device=device), torch.arange(cols, device=device)
        )
        special = torch.zeros(1, 2, dtype=grid.dtype, device=device)
        local = torch.cat([special, grid + 1], dim=0)
        global_ = torch.cat([special, torch.ones_like(grid)], dim=0)
        return (
            local.expand(batch, views, -1, -1),
            global_.expand(batch, views, -1, -1),
        )

    def forward(
        self,
        images: torch.Tensor,
        camera_tokens: torch.Tensor | None,
        reference_strategy: ReferenceStrategy,
    ) -> BackboneOutput:
        """images: ``(B, S, 3, H, W)`` normalised, H and W multiples of 14; camera_tokens:
        ``(B, S, embed_dim)`` from the camera encoder, or None to use the learned tokens."""
        spec = self.spec
        batch, views, _, height, width = images.shape
        rows, cols = height // spec.patch_size, width // spec.patch_size
        x = self.patch_embed(images.flatten(0, 1))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._position_embedding(rows, cols)
        x = x.reshape(batch, views, x.shape[1], x.shape[2])
        local_grid, global_grid = self._rope_positions(batch, views, rows, cols, x.device)
        local_positions = RopePositions(local_grid.flatten(0, 1))
        global_positions = RopePositions(global_grid.reshape(batch, -1, 2))

        order: torch.Tensor | None = None
        reference: torch.Tensor | None = None
        multi_view = spec.alt_start >= 0
        local_x = x
        outputs: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if (
                multi_view
                and index == spec.alt_start - 1
                and views >= MIN_VIEWS_FOR_SELECTION
                and camera_tokens is None
            ):
                reference = select_reference_view(x[:, :, 0], reference_strategy)
                order = reference_first_order(reference, views)
                x = gather_views(x, order)
            if multi_view and index == spec.alt_start:
                tokens = camera_tokens
                if tokens is None:
                    tokens = torch.cat(
                        [
                            self.camera_token[:, :1].expand(batch, -1, -1),
                            self.camera_token[:, 1:].expand(batch, views - 1, -1),
                        ],
                        dim=1,
                    )
                x = torch.cat([tokens[:, :, None].to(x.dtype), x[:, :, 1:]], dim=2)
                local_x = x
            use_rope = block.attn.rope is not None
            if multi_view and index >= spec.alt_start and index % 2 == 1:
                tokens_per_view = x.shape[2]
                flat = x.reshape(batch, views * tokens_per_view, -1)
                positions = global_positions if use_rope else None
                x = block(flat, positions).reshape(batch, views, tokens_per_view, -1)
            else:
                flat = x.flatten(0, 1)
                positions = local_positions if use_rope else None
                x = block(flat, positions).reshape(x.shape)
                local_x = x
            if index in spec.out_layers:
                output = torch.cat([local_x, x], dim=-1) if spec.cat_token else x
                if order is not None:
                    output = gather_views(output, inverse_order(order))
                outputs.append(output)

        features, tokens_out = [], []
        dim = spec.embed_dim
        for output in outputs:
            tokens_out.append(output[:, :, 0])
            if spec.cat_token:
                normed = torch.cat([output[..., :dim], self.norm(output[..., dim:])], dim=-1)
            else:
                normed = self.norm(output)
            features.append(normed[:, :, 1:])
        return BackboneOutput(
            features=tuple(features), camera_tokens=tuple(tokens_out), reference_view=reference
        )


class Backbone(nn.Module):
    """Wrapper that puts the ViT under ``pretrained`` (the checkpoints' key prefix)."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.pretrained = VisionTransformer(spec)

    def forward(
        self,
        images: torch.Tensor,
        camera_tokens: torch.Tensor | None,
        reference_strategy: ReferenceStrategy,
    ) -> BackboneOutput:
        return self.pretrained(images, camera_tokens, reference_strategy)
