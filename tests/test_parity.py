"""Parity with the official implementation (``depth-anything-3==0.1.1``) on real photos.

Both networks are built from the same Hub-layout checkpoint folder, written by upstream's own
``save_pretrained`` with re-randomised weights (see ``oracle.rerandomize``), and compared at
every stage as ``max|ours - upstream| / std(upstream)`` in fp32: each backbone output layer and
camera token, the head outputs before activation, depth, confidence, rays, extrinsics and
intrinsics. Large and giant run the same check from ``bench/parity_large.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from _torchvision_shim import install_torchvision_shim
from oracle import save_checkpoint
from torch import nn

from da3cog.geometry import anchor_to_first_view, normalize_pose_conditioning
from da3cog.io import prepare_images
from da3cog.model.network import DepthAnything3Network, NetworkOutput
from da3cog.pipeline import DepthAnything3, InferenceOptions
from da3cog.weights import load_model

TOLERANCE = 1e-4
PROCESS_RES = 126


def photos() -> list[np.ndarray]:
    left, _, _ = skimage.data.stereo_motorcycle()
    return [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        left,
    ]


def relative_error(ours: torch.Tensor, upstream: torch.Tensor) -> float:
    ours, upstream = ours.detach().double(), upstream.detach().double()
    assert ours.shape == upstream.shape, (ours.shape, upstream.shape)
    return float((ours - upstream).abs().max() / upstream.std())


@dataclass
class Pair:
    name: str
    folder: Path
    upstream: nn.Module
    ours: DepthAnything3Network


@pytest.fixture(scope="module", params=["da3-small", "da3-base"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    folder = tmp_path_factory.mktemp(request.param)
    upstream = save_checkpoint(request.param, folder, seed=11).model.eval()
    ours = load_model(folder).network
    return Pair(request.param, folder, upstream, ours)


def network_input(views: int) -> torch.Tensor:
    images = [photos()[i % 5] for i in range(views)]
    return prepare_images(images, PROCESS_RES).images[None]


def ring_cameras(views: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-to-camera poses on a tilted ring looking at the origin, and pixel intrinsics."""
    extrinsics = []
    for index in range(views):
        angle = 2 * np.pi * index / max(views, 3) * 0.4
        centre = np.array([3 * np.sin(angle), 0.3 * index, -3 * np.cos(angle)])
        forward = -centre / np.linalg.norm(centre)
        right = np.cross([0.0, 1.0, 0.0], forward)
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rotation = np.stack([right, down, forward])
        pose = np.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = -rotation @ centre
        extrinsics.append(pose)
    intrinsics = np.array([[0.9 * width, 0, width / 2], [0, 0.9 * width, height / 2], [0, 0, 1]])
    return (
        torch.tensor(np.stack(extrinsics), dtype=torch.float32)[None],
        torch.tensor(np.stack([intrinsics] * views), dtype=torch.float32)[None],
    )


@dataclass
class UpstreamRun:
    output: dict
    backbone: tuple
    head_logits: torch.Tensor
    ray_logits: torch.Tensor


