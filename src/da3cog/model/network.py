"""The DA3 networks: any-view (backbone + DualDPT head + camera encoder / decoder + optional GS
head), single-view (backbone + DPT head with sky) and nested (one of each, metric-scaled)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from da3cog.geometry import cameras_from_rays, invert_rigid
from da3cog.model.backbone import Backbone, BackboneOutput
from da3cog.model.camera import CameraDecoder, CameraEncoder, decode_pose
from da3cog.model.dpt_head import DPTHead, DPTOutput
from da3cog.model.dual_dpt import DualDPTHead, DualDPTOutput
from da3cog.model.gaussian_adapter import GaussianParameters, Gaussians, build_gaussians
from da3cog.model.gaussian_head import GaussianHead
from da3cog.model.metric import (
    canonical_to_metric,
    fill_sky_far,
    fill_sky_relative,
    fit_metric_scale,
)
from da3cog.model.presets import PRESETS, ModelPreset, short_name
from da3cog.model.reference_view import ReferenceStrategy, check_strategy

# Images per head call at least (more when the full-resolution tails run over more at once):
# bounds the head's activation memory for long sequences (da3cog.memory counts it).
HEAD_CHUNK_VIEWS = 8


@dataclass(frozen=True)
class NetworkOutput:
    """Raw network predictions for ``B`` scenes of ``S`` views at processing size ``H x W``.

    Attributes:
        depth: ``(B, S, H, W)`` z-depth. Any-view and mono models: relative scale; metric
            model: canonical (metres for a 300-pixel focal, see :mod:`da3cog.model.metric`);
            nested models: metres for every scene whose ``metric_scales`` entry is set,
            relative otherwise. Single-view and nested models give sky pixels a far value.
        depth_conf: ``(B, S, H, W)`` confidence (> 1, higher is better; nested: 1 on sky), or
            None for single-view models, which predict none.
        extrinsics: ``(B, S, 3, 4)`` world-to-camera, OpenCV axes, in the network's own world
            frame (not anchored to any view), depth's unit; None for single-view models.
        intrinsics: ``(B, S, 3, 3)`` in pixels of the ``H x W`` processing image; None for
            single-view models.
        rays: ``(B, S, h, w, 6)`` ray map (direction, origin), ``h, w`` = 8 x patch grid; None
            for single-view models.
        ray_conf: ``(B, S, h, w)`` ray confidence; None for single-view models.
        head: the head's pre-activation outputs, views flattened (diagnostics and parity);
            None when the forward ran with ``keep_intermediates=False``.
        backbone: the backbone's outputs (diagnostics and parity); None as ``head``.
        sky: ``(B, S, H, W)`` sky score (sky where >= ``SKY_THRESHOLD``) for single-view and
            nested models (from the metric branch), else None.
        gaussian_parameters: the GS head's per-pixel outputs and the depth they sit on, when
            Gaussians were requested.
        gaussians: world-space Gaussians built with ``extrinsics`` and ``intrinsics`` (the
            predicted cameras, even when poses were given for conditioning), in depth's unit;
            when requested and ``place_gaussians``.
        metric_scales: nested models: per scene the factor that took the any-view depth to
            metres (applied to depth, extrinsic translations and Gaussians), or None where it
            could not be fitted (too few non-sky pixels); None for other models.
        metric: nested models: the metric branch's own output (canonical depth, sky).
        reference_view: ``(B,)`` index of the view the backbone used as reference, or None
            when the views kept their order.
    """

    depth: torch.Tensor
    depth_conf: torch.Tensor | None
    extrinsics: torch.Tensor | None
    intrinsics: torch.Tensor | None
    rays: torch.Tensor | None
    ray_conf: torch.Tensor | None
    head: DualDPTOutput | DPTOutput | None
    backbone: BackboneOutput | None
    sky: torch.Tensor | None = None
    gaussian_parameters: GaussianParameters | None = None
    gaussians: Gaussians | None = None
    metric_scales: tuple[float | None, ...] | None = None
    metric: NetworkOutput | None = None
    reference_view: torch.Tensor | None = None


def gaussian_models() -> list[str]:
    """Short names of the models whose checkpoints carry a Gaussian head (``giant``,
    ``nested``)."""
    return [short_name(name) for name, preset in PRESETS.items() if preset.has_gaussian_head]


def _check_request(
    preset: ModelPreset,
    extrinsics: torch.Tensor | None,
    intrinsics: torch.Tensor | None,
    pose_from_rays: bool,
    infer_gaussians: bool,
) -> None:
    if (extrinsics is None) != (intrinsics is None):
        raise ValueError("pose conditioning needs both extrinsics and intrinsics")
    if extrinsics is not None and not preset.cameras:
        raise ValueError(f"{preset.name} is a single-view model: it takes no camera poses")
    if pose_from_rays and not preset.cameras:
        raise ValueError(f"{preset.name} is a single-view model: it has no ray map to pose from")
    if infer_gaussians and not preset.has_gaussian_head:
        raise ValueError(
            f"{short_name(preset.name)} has no Gaussian head; models with one: "
            f"{', '.join(gaussian_models())}"
        )


def _run_in_chunks(
    head: nn.Module, features: list[torch.Tensor], *args: torch.Tensor | int, tail_views: int
) -> object:
    """Run a head over images in chunks of ``max(HEAD_CHUNK_VIEWS, tail_views)``, its
    full-resolution tail over ``tail_views`` of them at a time, and concatenate its outputs: a
    dataclass of tensors (fields concatenated) or a tuple of tensors."""
    count = features[0].shape[0]
    size = max(HEAD_CHUNK_VIEWS, tail_views)
    chunks = []
    for start in range(0, count, size):
        part = slice(start, start + size)
        chunk_args = [a[part] if isinstance(a, torch.Tensor) else a for a in args]
        chunks.append(head([f[part] for f in features], *chunk_args, tail_views=tail_views))
    first = chunks[0]
    if isinstance(first, tuple):
        return tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))
    return type(first)(
        *(torch.cat([getattr(c, name) for c in chunks]) for name in first.__dataclass_fields__)
    )


class DepthAnything3Network(nn.Module):
    """Tensors in, :class:`NetworkOutput` out; no files, no device picking.

    One class for the any-view presets (DualDPT head, camera encoder / decoder, optional GS
    head) and the single-view ones (DPT head with sky, no cameras)."""

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        if preset.is_nested:
            raise ValueError(f"{preset.name} is nested: build it with build_network")
        self.preset = preset
        spec = preset.backbone
        self.backbone = Backbone(spec)
        self.head: DualDPTHead | DPTHead = (
            DualDPTHead(spec.feature_dim, preset.head, spec.patch_size)
            if preset.head_kind == "dual_dpt"
            else DPTHead(spec.feature_dim, preset.head, spec.patch_size)
        )
        if preset.cameras:
            self.cam_enc = CameraEncoder(preset.camera_encoder_dim)
            self.cam_dec = CameraDecoder(preset.camera_decoder_dim)
        self.gs_head = (
            GaussianHead(spec.feature_dim, preset.gaussian_head, spec.patch_size)
            if preset.gaussian_head is not None
            else None
        )

    def forward(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        reference_strategy: ReferenceStrategy = "saddle_balanced",
        pose_from_rays: bool = False,
        infer_gaussians: bool = False,
        place_gaussians: bool = True,
        keep_intermediates: bool = True,
        generator: torch.Generator | None = None,
        autocast_dtype: torch.dtype | None = None,
        head_views: int = 1,
    ) -> NetworkOutput:
        """Run DA3.

        Args:
            images: ``(B, S, 3, H, W)`` ImageNet-normalised, H and W multiples of 14.
            extrinsics: optional ``(B, S, 4, 4)`` world-to-camera poses to condition on,
                normalised as :func:`da3cog.geometry.normalize_pose_conditioning` does
                (any-view models only).
            intrinsics: ``(B, S, 3, 3)`` pixels of the processing image; required with
                extrinsics.
            reference_strategy: how a reference view is chosen for >= 3 unposed views.
            pose_from_rays: recover cameras from the ray map (RANSAC) instead of the camera
                decoder.
            infer_gaussians: also run the GS head and build Gaussians with the predicted
                cameras (models with a Gaussian head only).
            place_gaussians: with ``infer_gaussians``, also place the Gaussians in the world
                of the predicted cameras (``gaussians``); False returns their parameters only,
                for a caller that places them with cameras of its own (the pipeline does).
            keep_intermediates: also return the backbone's features and the head's
                pre-activation outputs (``backbone``, ``head``). False lets them go as soon as
                the heads have run: the features of every view (4 layers of twice the
                backbone's width per token) are the largest tensors a forward would keep.
            generator: RNG for the ray RANSAC and the sky quantile sampling; seed it for
                reproducible results.
            autocast_dtype: run the backbone under autocast with this dtype (heads stay fp32).
            head_views: views whose full-resolution head tails run at once (the heads' largest
                activations; 1 bounds them to one image, more launch fewer kernels, which
                pays on a GPU). The outputs agree to float rounding for every value.
        """
        preset = self.preset
        check_strategy(reference_strategy)
        if head_views < 1:
            raise ValueError(f"head_views must be at least 1, got {head_views}")
        _check_request(preset, extrinsics, intrinsics, pose_from_rays, infer_gaussians)
        height, width = images.shape[-2:]
        batch, views = images.shape[:2]
        camera_tokens = (
            self.cam_enc(extrinsics.float(), intrinsics.float(), (height, width))
            if extrinsics is not None
            else None
        )
        with torch.autocast(
            device_type=images.device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            backbone = self.backbone(images, camera_tokens, reference_strategy)

        features = [f.float().flatten(0, 1) for f in backbone.features]
        reference_view, camera_token = backbone.reference_view, backbone.camera_tokens[-1]
        # Without autocast the float features are the backbone's own tensors; with it, copies,
        # and the lower-precision originals need not outlive this line.
        kept_backbone = backbone if keep_intermediates else None
        del backbone
        head = _run_in_chunks(self.head, features, height, width, tail_views=head_views)
        kept_head = head if keep_intermediates else None

        def per_view(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, views, *x.shape[1:])

        if isinstance(head, DPTOutput):
            depth = per_view(torch.exp(head.depth_logits))
            sky = per_view(torch.relu(head.sky_logits))
            depth = torch.stack(
                [fill_sky_relative(depth[b], sky[b], generator) for b in range(batch)]
            )
            return NetworkOutput(
                depth=depth,
                depth_conf=None,
                extrinsics=None,
                intrinsics=None,
                rays=None,
                ray_conf=None,
                head=kept_head,
                backbone=kept_backbone,
                sky=sky,
                reference_view=reference_view,
            )

        rays = per_view(head.rays)
        ray_conf = per_view(torch.exp(head.ray_conf_logits) + 1)
        if pose_from_rays:
            cameras = cameras_from_rays(rays, ray_conf, generator)
            pose = torch.cat([cameras.rotation, cameras.translation[..., None]], dim=-1)
            extrinsics_out = invert_rigid(torch.cat([pose, _bottom_row(pose)], dim=-2))[..., :3, :]
            intrinsics_out = torch.zeros(batch, views, 3, 3, device=images.device)
            intrinsics_out[..., 0, 0] = cameras.focal[..., 0] / 2 * width
            intrinsics_out[..., 1, 1] = cameras.focal[..., 1] / 2 * height
            intrinsics_out[..., 0, 2] = cameras.principal_point[..., 0] * width * 0.5
            intrinsics_out[..., 1, 2] = cameras.principal_point[..., 1] * height * 0.5
            intrinsics_out[..., 2, 2] = 1.0
        else:
            pose_encoding = self.cam_dec(camera_token.float())
            extrinsics_out, intrinsics_out = decode_pose(pose_encoding, (height, width))

        depth = per_view(torch.exp(head.depth_logits))
        parameters = gaussians = None
        if infer_gaussians and self.gs_head is not None:
            raw, opacities = _run_in_chunks(
                self.gs_head, features, images.flatten(0, 1).float(), tail_views=head_views
            )
            parameters = GaussianParameters(
                raw=per_view(raw),
                opacities=per_view(opacities),
                depth=depth,
                unit_scale=torch.ones(batch, device=depth.device),
            )
            if place_gaussians:
                gaussians = build_gaussians(parameters, extrinsics_out, intrinsics_out)

        return NetworkOutput(
            depth=depth,
            depth_conf=per_view(torch.exp(head.depth_conf_logits) + 1),
            extrinsics=extrinsics_out,
            intrinsics=intrinsics_out,
            rays=rays,
            ray_conf=ray_conf,
            head=kept_head,
            backbone=kept_backbone,
            gaussian_parameters=parameters,
            gaussians=gaussians,
            reference_view=reference_view,
        )


class NestedDepthAnything3Network(nn.Module):
    """An any-view network (``da3``) and a metric one (``da3_metric``) on the same images: the
    any-view depth, cameras and Gaussians are scaled to metres by a least-squares fit to the
    metric depth (made metric with the any-view predicted focal length), and sky pixels get a
    far value. Attribute names match the official checkpoints (``model.da3.*``,
    ``model.da3_metric.*``)."""

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        if preset.metric_branch is None:
            raise ValueError(f"{preset.name} is not a nested preset")
        self.preset = preset
        self.da3 = DepthAnything3Network(preset.anyview_branch)
        self.da3_metric = DepthAnything3Network(preset.metric_branch)

    def forward(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        reference_strategy: ReferenceStrategy = "saddle_balanced",
        pose_from_rays: bool = False,
        infer_gaussians: bool = False,
        place_gaussians: bool = True,
        keep_intermediates: bool = True,
        generator: torch.Generator | None = None,
        autocast_dtype: torch.dtype | None = None,
        head_views: int = 1,
    ) -> NetworkOutput:
        """Arguments as :meth:`DepthAnything3Network.forward`; poses condition the any-view
        branch only. The metric scale uses the *predicted* focal lengths, also when intrinsics
        were given (as upstream). Random draws come from ``generator`` in upstream's order."""
        output = self.da3(
            images,
            extrinsics,
            intrinsics,
            reference_strategy=reference_strategy,
            pose_from_rays=pose_from_rays,
            infer_gaussians=infer_gaussians,
            # Placed below, once the metric scale is known.
            place_gaussians=False,
            keep_intermediates=keep_intermediates,
            generator=generator,
            autocast_dtype=autocast_dtype,
            head_views=head_views,
        )
        metric = self.da3_metric(
            images,
            keep_intermediates=keep_intermediates,
            generator=generator,
            autocast_dtype=autocast_dtype,
            head_views=head_views,
        )
        if output.depth_conf is None or output.extrinsics is None or output.intrinsics is None:
            raise RuntimeError("the any-view branch returned no confidence or cameras")
        if metric.sky is None:
            raise RuntimeError("the metric branch returned no sky score")
        metric_depth = canonical_to_metric(metric.depth, output.intrinsics)
        depth, confidence = output.depth.clone(), output.depth_conf.clone()
        extrinsics_out = output.extrinsics.clone()
        factors = torch.ones(depth.shape[0], device=depth.device)
        scales: list[float | None] = []
        for scene in range(depth.shape[0]):
            scale = fit_metric_scale(
                depth[scene], confidence[scene], metric_depth[scene], metric.sky[scene], generator
            )
            scales.append(None if scale is None else float(scale))
            if scale is None:
                continue
            factors[scene] = scale
            depth[scene] = depth[scene] * scale
            extrinsics_out[scene, ..., :3, 3] = extrinsics_out[scene, ..., :3, 3] * scale
            depth[scene], confidence[scene] = fill_sky_far(
                depth[scene], confidence[scene], metric.sky[scene], generator
            )

        parameters = gaussians = None
        if output.gaussian_parameters is not None:
            # One frame: the Gaussians follow the metric depth and cameras (upstream leaves
            # them in the any-view unit and rescales at render time).
            parameters = output.gaussian_parameters.rescaled(factors)
            if place_gaussians:
                gaussians = build_gaussians(parameters, extrinsics_out, output.intrinsics)
        return replace(
            output,
            depth=depth,
            depth_conf=confidence,
            extrinsics=extrinsics_out,
            sky=metric.sky,
            gaussian_parameters=parameters,
            gaussians=gaussians,
            metric_scales=tuple(scales),
            metric=metric,
        )


def _bottom_row(pose: torch.Tensor) -> torch.Tensor:
    row = torch.zeros_like(pose[..., :1, :])
    row[..., 0, 3] = 1.0
    return row


Network = DepthAnything3Network | NestedDepthAnything3Network


def build_network(preset: ModelPreset) -> Network:
    """Build the network for a preset on the current default device (use ``torch.device("meta")``
    as a context to build without allocating weights)."""
    if preset.is_nested:
        return NestedDepthAnything3Network(preset).eval()
    return DepthAnything3Network(preset).eval()
