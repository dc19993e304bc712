"""DA3 variants as data: one frozen preset per official any-view checkpoint family.

A preset fixes every architectural number; :func:`da3cog.model.network.build_network` turns
it into modules. Parameter counts are what the code builds (see tests/test_presets.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeedForward = Literal["mlp", "swiglu"]


@dataclass(frozen=True)
class BackboneSpec:
    """DINOv2 ViT with DA3's multi-view parts.

    ``alt_start``: first block of the alternating scheme (even blocks attend within a view, odd
    blocks across views) and where camera tokens replace the class token; ``qknorm_start`` and
    ``rope_start``: first blocks with QK-LayerNorm and 2-D rotary embeddings; ``out_layers``:
    blocks whose outputs feed the heads.
    """

    embed_dim: int
    depth: int
    num_heads: int
    out_layers: tuple[int, int, int, int]
    alt_start: int
    qknorm_start: int
    rope_start: int
    feed_forward: FeedForward = "mlp"
    cat_token: bool = True
    patch_size: int = 14
    pretrain_image_size: int = 518
    mlp_ratio: float = 4.0
    rope_frequency: float = 100.0

    @property
    def feature_dim(self) -> int:
        """Width of the features handed to the heads (local and global halves concatenated)."""
        return self.embed_dim * 2 if self.cat_token else self.embed_dim


@dataclass(frozen=True)
class DPTSpec:
    """A DPT decoder: fusion width and per-level projection widths."""

    features: int
    out_channels: tuple[int, int, int, int]


@dataclass(frozen=True)
class ModelPreset:
    """One DA3 architecture.

    ``gaussian_head``: the 3D Gaussian DPT head shipped in the giant checkpoints (its weights
    load with the model; Gaussians are decoded by the Gaussian issue's adapter).
    """

    name: str
    backbone: BackboneSpec
    head: DPTSpec
    gaussian_head: DPTSpec | None = None
    license: str = "Apache-2.0"
    hub_repos: tuple[str, ...] = ()

    @property
    def camera_encoder_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def camera_decoder_dim(self) -> int:
        return self.backbone.feature_dim


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="da3-small",
            backbone=BackboneSpec(
                embed_dim=384,
                depth=12,
                num_heads=6,
                out_layers=(5, 7, 9, 11),
                alt_start=4,
                qknorm_start=4,
                rope_start=4,
            ),
            head=DPTSpec(features=64, out_channels=(48, 96, 192, 384)),
            hub_repos=("depth-anything/DA3-SMALL",),
        ),
        ModelPreset(
            name="da3-base",
            backbone=BackboneSpec(
                embed_dim=768,
                depth=12,
                num_heads=12,
                out_layers=(5, 7, 9, 11),
                alt_start=4,
                qknorm_start=4,
                rope_start=4,
            ),
            head=DPTSpec(features=128, out_channels=(96, 192, 384, 768)),
            hub_repos=("depth-anything/DA3-BASE",),
        ),
        ModelPreset(
            name="da3-large",
            backbone=BackboneSpec(
                embed_dim=1024,
                depth=24,
                num_heads=16,
                out_layers=(11, 15, 19, 23),
                alt_start=8,
                qknorm_start=8,
                rope_start=8,
            ),
            head=DPTSpec(features=256, out_channels=(256, 512, 1024, 1024)),
            license="CC-BY-NC-4.0",
            hub_repos=("depth-anything/DA3-LARGE", "depth-anything/DA3-LARGE-1.1"),
        ),
        ModelPreset(
            name="da3-giant",
            backbone=BackboneSpec(
                embed_dim=1536,
                depth=40,
                num_heads=24,
                out_layers=(19, 27, 33, 39),
                alt_start=13,
                qknorm_start=13,
                rope_start=13,
                feed_forward="swiglu",
            ),
            head=DPTSpec(features=256, out_channels=(256, 512, 1024, 1024)),
            gaussian_head=DPTSpec(features=256, out_channels=(256, 512, 1024, 1024)),
            license="CC-BY-NC-4.0",
            hub_repos=("depth-anything/DA3-GIANT", "depth-anything/DA3-GIANT-1.1"),
        ),
    )
}

# Short names accepted wherever a model is chosen (CLI, cog inputs).
ALIASES: dict[str, str] = {
    "small": "da3-small",
    "base": "da3-base",
    "large": "da3-large",
    "giant": "da3-giant",
}


def get_preset(name: str) -> ModelPreset:
    """Preset by name (``da3-small``) or alias (``small``); ValueError lists the known ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        known = ", ".join(sorted([*PRESETS, *ALIASES]))
        raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
    return PRESETS[key]