@torch.inference_mode()
def run_upstream(upstream: nn.Module, images: torch.Tensor, **kwargs: object) -> UpstreamRun:
    captured: dict[str, object] = {}

    def keep(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            captured[name] = output

        return hook

    scratch = upstream.head.scratch
    handles = [
        upstream.backbone.register_forward_hook(keep("backbone")),
        scratch.output_conv2.register_forward_hook(keep("head")),
        scratch.output_conv2_aux[-1].register_forward_hook(keep("rays")),
    ]
    try:
        output = upstream(images, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return UpstreamRun(output, captured["backbone"], captured["head"], captured["rays"])


def stage_errors(
    ours: NetworkOutput, reference: UpstreamRun, with_cameras: bool
) -> dict[str, float]:
    features, _aux = reference.backbone
    errors: dict[str, float] = {}
    for level, ((up_features, up_token), our_features, our_token) in enumerate(
        zip(features, ours.backbone.features, ours.backbone.camera_tokens, strict=True)
    ):
        errors[f"backbone[{level}]"] = relative_error(our_features, up_features)
        errors[f"camera_token[{level}]"] = relative_error(our_token, up_token)
    errors["depth_logits"] = relative_error(ours.head.depth_logits, reference.head_logits[:, 0])
    errors["depth_conf_logits"] = relative_error(
        ours.head.depth_conf_logits, reference.head_logits[:, 1]
    )
    ray_logits = reference.ray_logits.permute(0, 2, 3, 1)
    errors["rays"] = relative_error(ours.head.rays, ray_logits[..., :6])
    errors["ray_conf_logits"] = relative_error(ours.head.ray_conf_logits, ray_logits[..., 6])
    errors["depth"] = relative_error(ours.depth, reference.output["depth"])
    errors["depth_conf"] = relative_error(ours.depth_conf, reference.output["depth_conf"])
    if with_cameras:
        errors["extrinsics"] = relative_error(ours.extrinsics, reference.output["extrinsics"])
        errors["intrinsics"] = relative_error(ours.intrinsics, reference.output["intrinsics"])
    return errors


def assert_parity(errors: dict[str, float], tolerance: float = TOLERANCE) -> None:
    failing = {stage: error for stage, error in errors.items() if not error <= tolerance}
    assert not failing, f"stages above {tolerance}: {failing}"


@pytest.mark.parametrize("views", [1, 2, 4])
def test_network_matches_upstream(pair: Pair, views: int) -> None:
    images = network_input(views)
    reference = run_upstream(pair.upstream, images)
    with torch.inference_mode():
        ours = pair.ours(images)
    errors = stage_errors(ours, reference, with_cameras=True)
    assert_parity(errors)
    # The comparison is only meaningful if the outputs vary across the image.
    depth = reference.output["depth"]
    assert float(depth.std() / depth.mean()) > 0.05


@pytest.mark.parametrize("views", [1, 2, 4])
def test_pose_conditioned_network_matches_upstream(pair: Pair, views: int) -> None:
    images = network_input(views)
    extrinsics, intrinsics = ring_cameras(views, *images.shape[-2:])
    normalized = normalize_pose_conditioning(extrinsics)
    reference = run_upstream(pair.upstream, images, extrinsics=normalized, intrinsics=intrinsics)
    with torch.inference_mode():
        ours = pair.ours(images, normalized, intrinsics)
    assert_parity(stage_errors(ours, reference, with_cameras=True))


@pytest.mark.parametrize("views", [2, 4])
def test_ray_pose_matches_upstream(pair: Pair, views: int) -> None:
    images = network_input(views)
    torch.manual_seed(5)
    reference = run_upstream(pair.upstream, images, use_ray_pose=True)
    with torch.inference_mode():
        ours = pair.ours(images, pose_from_rays=True, generator=torch.Generator().manual_seed(5))
    assert_parity(stage_errors(ours, reference, with_cameras=True))


@pytest.mark.parametrize("strategy", ["saddle_balanced", "saddle_sim_range", "first", "middle"])
def test_reference_view_strategies_match_upstream(pair: Pair, strategy: str) -> None:
    images = network_input(4)
    reference = run_upstream(pair.upstream, images, ref_view_strategy=strategy)
    with torch.inference_mode():
        ours = pair.ours(images, reference_strategy=strategy)
    assert_parity(stage_errors(ours, reference, with_cameras=True))


def test_comparison_detects_a_perturbed_layer(pair: Pair) -> None:
    """Scaling one layer's weights by 1.001 must push the comparison over the tolerance."""
    images = network_input(2)
    reference = run_upstream(pair.upstream, images)
    perturbed = load_model(pair.folder).network
    with torch.no_grad():
        perturbed.backbone.pretrained.blocks[6].mlp.fc1.weight.mul_(1.001)
    with torch.inference_mode():
        ours = perturbed(images)
    errors = stage_errors(ours, reference, with_cameras=True)
    assert errors["depth"] > TOLERANCE
    assert max(errors.values()) > TOLERANCE


# ---------------------------------------------------------------------------------------------
# Whole pipeline: preprocessing, the network, output conversion, re-anchoring, pose alignment.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_io() -> Iterator[tuple[object, object, object]]:
    install_torchvision_shim()
    input_processor = importlib.import_module("depth_anything_3.utils.io.input_processor")
    output_processor = importlib.import_module("depth_anything_3.utils.io.output_processor")
    pose_align = importlib.import_module("depth_anything_3.utils.pose_align")
    yield input_processor.InputProcessor(), output_processor.OutputProcessor(), pose_align


def upstream_normalize_extrinsics(extrinsics: torch.Tensor) -> torch.Tensor:
    """Upstream ``DepthAnything3._normalize_extrinsics`` (api.py, whose module cannot be
    imported here), restated from its source."""
    from depth_anything_3.utils.geometry import affine_inverse

    normalized = extrinsics @ affine_inverse(extrinsics[:, :1])
    distances = affine_inverse(normalized)[..., :3, 3].norm(dim=-1)
    median = torch.clamp(torch.median(distances), min=1e-1)
    normalized[..., :3, 3] = normalized[..., :3, 3] / median
    return normalized


@pytest.mark.parametrize("posed", [False, True])
def test_pipeline_matches_upstream_inference(pair: Pair, upstream_io: tuple, posed: bool) -> None:
    input_processor, output_processor, pose_align = upstream_io
    images = photos()[:4]
    extrinsics = intrinsics = None
    if posed:
        heights = {image.shape[0] for image in images}
        assert len(heights) > 1  # mixed sizes: exercises the common-size crop too
        ring, _ = ring_cameras(4, 1, 1)
        extrinsics = ring[0].numpy().astype(np.float64)
        intrinsics = np.stack(
            [
                [
                    [0.8 * i.shape[1], 0, i.shape[1] / 2],
                    [0, 0.8 * i.shape[1], i.shape[0] / 2],
                    [0, 0, 1],
                ]
                for i in images
            ]
        )

    tensor, up_extrinsics, up_intrinsics = input_processor(
        images,
        extrinsics.copy() if extrinsics is not None else None,
        intrinsics.copy() if intrinsics is not None else None,
        PROCESS_RES,
        "upper_bound_resize",
        num_workers=1,
    )
    with torch.inference_mode():
        conditioning = upstream_normalize_extrinsics(up_extrinsics[None].float()) if posed else None
        raw = pair.upstream(
            tensor[None].float(),
            conditioning,
            up_intrinsics[None].float() if posed else None,
        )
    reference = output_processor(raw)
    if posed:
        _, _, scale = pose_align.align_poses_umeyama(reference.extrinsics, up_extrinsics.numpy())
        reference_depth = reference.depth / scale
        reference_extrinsics = up_extrinsics.numpy()[:, :3, :]
        reference_intrinsics = up_intrinsics.numpy()
    else:
        reference_depth = reference.depth
        reference_extrinsics = anchor_to_first_view(torch.from_numpy(reference.extrinsics)).numpy()
        reference_intrinsics = reference.intrinsics

    model = DepthAnything3(load_model(pair.folder), torch.device("cpu"))
    prediction = model.predict(
        images,
        extrinsics=extrinsics,
        intrinsics=intrinsics,
        # Upstream centre-crops views of other shapes: compare on the same crop.
        options=InferenceOptions(
            process_res=PROCESS_RES, output_resolution="processing", mixed_shapes="crop"
        ),
    )
    errors = {
        "depth": relative_error(
            torch.from_numpy(prediction.depth), torch.from_numpy(reference_depth)
        ),
        "confidence": relative_error(
            torch.from_numpy(prediction.confidence), torch.from_numpy(reference.conf)
        ),
        "extrinsics": relative_error(
            torch.from_numpy(prediction.extrinsics[:, :3, :]),
            torch.from_numpy(np.asarray(reference_extrinsics)[:, :3, :]).float(),
        ),
        "intrinsics": relative_error(
            torch.from_numpy(prediction.intrinsics), torch.from_numpy(reference_intrinsics)
        ),
    }
    assert_parity(errors)
    assert prediction.pose_conditioned == posed
