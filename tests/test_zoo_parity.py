"""Parity with the official implementation (``depth-anything-3==0.1.1``) for the rest of the
model zoo, as ``max|ours - upstream| / std(upstream) <= 1e-4`` in fp32 on re-randomised
weights (see ``test_parity.py``):

* DA3MONO-LARGE and DA3METRIC-LARGE at full size (network and pipeline);
* the GS head and Gaussian adapter of da3-giant and the nested metric scaling of
  da3nested-giant-large on ViT-S stand-ins built from the official configs with only the sizes
  changed (``oracle.small_configs`` / ``small_zoo``): the same code at a size CI runs in
  seconds. ``bench/parity_zoo.py`` runs the same checks on the full-size giant and nested
  models.

Random draws: upstream samples quantiles from torch's global RNG, ours from a generator;
both are seeded alike (``torch.manual_seed(s)`` / ``torch.Generator().manual_seed(s)``) and
draw in the same order.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _torchvision_shim import install_torchvision_shim
from oracle import save_checkpoint
from small_zoo import SMALL_ZOO, load_small, small_model
from test_parity import (
    PROCESS_RES,
    TOLERANCE,
    assert_parity,
    network_input,
    photos,
    relative_error,
    ring_cameras,
)
from torch import nn

from da3cog.geometry import (
    anchor_to_first_view,
    normalize_pose_conditioning,
    trajectory_scale,
)
from da3cog.io import prepare_images
from da3cog.model import gaussian_adapter
from da3cog.model.gaussian_adapter import (
    GaussianParameters,
    build_gaussians,
    rotate_harmonics,
)
from da3cog.model.metric import MAX_QUANTILE_SAMPLES, SKY_THRESHOLD
from da3cog.model.network import NetworkOutput
from da3cog.pipeline import DepthAnything3, InferenceOptions
from da3cog.weights import CONFIG_NAME, WEIGHTS_NAME, load_model

SEED = 7
GAUSSIAN_FIELDS = ("means", "scales", "rotations", "harmonics", "opacities")


def ours_generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


@dataclass
class Captured:
    """Upstream's output and the intermediate tensors the hooks saw."""

    output: dict
    hooked: dict[str, object]


