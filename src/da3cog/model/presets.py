"""DA3 variants as data: one frozen preset per official checkpoint family (any-view, mono,
metric and nested).

A preset fixes every architectural number; :func:`da3cog.model.network.build_network` turns
it into modules. Parameter counts are what the code builds (see tests/test_presets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


HeadKind = Literal["dual_dpt", "dpt"]
HEAD_KINDS: tuple[str, ...] = ("dual_dpt", "dpt")


@dataclass(frozen=True)
class ModelPreset:
    """One DA3 architecture.

    ``head_kind``: ``dual_dpt`` for the any-view models (depth + confidence and a ray map +
    confidence from two fusion chains) or ``dpt`` for the single-view models (depth and a sky
    score, no confidence). ``cameras``: the camera encoder (pose conditioning in) and decoder
    (cameras out) are part of the model; only any-view models have them.
    ``canonical_metric``: the depth output is metric for a 300-pixel focal length at the
    processing resolution (metres = output x focal / 300). ``gaussian_head``: the 3D Gaussian
    DPT head of the giant checkpoints. ``metric_branch``: nested models run this metric network
    beside the any-view one described by the other fields, and fit the any-view depth to it.
    """

    name: str
    backbone: BackboneSpec
    head: DPTSpec
    head_kind: HeadKind = "dual_dpt"
    cameras: bool = True
    canonical_metric: bool = False
    gaussian_head: DPTSpec | None = None
    metric_branch: ModelPreset | None = None
    license: str = "Apache-2.0"
    hub_repos: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.head_kind not in HEAD_KINDS:
            raise ValueError(f"{self.name}: head_kind must be one of {HEAD_KINDS}")
        if self.cameras != (self.head_kind == "dual_dpt"):
            # The camera decoder reads camera tokens, which only the any-view backbone makes.
            raise ValueError(f"{self.name}: only dual_dpt (any-view) presets have cameras")
        if self.gaussian_head is not None and self.head_kind != "dual_dpt":
            raise ValueError(f"{self.name}: the Gaussian head needs the any-view cameras")
        branch = self.metric_branch
        if branch is not None and (
            self.head_kind != "dual_dpt"
            or branch.metric_branch is not None
            or branch.head_kind != "dpt"
            or not branch.canonical_metric
        ):
            raise ValueError(
                f"{self.name}: a nested preset pairs an any-view network with a single-view "
                "canonical-metric one"
            )

    @property
    def camera_encoder_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def camera_decoder_dim(self) -> int:
        return self.backbone.feature_dim

    @property
    def is_nested(self) -> bool:
        return self.metric_branch is not None

    @property
    def has_sky(self) -> bool:
        """Whether predictions carry a sky score (single-view heads; nested via its branch)."""
        return self.head_kind == "dpt" or self.is_nested

    @property
    def has_gaussian_head(self) -> bool:
        return self.gaussian_head is not None

    @property
    def anyview_branch(self) -> ModelPreset:
        """A nested preset's any-view network alone (the preset itself otherwise)."""
        if self.metric_branch is None:
            return self
        return replace(self, name=f"{self.name}/anyview", metric_branch=None, hub_repos=())


_GIANT_BACKBONE = BackboneSpec(
    embed_dim=1536,
    depth=40,
    num_heads=24,
    out_layers=(19, 27, 33, 39),
    alt_start=13,
    qknorm_start=13,
    rope_start=13,
    feed_forward="swiglu",
)
_LARGE_HEAD = DPTSpec(features=256, out_channels=(256, 512, 1024, 1024))
# The single-view large models: a plain DINOv2 ViT-L (no cross-view attention, no camera token,
# no RoPE / QK-norm, no local+global concatenation) and a DPT head with a sky branch.
# DA3MONO-LARGE and DA3METRIC-LARGE share this architecture exactly; they differ in training
# and so in what their depth means.
_SINGLE_VIEW_LARGE_BACKBONE = BackboneSpec(
    embed_dim=1024,
    depth=24,
    num_heads=16,
    out_layers=(4, 11, 17, 23),
    alt_start=-1,
    qknorm_start=-1,
    rope_start=-1,
    cat_token=False,
)
METRIC_LARGE = ModelPreset(
    name="da3metric-large",
    backbone=_SINGLE_VIEW_LARGE_BACKBONE,
    head=_LARGE_HEAD,
    head_kind="dpt",
    cameras=False,
    canonical_metric=True,
    hub_repos=("depth-anything/DA3METRIC-LARGE",),
)
GIANT = ModelPreset(
    name="da3-giant",
    backbone=_GIANT_BACKBONE,
    head=_LARGE_HEAD,
    gaussian_head=_LARGE_HEAD,
    license="CC-BY-NC-4.0",
    hub_repos=("depth-anything/DA3-GIANT", "depth-anything/DA3-GIANT-1.1"),
)

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
        GIANT,
        ModelPreset(
            name="da3mono-large",
            backbone=_SINGLE_VIEW_LARGE_BACKBONE,
            head=_LARGE_HEAD,
            head_kind="dpt",
            cameras=False,
            hub_repos=("depth-anything/DA3MONO-LARGE",),
        ),
        METRIC_LARGE,
        replace(
            GIANT,
            name="da3nested-giant-large",
            metric_branch=METRIC_LARGE,
            hub_repos=(
                "depth-anything/DA3NESTED-GIANT-LARGE",
                "depth-anything/DA3NESTED-GIANT-LARGE-1.1",
            ),
        ),
    )
}

# Short names accepted wherever a model is chosen (CLI, cog inputs).
ALIASES: dict[str, str] = {
    "small": "da3-small",
    "base": "da3-base",
    "large": "da3-large",
    "giant": "da3-giant",
    "mono": "da3mono-large",
    "metric": "da3metric-large",
    "nested": "da3nested-giant-large",
}


def short_name(name: str) -> str:
    """The alias a user types for a preset (``da3nested-giant-large`` -> ``nested``), or the
    name itself when it has none: what messages call a model."""
    for alias, preset_name in ALIASES.items():
        if preset_name == name:
            return alias
    return name


def get_preset(name: str) -> ModelPreset:
    """Preset by name (``da3-small``) or alias (``small``); ValueError lists the known ones
    (short names; the full preset names are accepted too)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        known = ", ".join(short_name(preset) for preset in PRESETS)
        raise ValueError(
            f"unknown model {name!r}; known models: {known} (or their full names, "
            "e.g. da3-small)"
        )
    return PRESETS[key]
