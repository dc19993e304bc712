"""Pieces shared by DA3's dense heads: token-to-map projection, the fusion pyramid and the UV
sinusoidal position embedding."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from da3cog.model.presets import DPTSpec

# Above this many output elements F.interpolate overflows 32-bit indexing on some backends.
_INTERPOLATE_MAX_ELEMENTS = 1_610_612_736


def interpolate_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize ``(N, C, h, w) -> (N, C, *size)`` with aligned corners, chunked over N
    when the output would be too large for one kernel call."""
    total = size[0] * size[1] * x.shape[0] * x.shape[1]
    if total <= _INTERPOLATE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = torch.chunk(x, chunks=total // _INTERPOLATE_MAX_ELEMENTS + 1, dim=0)
    return torch.cat(
        [F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks]
    )


def views_at_a_time(
    function: Callable[..., torch.Tensor], views: int, *batches: torch.Tensor
) -> torch.Tensor:
    """``function`` applied to ``views`` images at a time of every ``(N, ...)`` batch, the
    results concatenated over N. The heads' full-resolution tails hold the largest activations
    of the network; one image at a time (``views=1``) they need 1/N of that memory at the same
    speed on a CPU, while a GPU, bound by kernel launches there, is faster over many at once
    (the pipeline picks ``views`` from the memory model). Results agree to float rounding (the
    backend may pick another convolution algorithm for another batch size; for the DA3 heads
    on the CPU they were bit-identical in every case tried)."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    if len({batch.shape[0] for batch in batches}) != 1:
        raise ValueError(f"batches of different sizes: {[batch.shape[0] for batch in batches]}")
    groups = zip(*(batch.split(views) for batch in batches), strict=True)
    return torch.cat([function(*parts) for parts in groups])


def _sincos_embedding(dim: int, positions: torch.Tensor, omega_0: float = 100.0) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float32, device=positions.device)
    omega /= dim / 2.0
    omega = 1.0 / omega_0**omega
    angles = positions.reshape(-1)[:, None] * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def add_uv_position_embedding(x: torch.Tensor, image_height: int, image_width: int) -> torch.Tensor:
    """Add 0.1 x a sinusoidal embedding of normalised UV coordinates to feature maps
    ``(N, C, h, w)``; UV spans the image diagonal-normalised extent of ``image_width /
    image_height``."""
    height, width, channels = x.shape[-2], x.shape[-1], x.shape[1]
    aspect = image_width / image_height
    diagonal = (aspect**2 + 1.0) ** 0.5
    span_x, span_y = aspect / diagonal, 1.0 / diagonal
    xs = torch.linspace(
        -span_x * (width - 1) / width,
        span_x * (width - 1) / width,
        steps=width,
        dtype=x.dtype,
        device=x.device,
    )
    ys = torch.linspace(
        -span_y * (height - 1) / height,
        span_y * (height - 1) / height,
        steps=height,
        dtype=x.dtype,
        device=x.device,
    )
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    uv = torch.stack((uu, vv), dim=-1).reshape(-1, 2)
    embedding = torch.cat(
        [_sincos_embedding(channels // 2, uv[:, 0]), _sincos_embedding(channels // 2, uv[:, 1])],
        dim=-1,
    ).view(height, width, channels)
    return x + (embedding * 0.1).permute(2, 0, 1)[None]


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """Top-down fusion: add the refined lateral input, refine, upsample, 1x1 projection."""

    def __init__(self, features: int, has_lateral: bool = True) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_lateral else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0, bias=True)

    def forward(
        self,
        top: torch.Tensor,
        lateral: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if self.resConfUnit1 is not None and lateral is not None:
            top = top + self.resConfUnit1(lateral)
        top = self.resConfUnit2(top)
        if size is None:
            size = (top.shape[-2] * 2, top.shape[-1] * 2)
        return self.out_conv(interpolate_bilinear(top, size))


class TokenPyramid(nn.Module):
    """Patch tokens of four layers -> four feature maps at 4x, 2x, 1x and 1/2x the patch grid,
    each projected to the fusion width (``scratch.layer*_rn``)."""

    def __init__(
        self, dim_in: int, spec: DPTSpec, pre_norm: bool, position_embedding: bool
    ) -> None:
        super().__init__()
        channels = spec.out_channels
        self.position_embedding = position_embedding
        self.norm: nn.Module = nn.LayerNorm(dim_in) if pre_norm else nn.Identity()
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1, 1, 0) for c in channels)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(channels[0], channels[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(channels[1], channels[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(channels[3], channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for level, c in enumerate(channels, start=1):
            setattr(
                self.scratch,
                f"layer{level}_rn",
                nn.Conv2d(c, spec.features, 3, 1, 1, bias=False),
            )

    def pyramid(
        self, features: list[torch.Tensor], image_height: int, image_width: int, patch_size: int
    ) -> list[torch.Tensor]:
        """features: four ``(N, h*w, dim_in)`` -> four ``(N, fusion width, ...)`` maps."""
        rows, cols = image_height // patch_size, image_width // patch_size
        maps = []
        for level, tokens in enumerate(features):
            x = self.norm(tokens)
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], rows, cols)
            x = self.projects[level](x)
            if self.position_embedding:
                x = add_uv_position_embedding(x, image_height, image_width)
            x = self.resize_layers[level](x)
            maps.append(getattr(self.scratch, f"layer{level + 1}_rn")(x))
        return maps


def make_refinenets(scratch: nn.Module, features: int, suffix: str = "") -> None:
    """Attach ``refinenet1..4{suffix}`` to ``scratch`` (refinenet4 has no lateral input)."""
    for level in range(1, 5):
        setattr(scratch, f"refinenet{level}{suffix}", FusionBlock(features, has_lateral=level < 4))


def fuse(scratch: nn.Module, maps: list[torch.Tensor], suffix: str = "") -> torch.Tensor:
    """Run the top-down fusion chain ``refinenet4 -> 1`` (with ``suffix``) over four maps."""
    level1, level2, level3, level4 = maps
    x = getattr(scratch, f"refinenet4{suffix}")(level4, size=level3.shape[2:])
    x = getattr(scratch, f"refinenet3{suffix}")(x, level3, size=level2.shape[2:])
    x = getattr(scratch, f"refinenet2{suffix}")(x, level2, size=level1.shape[2:])
    return getattr(scratch, f"refinenet1{suffix}")(x, level1)
