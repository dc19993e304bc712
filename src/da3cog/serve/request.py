"""Check a request and decide how to run it, before any image is decoded or model loaded.

Everything here is cheap and runs first, so a request that cannot work fails with a message
that says why (and what would work) instead of after minutes on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from da3cog.io.cameras import CameraFileError, UserCameras, read_camera_file
from da3cog.model.presets import PRESETS, ModelPreset
from da3cog.serve.inputs import INPUTS_BY_NAME, REQUIRED
from da3cog.weights import VERSION_SEPARATOR, hub_repo, hub_versions

# The any-view preset behind each model_size.
SIZE_PRESETS: dict[str, str] = {
    "giant": "da3-giant",
    "large": "da3-large",
    "base": "da3-base",
    "small": "da3-small",
}
NESTED_PRESET = "da3nested-giant-large"
METRIC_PRESET = "da3metric-large"

# export_format -> the da3cog exporters it asks for (see da3cog.export.manifest.FORMATS).
EXPORT_FORMATS_MAP: dict[str, tuple[str, ...]] = {
    "glb": ("glb",),
    "ply": ("ply",),
    "npz": ("npz",),
    "colmap": ("colmap",),
    "all": ("all",),
    "none": (),
}
# Formats that place points in space: they need intrinsics for every view.
POINT_FORMATS = frozenset({"glb", "ply", "colmap"})


class RequestError(ValueError):
    """The request cannot be run as given; the message says why and what would work."""


@dataclass(frozen=True)
class RequestValues:
    """The inputs of one request, as ``Runner.run`` received them (see
    :mod:`da3cog.serve.inputs` for their meaning)."""

    image: Path
    images: tuple[Path, ...] = ()
    mode: str = "multi-view"
    model_size: str = "giant"
    checkpoint_version: str = "latest"
    metric: bool = False
    export_format: str = "glb"
    cameras: Path | None = None
    process_resolution: int = 504
    output_resolution: str = "input"
    confidence_percentile: float = 40.0
    max_points: int = 1_000_000
    render_video: bool = False
    video_fps: float = 2.0
    max_frames: int = 32
    loop_closure: bool = False
    seed: int = 42

    def as_document(self) -> dict[str, Any]:
        """JSON-ready values for the manifest (file inputs by name only)."""
        document: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Path):
                value = value.name
            elif isinstance(value, tuple):
                value = [v.name for v in value]
            document[item.name] = value
        return document


def check_values(values: RequestValues) -> None:
    """Enforce the choices and bounds of :data:`da3cog.serve.inputs.INPUTS` (the cog server
    checks them already; this covers direct callers)."""
    for item in fields(values):
        spec = INPUTS_BY_NAME[item.name]
        value = getattr(values, item.name)
        if spec.default is REQUIRED and value is None:
            raise RequestError(f"{item.name} is required")
        if spec.choices is not None and value not in spec.choices:
            raise RequestError(
                f"{item.name} must be one of {', '.join(spec.choices)}, got {value!r}"
            )
        if spec.ge is not None or spec.le is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{item.name} must be a number, got {value!r}")
            if not math.isfinite(value) or not spec.ge <= value <= spec.le:
                raise RequestError(
                    f"{item.name} must be between {spec.ge} and {spec.le}, got {value!r}"
                )


@dataclass(frozen=True)
class ModelChoice:
    """Which checkpoint answers a request.

    Attributes:
        preset: the preset name (``da3-giant``...).
        reason: one line for the logs and the manifest.
        version: the release (``"1.1"``); None: the preset's newest.
    """

    preset: str
    reason: str
    version: str | None = None

    @property
    def spec(self) -> ModelPreset:
        return PRESETS[self.preset]

    @property
    def key(self) -> str:
        """The model spec (``da3-giant``, ``da3-giant@1.0``): the cache key and the folder
        name under ``$DA3COG_WEIGHTS_DIR``; the newest release is the bare preset name."""
        if self.version is None or self.version == next(iter(hub_versions(self.preset))):
            return self.preset
        return f"{self.preset}{VERSION_SEPARATOR}{self.version}"

    @property
    def hub_id(self) -> str:
        return hub_repo(self.preset, self.version)


def gaussian_models_text() -> str:
    return (
        "model_size=giant (DA3-GIANT), or model_size=giant with metric=true (DA3NESTED-GIANT-LARGE)"
    )


def choose_model(
    mode: str, model_size: str, metric: bool, checkpoint_version: str = "latest"
) -> ModelChoice:
    """The checkpoint for ``mode`` / ``model_size`` / ``metric`` / ``checkpoint_version``
    (``latest`` or a release, see :func:`da3cog.weights.hub_versions`), or RequestError.

    Decisions (documented in docs/replicate.md): metric depth comes from DA3NESTED-GIANT-LARGE for
    model_size=giant in any mode, and from DA3METRIC-LARGE for model_size=large in monocular
    mode (a single-view model); nothing is switched silently, because a switch changes the
    licence, the cost and what the result means. gaussian-splat needs a Gaussian head, which
    only the giant checkpoints have.
    """
    if model_size not in SIZE_PRESETS:
        raise RequestError(f"model_size must be one of {', '.join(SIZE_PRESETS)}")
    if metric:
        if model_size == "giant":
            choice = ModelChoice(
                NESTED_PRESET,
                "metric=true with model_size=giant: DA3NESTED-GIANT-LARGE (giant any-view "
                "network scaled to metres by its metric branch)",
            )
        elif model_size == "large" and mode == "monocular":
            choice = ModelChoice(
                METRIC_PRESET,
                "metric=true with model_size=large in monocular mode: DA3METRIC-LARGE "
                "(single-view, metres from the focal length)",
            )
        else:
            raise RequestError(
                f"metric depth is not available for model_size={model_size} in mode={mode}: "
                "use model_size=giant (DA3NESTED-GIANT-LARGE, any mode) or model_size=large "
                "with mode=monocular (DA3METRIC-LARGE, needs focal lengths from `cameras` or "
                "EXIF)"
            )
    else:
        choice = ModelChoice(SIZE_PRESETS[model_size], f"model_size={model_size}")
    if mode == "gaussian-splat" and not choice.spec.has_gaussian_head:
        raise RequestError(
            f"mode=gaussian-splat needs a model with a Gaussian head, and model_size="
            f"{model_size} has none: use {gaussian_models_text()}"
        )
    if checkpoint_version == "latest":
        return choice
    versions = hub_versions(choice.preset)
    if checkpoint_version not in versions:
        known = ", ".join(f"{v} ({repo.split('/')[-1]})" for v, repo in versions.items())
        raise RequestError(
            f"checkpoint_version={checkpoint_version}: {choice.preset} has no such release; "
            f"its releases: {known}. Use checkpoint_version=latest."
        )
    reason = f"{choice.reason}, checkpoint_version={checkpoint_version}"
    return ModelChoice(choice.preset, reason, checkpoint_version)


def read_cameras(path: Path, view_count: int, label: str = "cameras") -> UserCameras:
    """Parse the ``cameras`` input for ``view_count`` views (see :mod:`da3cog.io.cameras`);
    messages name it ``label``."""
    try:
        return read_camera_file(path, view_count, label=label)
    except CameraFileError as error:
        raise RequestError(str(error)) from error


def check_cameras(cameras: UserCameras | None, preset: ModelPreset) -> None:
    """What each kind of model does with the given cameras (the pipeline's own rules)."""
    if cameras is None:
        return
    if not preset.cameras:
        if cameras.extrinsics is not None:
            raise RequestError(
                f"{preset.name} is a single-view model: it takes no camera poses; give "
                "'intrinsics' alone to set its focal lengths"
            )
    elif cameras.intrinsics is None:
        raise RequestError("pose-conditioned depth needs 'intrinsics' as well as 'extrinsics'")
    elif cameras.extrinsics is None:
        raise RequestError(
            "'intrinsics' alone are used only by the metric model (model_size=large, "
            "metric=true, mode=monocular); any-view models need 'extrinsics' too"
        )


def check_formats(
    values: RequestValues,
    preset: ModelPreset,
    cameras: UserCameras | None,
    views_without_focal: list[str],
) -> None:
    """Point formats need intrinsics for every view: single-view models only have them from
    ``cameras`` or EXIF (``views_without_focal``: views with neither)."""
    formats = set(EXPORT_FORMATS_MAP[values.export_format])
    if preset.cameras or not formats & POINT_FORMATS:
        return
    if cameras is not None and cameras.intrinsics is not None:
        return
    if views_without_focal:
        listed = ", ".join(views_without_focal[:5])
        more = "..." if len(views_without_focal) > 5 else ""
        raise RequestError(
            f"export_format={values.export_format} places points in space, which needs focal "
            f"lengths, and {preset.name} estimates none: view(s) {listed}{more} have no EXIF "
            "focal length. Give 'intrinsics' in `cameras`, choose export_format npz or none, "
            "or use model_size=giant with metric=true"
        )