@torch.inference_mode()
def run_upstream(model: nn.Module, images: torch.Tensor, hooks: dict, **kwargs) -> Captured:
    """Seed the global RNG, run upstream, and keep (cloned) what ``hooks`` modules returned."""
    hooked: dict[str, object] = {}

    def keep(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            hooked[name] = (
                output.clone()
                if isinstance(output, torch.Tensor)
                else {k: v.clone() for k, v in output.items() if isinstance(v, torch.Tensor)}
                if isinstance(output, dict)
                else output
            )

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in hooks.items()]
    try:
        torch.manual_seed(SEED)
        output = model(images, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return Captured(output, hooked)


def backbone_errors(ours: NetworkOutput, hooked: tuple) -> dict[str, float]:
    features, _aux = hooked
    return {
        f"backbone[{level}]": relative_error(mine, theirs)
        for level, ((theirs, _token), mine) in enumerate(
            zip(features, ours.backbone.features, strict=True)
        )
    }


def gaussian_errors(ours: NetworkOutput, upstream: object, scale: float = 1.0) -> dict[str, float]:
    """Every Gaussian field; ours per view ``(B, S, H, W, ...)``, upstream ``(B, S*H*W, ...)``.
    ``scale`` multiplies upstream's means and scales (the nested metric scale)."""
    assert ours.gaussians is not None
    errors = {}
    for name in GAUSSIAN_FIELDS:
        mine = getattr(ours.gaussians, name)
        mine = mine.flatten(1, 3) if name != "opacities" else mine.flatten(1)
        theirs = getattr(upstream, name)
        if name in ("means", "scales"):
            theirs = theirs * scale
        errors[f"gaussians.{name}"] = relative_error(mine, theirs)
    return errors


# ---------------------------------------------------------------------------------------------
# DA3MONO-LARGE and DA3METRIC-LARGE
# ---------------------------------------------------------------------------------------------


@dataclass
class SingleView:
    upstream: nn.Module
    folders: dict[str, Path]
    ours: dict[str, nn.Module]


@pytest.fixture(scope="module")
def single_view(tmp_path_factory: pytest.TempPathFactory) -> SingleView:
    """Both large single-view checkpoints on one set of random weights.

    Upstream's da3mono-large and da3metric-large configs are identical (checked here), so one
    upstream network is the oracle for both; the mono folder holds the same weights file with
    its own config.json."""
    from depth_anything_3.cfg import load_config
    from depth_anything_3.registry import MODEL_REGISTRY

    assert load_config(MODEL_REGISTRY["da3mono-large"]) == load_config(
        MODEL_REGISTRY["da3metric-large"]
    )
    root = tmp_path_factory.mktemp("single-view")
    metric = root / "da3metric-large"
    upstream = save_checkpoint("da3metric-large", metric, seed=11).model.eval()
    mono = root / "da3mono-large"
    mono.mkdir()
    (mono / WEIGHTS_NAME).symlink_to(metric / WEIGHTS_NAME)
    (mono / CONFIG_NAME).write_text(json.dumps({"model_name": "da3mono-large"}))
    folders = {"da3metric-large": metric, "da3mono-large": mono}
    ours = {name: load_model(folder).network for name, folder in folders.items()}
    return SingleView(upstream, folders, ours)


def single_view_hooks(model: nn.Module) -> dict:
    scratch = model.head.scratch
    return {
        "backbone": model.backbone,
        "depth_logits": scratch.output_conv2,
        "sky_logits": scratch.sky_output_conv2,
    }


def single_view_errors(ours: NetworkOutput, reference: Captured) -> dict[str, float]:
    hooked = reference.hooked
    return {
        **backbone_errors(ours, hooked["backbone"]),
        "depth_logits": relative_error(ours.head.depth_logits, hooked["depth_logits"][:, 0]),
        "sky_logits": relative_error(ours.head.sky_logits, hooked["sky_logits"][:, 0]),
        "depth": relative_error(ours.depth, reference.output["depth"]),
        "sky": relative_error(ours.sky, reference.output["sky"]),
    }


@pytest.mark.parametrize("name", ["da3mono-large", "da3metric-large"])
@pytest.mark.parametrize("views", [1, 2])
def test_single_view_network_matches_upstream(
    single_view: SingleView, name: str, views: int
) -> None:
    images = network_input(views)
    reference = run_upstream(single_view.upstream, images, single_view_hooks(single_view.upstream))
    with torch.inference_mode():
        ours = single_view.ours[name](images, generator=ours_generator())
    assert ours.depth_conf is None and ours.extrinsics is None and ours.intrinsics is None
    assert "depth_conf" not in reference.output and "extrinsics" not in reference.output
    assert_parity(single_view_errors(ours, reference))
    # Meaningful only if the outputs vary and the sky filling ran (some sky, some not).
    depth = reference.output["depth"]
    assert float(depth.std() / depth.mean()) > 0.05
    sky_fraction = float((reference.output["sky"] >= SKY_THRESHOLD).float().mean())
    assert 0.02 < sky_fraction < 0.98


@pytest.fixture(scope="module")
def upstream_io() -> tuple[object, object]:
    install_torchvision_shim()
    input_processor = importlib.import_module("depth_anything_3.utils.io.input_processor")
    output_processor = importlib.import_module("depth_anything_3.utils.io.output_processor")
    return input_processor.InputProcessor(), output_processor.OutputProcessor()


def photo_intrinsics(images: list[np.ndarray]) -> np.ndarray:
    """Plausible input-pixel intrinsics (off-centre principal point, fx != fy)."""
    return np.stack(
        [
            [
                [0.9 * i.shape[1], 0, i.shape[1] / 2 + 4],
                [0, 0.95 * i.shape[1], i.shape[0] / 2 - 3],
                [0, 0, 1],
            ]
            for i in images
        ]
    )


@pytest.mark.parametrize("name", ["da3mono-large", "da3metric-large"])
def test_single_view_pipeline_matches_upstream(
    single_view: SingleView, upstream_io: tuple, name: str
) -> None:
    """Upstream's InputProcessor + network + OutputProcessor against our pipeline. Upstream's
    API returns the metric model's canonical depth; its documented conversion
    ``depth x focal / 300`` is applied here with the focal lengths of the processed image.
    Our sky mask is the network's own sky test (score >= 0.3: where depth holds the far
    value), which upstream's Prediction replaces with score >= 0.5; compared on the former."""
    input_processor, output_processor = upstream_io
    images = photos()[:2]
    intrinsics = photo_intrinsics(images)
    tensor, _, up_intrinsics = input_processor(
        images, None, intrinsics.copy(), PROCESS_RES, "upper_bound_resize", num_workers=1
    )
    reference = run_upstream(single_view.upstream, tensor[None].float(), {})
    result = output_processor(reference.output)
    reference_depth = torch.from_numpy(result.depth)
    if name == "da3metric-large":
        focal = (up_intrinsics[:, 0, 0] + up_intrinsics[:, 1, 1]) / 2
        reference_depth = reference_depth * focal[:, None, None] / 300

    model = DepthAnything3(load_model(single_view.folders[name]), torch.device("cpu"))
    prediction = model.predict(
        images,
        intrinsics=intrinsics,
        options=InferenceOptions(
            process_res=PROCESS_RES, output_resolution="processing", seed=SEED, mixed_shapes="crop"
        ),
    )
    assert prediction.is_metric == (name == "da3metric-large")
    assert prediction.focal_source == ("user intrinsics" if prediction.is_metric else None)
    assert not prediction.cameras_estimated and prediction.extrinsics is None
    assert prediction.confidence is None
    sky = reference.output["sky"][0] >= SKY_THRESHOLD
    assert prediction.sky is not None
    assert np.array_equal(prediction.sky, sky.numpy())
    errors = {
        "depth": relative_error(torch.from_numpy(prediction.depth), reference_depth),
        "intrinsics": relative_error(torch.from_numpy(prediction.intrinsics), up_intrinsics),
    }
    assert_parity(errors)


def test_single_view_comparison_detects_a_perturbed_layer(single_view: SingleView) -> None:
    images = network_input(1)
    reference = run_upstream(single_view.upstream, images, single_view_hooks(single_view.upstream))
    perturbed = load_model(single_view.folders["da3metric-large"]).network
    with torch.no_grad():
        perturbed.head.scratch.sky_output_conv2[0].weight.mul_(1.001)
        perturbed.backbone.pretrained.blocks[20].mlp.fc1.weight.mul_(1.001)
    with torch.inference_mode():
        ours = perturbed(images, generator=ours_generator())
    errors = single_view_errors(ours, reference)
    assert errors["sky"] > TOLERANCE
    assert errors["depth"] > TOLERANCE


# ---------------------------------------------------------------------------------------------
# Gaussians (da3-giant's GS head and adapter) and nested metric scaling, ViT-S stand-ins
# ---------------------------------------------------------------------------------------------


@dataclass
class SmallPair:
    folder: Path
    upstream: nn.Module
    ours: nn.Module


@pytest.fixture(scope="module")
def small_gs(small_zoo_checkpoint: Callable) -> SmallPair:
    folder, upstream = small_zoo_checkpoint("small-gs")
    return SmallPair(folder, upstream, load_small(folder, SMALL_ZOO["small-gs"]))


@pytest.fixture(scope="module")
def nested_small(small_zoo_checkpoint: Callable) -> SmallPair:
    folder, upstream = small_zoo_checkpoint("nested-small")
    return SmallPair(folder, upstream, load_small(folder, SMALL_ZOO["nested-small"]))


def anyview_errors(ours: NetworkOutput, output: dict) -> dict[str, float]:
    return {
        name: relative_error(getattr(ours, name), output[name])
        for name in ("depth", "depth_conf", "extrinsics", "intrinsics")
    }


@pytest.mark.parametrize(("views", "one_view_at_a_time"), [(1, False), (2, False), (3, True)])
def test_gaussians_match_upstream(
    small_gs: SmallPair, views: int, one_view_at_a_time: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our Gaussians against upstream's; ``one_view_at_a_time``: the adapter builds them a
    view at a time (as it does past ``ADAPTER_PIXELS``) into the output tensors."""
    if one_view_at_a_time:
        monkeypatch.setattr(gaussian_adapter, "ADAPTER_PIXELS", 1)
    images = network_input(views)
    reference = run_upstream(small_gs.upstream, images, {}, infer_gs=True)
    with torch.inference_mode():
        ours = small_gs.ours(images, infer_gaussians=True, generator=ours_generator())
    errors = {
        **anyview_errors(ours, reference.output),
        **gaussian_errors(ours, reference.output["gaussians"]),
    }
    assert_parity(errors)
    means = reference.output["gaussians"].means
    assert float(means.std()) > 0.05 * float(means.abs().mean())


def nested_hooks(model: nn.Module) -> dict:
    return {"metric": model.da3_metric, "backbone": model.da3.backbone}


def nested_errors(ours: NetworkOutput, reference: Captured) -> dict[str, float]:
    """Any-view outputs after metric scaling and sky filling, the metric branch's raw depth and
    sky, and the metric scale."""
    metric = reference.hooked["metric"]
    assert ours.metric is not None and ours.metric_scales is not None
    return {
        **backbone_errors(ours, reference.hooked["backbone"]),
        **anyview_errors(ours, reference.output),
        "metric.depth": relative_error(ours.metric.depth, metric["depth"]),
        "sky": relative_error(ours.sky, metric["sky"]),
        "scale": abs(ours.metric_scales[0] / reference.output["scale_factor"] - 1),
    }


@pytest.mark.parametrize("views", [1, 2])
def test_nested_matches_upstream(nested_small: SmallPair, views: int) -> None:
    """Depth, confidence, sky, cameras, the metric scale and every Gaussian field.

    Our Gaussians follow the metric depth and cameras (one frame); upstream leaves them in the
    any-view unit and rescales at render time. So means and scales are compared with upstream's
    times the metric scale factor; rotations, harmonics and opacities do not depend on it."""
    images = network_input(views)
    upstream = nested_small.upstream
    reference = run_upstream(upstream, images, nested_hooks(upstream), infer_gs=True)
    with torch.inference_mode():
        ours = nested_small.ours(images, infer_gaussians=True, generator=ours_generator())
    scale = reference.output["scale_factor"]
    errors = {
        **nested_errors(ours, reference),
        **gaussian_errors(ours, reference.output["gaussians"], scale=scale),
    }
    assert_parity(errors)
    sky = reference.hooked["metric"]["sky"] >= SKY_THRESHOLD
    assert 0.02 < float(sky.float().mean()) < 0.98
    assert torch.unique(ours.depth[sky]).numel() == 1  # one far value


def test_nested_draws_its_quantile_samples_like_upstream(nested_small: SmallPair) -> None:
    """At 504 px two views have > 100000 non-sky pixels, so every quantile is taken on random
    samples: the metric branch's sky fill (with replacement), the confidence median (without)
    and the far value (with), drawn in this order."""
    astronaut = photos()[0]
    images = prepare_images([astronaut, np.ascontiguousarray(astronaut[:, ::-1])], 504).images
    images = images[None]
    upstream = nested_small.upstream
    reference = run_upstream(upstream, images, nested_hooks(upstream))
    non_sky = reference.hooked["metric"]["sky"] < SKY_THRESHOLD
    assert int(non_sky.sum()) > MAX_QUANTILE_SAMPLES
    with torch.inference_mode():
        ours = nested_small.ours(images, generator=ours_generator())
    assert_parity(nested_errors(ours, reference))
    with torch.inference_mode():
        reseeded = nested_small.ours(images, generator=torch.Generator().manual_seed(SEED + 1))
    # Another seed draws other samples, so the sampled quantiles and then depth move.
    assert not torch.equal(reseeded.depth, ours.depth)


def test_pose_conditioned_nested_matches_upstream(nested_small: SmallPair) -> None:
    images = network_input(2)
    extrinsics, intrinsics = ring_cameras(2, *images.shape[-2:])
    normalized = normalize_pose_conditioning(extrinsics)
    upstream = nested_small.upstream
    reference = run_upstream(upstream, images, nested_hooks(upstream), extrinsics=normalized,
                             intrinsics=intrinsics)
    with torch.inference_mode():
        ours = nested_small.ours(images, normalized, intrinsics, generator=ours_generator())
    assert_parity(nested_errors(ours, reference))


def _same(first: object, second: object) -> bool:
    if first is None or second is None:
        return first is second
    return torch.equal(first, second)  # type: ignore[arg-type]


def test_dropping_the_intermediates_changes_no_output(nested_small: SmallPair) -> None:
    """``keep_intermediates=False`` (what the pipeline runs) returns no backbone features or
    head logits, from either branch of a nested network (a DualDPT and a DPT head), and every
    output bit for bit as with them: depth, confidence, cameras, rays, sky, metric scale,
    reference view, Gaussian parameters and Gaussians."""
    images = network_input(3)
    with torch.inference_mode():
        kept, lean = (
            nested_small.ours(
                images,
                infer_gaussians=True,
                keep_intermediates=keep,
                generator=ours_generator(),
            )
            for keep in (True, False)
        )
    assert kept.metric is not None and lean.metric is not None
    assert kept.backbone is not None and kept.head is not None and kept.metric.head is not None
    assert lean.backbone is None and lean.head is None
    assert lean.metric.backbone is None and lean.metric.head is None
    assert lean.reference_view is not None  # three views: a reference is chosen
    fields = ("depth", "depth_conf", "extrinsics", "intrinsics", "rays", "ray_conf", "sky")
    for name in (*fields, "reference_view"):
        assert _same(getattr(kept, name), getattr(lean, name)), name
    assert _same(kept.metric.depth, lean.metric.depth)
    assert kept.metric_scales == lean.metric_scales
    assert kept.gaussian_parameters is not None and lean.gaussian_parameters is not None
    assert _same(kept.gaussian_parameters.raw, lean.gaussian_parameters.raw)
    assert kept.gaussians is not None and lean.gaussians is not None
    for name in GAUSSIAN_FIELDS:
        assert _same(getattr(kept.gaussians, name), getattr(lean.gaussians, name)), name


def test_the_pipeline_keeps_no_intermediates(
    small_gs: SmallPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's network output holds no backbone features or head logits while its views
    are assembled (measured: 16 views of small at 504 px peaked 685-764 MiB instead of
    932-956), and the reference view still reaches the Prediction."""
    model = small_model(small_gs.folder, SMALL_ZOO["small-gs"])
    seen: list[NetworkOutput] = []
    forward = model.network.forward

    def spy(*args: object, **kwargs: object) -> NetworkOutput:
        seen.append(forward(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(model.network, "forward", spy)
    prediction = model.predict(
        photos()[:3], options=InferenceOptions(process_res=PROCESS_RES, infer_gaussians=True)
    )
    (output,) = seen
    assert output.backbone is None and output.head is None
    assert output.reference_view is not None
    assert prediction.reference_view == int(output.reference_view[0])


def test_gaussian_comparison_detects_a_perturbed_layer(nested_small: SmallPair) -> None:
    images = network_input(1)
    upstream = nested_small.upstream
    reference = run_upstream(upstream, images, nested_hooks(upstream), infer_gs=True)
    perturbed = load_small(nested_small.folder, nested_small.ours.preset)
    with torch.no_grad():
        perturbed.da3.gs_head.scratch.output_conv2[2].weight.mul_(1.001)
        perturbed.da3_metric.head.scratch.output_conv2[2].weight.mul_(1.001)
    with torch.inference_mode():
        ours = perturbed(images, infer_gaussians=True, generator=ours_generator())
    scale = reference.output["scale_factor"]
    errors = gaussian_errors(ours, reference.output["gaussians"], scale=scale)
    assert errors["gaussians.rotations"] > TOLERANCE
    assert errors["gaussians.means"] > TOLERANCE  # the metric scale moved
    assert nested_errors(ours, reference)["depth"] > TOLERANCE


# ---------------------------------------------------------------------------------------------
# The adapter alone, with any cameras (what the pipeline feeds it), and the SH rotation
# ---------------------------------------------------------------------------------------------


def random_cameras(views: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, views, 4, 4)`` random rigid world-to-camera and ``(1, views, 3, 3)`` intrinsics
    with fx != fy and an off-centre principal point (processing pixels of 28 x 42)."""
    quaternions = torch.randn(views, 4, generator=generator)
    from da3cog.geometry import quaternion_to_matrix

    extrinsics = torch.eye(4).repeat(views, 1, 1)
    extrinsics[:, :3, :3] = quaternion_to_matrix(quaternions)
    extrinsics[:, :3, 3] = torch.randn(views, 3, generator=generator)
    intrinsics = torch.tensor([[40.0, 0.0, 22.0], [0.0, 36.0, 13.0], [0.0, 0.0, 1.0]])
    intrinsics = intrinsics.repeat(views, 1, 1)
    intrinsics[:, 0, 0] += torch.rand(views, generator=generator) * 10
    return extrinsics[None], intrinsics[None]


@pytest.fixture(scope="module")
def upstream_adapter() -> nn.Module:
    from depth_anything_3.cfg import create_object, load_config
    from depth_anything_3.registry import MODEL_REGISTRY

    config = load_config(MODEL_REGISTRY["da3-giant"])
    return create_object(config.gs_adapter).eval()


def test_adapter_matches_upstream_for_arbitrary_cameras(upstream_adapter: nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    views, height, width = 3, 28, 42
    extrinsics, intrinsics = random_cameras(views, generator)
    raw = torch.randn(1, views, height, width, 37, generator=generator)
    depth = 1 + 4 * torch.rand(1, views, height, width, generator=generator)
    opacities = torch.rand(1, views, height, width, generator=generator)
    with torch.inference_mode():
        reference = upstream_adapter(
            extrinsics=extrinsics,
            intrinsics=intrinsics,
            depths=depth,
            opacities=opacities,
            raw_gaussians=raw,
            image_shape=(height, width),
        )
        parameters = GaussianParameters(raw, opacities, depth, torch.ones(1))
        gaussians = build_gaussians(parameters, extrinsics, intrinsics)
    ours = NetworkOutput(
        depth=depth, depth_conf=None, extrinsics=None, intrinsics=None, rays=None,
        ray_conf=None, head=None, backbone=None, gaussians=gaussians,  # type: ignore[arg-type]
    )
    assert_parity(gaussian_errors(ours, reference))


def test_rescaled_parameters_give_the_same_scene_scaled() -> None:
    """One frame for a rescaled scene (the nested metric scale, a user's unit): depth,
    translations and the predicted depth offsets scale together, so means and scales scale
    and nothing else changes."""
    generator = torch.Generator().manual_seed(4)
    views, height, width, factor = 2, 14, 28, 2.5
    extrinsics, intrinsics = random_cameras(views, generator)
    raw = torch.randn(1, views, height, width, 37, generator=generator)
    depth = 1 + torch.rand(1, views, height, width, generator=generator)
    opacities = torch.rand(1, views, height, width, generator=generator)
    parameters = GaussianParameters(raw, opacities, depth, torch.ones(1))
    scaled_extrinsics = extrinsics.clone()
    scaled_extrinsics[..., :3, 3] *= factor
    base = build_gaussians(parameters, extrinsics, intrinsics)
    scaled = build_gaussians(parameters.rescaled(torch.tensor([factor])), scaled_extrinsics,
                             intrinsics)
    torch.testing.assert_close(scaled.means, base.means * factor)
    torch.testing.assert_close(scaled.scales, base.scales * factor)
    for name in ("rotations", "harmonics", "opacities"):
        torch.testing.assert_close(getattr(scaled, name), getattr(base, name))


def test_sh_rotation_matches_upstream() -> None:
    """Our closed-form degree-1/2 SH rotation against upstream's (e3nn Wigner matrices of Euler
    angles, float32), on random rotations and the identity."""
    from depth_anything_3.utils.sh_helpers import rotate_sh

    generator = torch.Generator().manual_seed(5)
    from da3cog.geometry import quaternion_to_matrix

    rotations = quaternion_to_matrix(torch.randn(64, 4, generator=generator))
    rotations = torch.cat([torch.eye(3)[None], rotations])
    harmonics = torch.randn(rotations.shape[0], 3, 9, generator=generator)
    reference = rotate_sh(harmonics, rotations[:, None])
    assert relative_error(rotate_harmonics(harmonics, rotations), reference) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Pipeline: the Gaussians of a Prediction are in its frame and unit
# ---------------------------------------------------------------------------------------------


def test_pipeline_gaussians_are_upstreams_in_the_first_view_frame(
    small_gs: SmallPair, upstream_io: tuple
) -> None:
    """Upstream's Gaussians live in its network frame; a Prediction's world is the first
    view's camera. Mapping upstream's Gaussians by the first predicted extrinsics ``[R0|t0]``
    (means ``R0 p + t0``; rotations and SH rotated by ``R0`` with upstream's own routines)
    must give ours."""
    from depth_anything_3.model.utils.transform import mat_to_quat, quat_to_mat
    from depth_anything_3.utils.sh_helpers import rotate_sh

    input_processor, _ = upstream_io
    images = photos()[:2]
    tensor, _, _ = input_processor(images, None, None, PROCESS_RES, "upper_bound_resize",
                                   num_workers=1)
    reference = run_upstream(small_gs.upstream, tensor[None].float(), {}, infer_gs=True)
    first = reference.output["extrinsics"][0, 0]
    rotation, translation = first[:3, :3], first[:3, 3]
    gaussians = reference.output["gaussians"]
    expected = {
        "means": gaussians.means[0] @ rotation.T + translation,
        "scales": gaussians.scales[0],
        "rotations": mat_to_quat(rotation @ quat_to_mat(gaussians.rotations[0])),
        "harmonics": rotate_sh(gaussians.harmonics[0], rotation),
        "opacities": gaussians.opacities[0],
    }

    model = small_model(small_gs.folder, small_gs.ours.preset)
    prediction = model.predict(
        images,
        options=InferenceOptions(
            process_res=PROCESS_RES,
            output_resolution="processing",
            infer_gaussians=True,
            mixed_shapes="crop",  # upstream's handling of other shapes
        ),
    )
    ours = prediction.gaussians
    assert ours is not None
    views, height, width = ours.grid
    assert (views, height, width) == (2, *prediction.processing_size)
    assert len(ours) == views * height * width
    for name in GAUSSIAN_FIELDS:
        array = getattr(ours, name)
        assert array.dtype == np.float32 and not array.flags.writeable
    errors = {
        name: relative_error(torch.tensor(getattr(ours, name)), value)  # a copy: read-only
        for name, value in expected.items()
    }
    assert_parity(errors)
    anchored = anchor_to_first_view(reference.output["extrinsics"][0])
    assert relative_error(torch.from_numpy(prediction.extrinsics), anchored) < TOLERANCE


def test_posed_pipeline_gaussians_follow_the_given_poses(small_gs: SmallPair) -> None:
    """With given poses the Prediction's cameras are the user's and its depth is in their unit
    (network depth / s). The Gaussians follow them: they equal upstream's adapter run on the
    user's cameras expressed in network units (translations x s) with the network's depth and
    told the user's poses, whose alignment then rescales everything by 1 / s, depth offsets
    included. (Upstream clamps that factor to [1/3, 3]: the poses are given in a unit that
    makes s = 2.)"""
    images = photos()[:3]
    ring, _ = ring_cameras(3, 1, 1)
    intrinsics = photo_intrinsics(images)
    model = small_model(small_gs.folder, small_gs.ours.preset)
    batch = prepare_images(images, PROCESS_RES, intrinsics=intrinsics, mixed_shapes="crop")

    # Pose conditioning normalises the poses' scale away: the network's output does not
    # depend on their unit (up to rounding), only s does.
    def run(poses: np.ndarray) -> NetworkOutput:
        with torch.inference_mode():
            return model.network(
                batch.images[None],
                normalize_pose_conditioning(torch.from_numpy(poses).float()[None]),
                batch.intrinsics[None],
                infer_gaussians=True,
            )

    extrinsics = ring[0].numpy().astype(np.float64)
    predicted = run(extrinsics).extrinsics
    assert predicted is not None
    s = trajectory_scale(extrinsics, predicted[0].double().numpy(), seed=42)
    assert s is not None
    extrinsics[:, :3, 3] *= s / 2
    output = run(extrinsics)  # exactly what the pipeline runs
    prediction = model.predict(
        images,
        extrinsics=extrinsics,
        intrinsics=intrinsics,
        options=InferenceOptions(
            process_res=PROCESS_RES,
            output_resolution="processing",
            infer_gaussians=True,
            mixed_shapes="crop",  # upstream's handling of other shapes
        ),
    )
    assert output.gaussian_parameters is not None
    parameters = output.gaussian_parameters
    ratio = parameters.depth[0] / torch.from_numpy(prediction.depth)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), rtol=1e-4, atol=0)
    user = torch.from_numpy(extrinsics).float()[None]
    network_units = user.clone()
    network_units[..., :3, 3] *= ratio.mean()
    with torch.inference_mode():
        reference = small_gs.upstream.gs_adapter(
            extrinsics=network_units,
            intrinsics=batch.intrinsics[None],
            depths=parameters.depth,
            opacities=parameters.opacities,
            raw_gaussians=parameters.raw,
            image_shape=tuple(parameters.depth.shape[-2:]),
            gt_extrinsics=user,
        )
    ours = prediction.gaussians
    assert ours is not None
    errors = {
        name: relative_error(torch.tensor(getattr(ours, name)), getattr(reference, name)[0])
        for name in GAUSSIAN_FIELDS
    }
    assert_parity(errors)


def test_every_official_model_is_a_preset() -> None:
    """Upstream's registry names are the config.json model names of the official repos."""
    from depth_anything_3.registry import MODEL_REGISTRY

    from da3cog.model.presets import PRESETS

    assert set(MODEL_REGISTRY) == set(PRESETS)
