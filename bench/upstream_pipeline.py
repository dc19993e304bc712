"""Upstream's own pipeline for the benchmarks: ``depth_anything_3.api.DepthAnything3`` loaded
from a checkpoint folder, as shipped or with its autocast removed. Importable only where
upstream's app dependencies are installed (``bench/upstream_env.sh``)."""

from __future__ import annotations

import torch


def load_upstream(folder: str, device: str, fp32: bool):
    """``DepthAnything3.from_pretrained(folder)`` on ``device``. ``fp32``: its ``forward``
    without the ``torch.autocast`` it wraps the network in (bf16 where
    ``torch.cuda.is_bf16_supported()``, else float16, on a CPU too), so it runs the float32
    arithmetic the parity tests compare against; otherwise exactly as shipped."""
    from depth_anything_3.api import DepthAnything3

    model = DepthAnything3.from_pretrained(folder).to(device)
    if fp32:
        network = model.model

        @torch.inference_mode()
        def forward_fp32(
            image,
            extrinsics=None,
            intrinsics=None,
            export_feat_layers=None,
            infer_gs=False,
            use_ray_pose=False,
            ref_view_strategy="saddle_balanced",
        ):
            return network(
                image,
                extrinsics,
                intrinsics,
                export_feat_layers,
                infer_gs,
                use_ray_pose,
                ref_view_strategy,
            )

        model.forward = forward_fp32
    return model
