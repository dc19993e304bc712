"""The DA3 any-view network: backbone + DualDPT head + camera encoder / decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from da3cog.geometry import cameras_from_rays, invert_rigid
from da3cog.model.backbone import Backbone, BackboneOutput
from da3cog.model.camera import CameraDecoder, CameraEncoder, decode_pose
from da3cog.model.dual_dpt import DualDPTHead, DualDPTOutput
from da3cog.model.gaussian_head import GaussianHead
from da3cog.model.presets import ModelPreset
from da3cog.model.reference_view import ReferenceStrategy, check_strategy

# Images per head call: bounds the head's activation memory for long sequences.
_HEAD_CHUNK = 8


@dataclass(frozen=True)
class NetworkOutput:
    """Raw network predictions for ``B`` scenes of ``S`` views at processing size ``H x W``.

    Attributes:
        depth: ``(B, S, H, W)`` z-depth, relative scale.
        depth_conf: ``(B, S, H, W)`` confidence (> 1, higher is better).
        extrinsics: ``(B, S, 3, 4)`` world-to-camera, OpenCV axes, in the network's own world
            frame (not anchored to any view).
        intrinsics: ``(B, S, 3, 3)`` in pixels of the ``H x W`` processing image.
        rays: ``(B, S, h, w, 6)`` ray map (direction, origin), ``h, w`` = 8 x patch grid.
        ray_conf: ``(B, S, h, w)`` ray confidence.
        head: the head's pre-activation outputs, views flattened (diagnostics and parity).
        backbone: the backbone's outputs (diagnostics and parity).
    """

    depth: torch.Tensor
    depth_conf: torch.Tensor
    extrinsics: torch.Tensor
    intrinsics: torch.Tensor
    rays: torch.Tensor
    ray_conf: torch.Tensor
    head: DualDPTOutput
    backbone: BackboneOutput


class DepthAnything3Network(nn.Module):
    """Tensors in, :class:`NetworkOutput` out; no files, no device picking."""

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        self.preset = preset
        spec = preset.backbone
        self.backbone = Backbone(spec)
        self.head = DualDPTHead(spec.feature_dim, preset.head, spec.patch_size)
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
        generator: torch.Generator | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> NetworkOutput:
        """Run DA3.

        Args:
            images: ``(B, S, 3, H, W)`` ImageNet-normalised, H and W multiples of 14.
            extrinsics: optional ``(B, S, 4, 4)`` world-to-camera poses to condition on,
                normalised as :func:`da3cog.geometry.normalize_pose_conditioning` does.
            intrinsics: ``(B, S, 3, 3)`` pixels of the processing image; required with
                extrinsics.
            reference_strategy: how a reference view is chosen for >= 3 unposed views.
            pose_from_rays: recover cameras from the ray map (RANSAC) instead of the camera
                decoder.
            generator: RNG for the ray RANSAC; seed it for reproducible poses.
            autocast_dtype: run the backbone under autocast with this dtype (heads stay fp32).
        """
        check_strategy(reference_strategy)
        if (extrinsics is None) != (intrinsics is None):
            raise ValueError("pose conditioning needs both extrinsics and intrinsics")
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
        chunks = [
            self.head([f[start : start + _HEAD_CHUNK] for f in features], height, width)
            for start in range(0, batch * views, _HEAD_CHUNK)
        ]
        head = DualDPTOutput(
            *(
                torch.cat([getattr(c, name) for c in chunks])
                for name in DualDPTOutput.__dataclass_fields__
            )
        )

        def per_view(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, views, *x.shape[1:])

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
            pose_encoding = self.cam_dec(backbone.camera_tokens[-1].float())
            extrinsics_out, intrinsics_out = decode_pose(pose_encoding, (height, width))

        return NetworkOutput(
            depth=per_view(torch.exp(head.depth_logits)),
            depth_conf=per_view(torch.exp(head.depth_conf_logits) + 1),
            extrinsics=extrinsics_out,
            intrinsics=intrinsics_out,
            rays=rays,
            ray_conf=ray_conf,
            head=head,
            backbone=backbone,
        )


def _bottom_row(pose: torch.Tensor) -> torch.Tensor:
    row = torch.zeros_like(pose[..., :1, :])
    row[..., 0, 3] = 1.0
    return row


def build_network(preset: ModelPreset) -> DepthAnything3Network:
    """Build the network for a preset on the current default device (use ``torch.device("meta")``
    as a context to build without allocating weights)."""
    return DepthAnything3Network(preset).eval()
