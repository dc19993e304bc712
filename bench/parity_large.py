#!/usr/bin/env python
"""Stage-by-stage parity of da3cog against the official ``depth_anything_3`` (0.1.1) for the
large models, on the same random-weight checkpoint.

    python bench/parity_large.py --model da3-large [--res 140] [--device cpu]
    python bench/parity_large.py --model da3-giant

The same check CI runs for da3-small / da3-base, for models too big for CI: upstream's network
is built and given CI's random weights by ``tests/oracle.save_checkpoint`` (which also writes
the Hub-layout folder), ours is loaded from that folder by ``da3cog.load_model``, and both run
in fp32 on the same low-resolution photos (skimage astronaut, coffee, chelsea, rocket through
``da3cog.io.prepare_images``) for 1, 2 and 4 views:

* ``plain``: no cameras (>= 3 views exercise reference-view selection);
* ``posed``: pose conditioning with synthetic cameras (extrinsics normalised by
  ``da3cog.geometry.normalize_pose_conditioning``, intrinsics in processing pixels);
* ``rays``: cameras from the ray map (RANSAC); upstream draws its samples from torch's global
  RNG, seeded with ``torch.manual_seed(s)`` right before its call, ours from
  ``generator=torch.Generator().manual_seed(s)``, in the same order.

For every stage it prints max|ours - upstream| / std(upstream): each backbone output layer's
features and camera token, the head's ray map and ray confidence, depth, depth_conf, extrinsics
and intrinsics. Exits 1 if any ratio exceeds ``--threshold`` (1e-3).

Memory: upstream runs every case first, its outputs are kept (small at this resolution), and it
is freed before ours is loaded, so only one network is in memory at a time (giant: ~6 GB).
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from oracle import save_checkpoint  # noqa: E402

from da3cog import load_model  # noqa: E402
from da3cog.geometry import normalize_pose_conditioning  # noqa: E402
from da3cog.io import prepare_images  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
KINDS = ("plain", "posed", "rays")
MODELS = ("da3-small", "da3-base", "da3-large", "da3-giant")

Outputs = dict[str, torch.Tensor]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _log(message: str, started: float) -> None:
    print(
        f"[{time.perf_counter() - started:7.1f}s, peak RSS {_peak_rss_gib():5.1f} GiB] {message}",
        flush=True,
    )


def make_inputs(res: int) -> torch.Tensor:
    """``(4, 3, H, W)`` ImageNet-normalised photos at ``res`` (upper_bound_resize)."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    return prepare_images(photos, res, "upper_bound_resize").images


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def make_cameras(views: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic cameras on a short arc: normalised world-to-camera extrinsics ``(1, N, 4, 4)``
    and intrinsics ``(1, N, 3, 3)`` in processing pixels."""
    extrinsics, intrinsics = [], []
    for index in range(views):
        rotation = _rotation(0.15 * index, 0.03 * (index % 2), 0.01 * index)
        centre = np.array([0.4 * index, 0.05 * index, 0.1 * index * index])
        world_to_camera = np.eye(4)
        world_to_camera[:3, :3] = rotation
        world_to_camera[:3, 3] = -rotation @ centre
        extrinsics.append(world_to_camera)
        focal = 0.9 * max(height, width) * (1 + 0.05 * index)
        intrinsics.append(
            [[focal, 0, width / 2 + index], [0, focal * 1.01, height / 2 - index], [0, 0, 1]]
        )
    extrinsics_t = torch.tensor(np.stack(extrinsics), dtype=torch.float32)[None]
    intrinsics_t = torch.tensor(intrinsics, dtype=torch.float32)[None]
    return normalize_pose_conditioning(extrinsics_t), intrinsics_t


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().cpu().clone()


def run_upstream(model, cases, args) -> dict[str, Outputs]:
    captured: dict = {}

    def backbone_hook(_module, _inputs, output) -> None:
        layers, _aux = output
        captured["backbone"] = [(_cpu(f), _cpu(t)) for f, t in layers]

    def head_hook(_module, _inputs, output) -> None:
        captured["rays"] = _cpu(output["ray"])
        captured["ray_conf"] = _cpu(output["ray_conf"])

    hooks = [
        model.backbone.register_forward_hook(backbone_hook),
        model.head.register_forward_hook(head_hook),
    ]
    results: dict[str, Outputs] = {}
    try:
        for name, (images, kind, extrinsics, intrinsics) in cases.items():
            captured.clear()
            kwargs = {"ref_view_strategy": args.reference_strategy}
            if kind == "posed":
                output = model(images, extrinsics.clone(), intrinsics.clone(), **kwargs)
            elif kind == "rays":
                torch.manual_seed(args.ray_seed)
                output = model(images, use_ray_pose=True, **kwargs)
            else:
                output = model(images, **kwargs)
            stages: Outputs = {}
            for layer, (features, token) in enumerate(captured["backbone"]):
                stages[f"backbone.{layer}.features"] = features
                stages[f"backbone.{layer}.camera_token"] = token
            stages["head.rays"] = captured["rays"]
            stages["head.ray_conf"] = captured["ray_conf"]
            for key in ("depth", "depth_conf", "extrinsics", "intrinsics"):
                stages[key] = _cpu(output[key])
            results[name] = stages
    finally:
        for hook in hooks:
            hook.remove()
    return results


def run_ours(network, cases, args) -> dict[str, Outputs]:
    results: dict[str, Outputs] = {}
    for name, (images, kind, extrinsics, intrinsics) in cases.items():
        generator = None
        if kind == "rays":
            generator = torch.Generator(device=images.device).manual_seed(args.ray_seed)
        output = network(
            images,
            extrinsics if kind == "posed" else None,
            intrinsics if kind == "posed" else None,
            reference_strategy=args.reference_strategy,
            pose_from_rays=kind == "rays",
            generator=generator,
        )
        stages: Outputs = {}
        backbone = output.backbone
        for layer, (features, token) in enumerate(
            zip(backbone.features, backbone.camera_tokens, strict=True)
        ):
            stages[f"backbone.{layer}.features"] = _cpu(features)
            stages[f"backbone.{layer}.camera_token"] = _cpu(token)
        stages["head.rays"] = _cpu(output.rays)
        stages["head.ray_conf"] = _cpu(output.ray_conf)
        for key in ("depth", "depth_conf", "extrinsics", "intrinsics"):
            stages[key] = _cpu(getattr(output, key))
        results[name] = stages
    return results


def compare(ours: dict[str, Outputs], upstream: dict[str, Outputs], threshold: float) -> int:
    header = f"{'case':<12}{'stage':<28}{'shape':<26}{'max|d|':>11}{'std(up)':>11}{'ratio':>11}"
    print(header)
    print("-" * (len(header) + 6))
    failures = 0
    worst = (-1.0, "")
    for case, stages in upstream.items():
        for stage, reference in stages.items():
            mine = ours[case].get(stage)
            if mine is None or mine.shape != reference.shape:
                got = None if mine is None else tuple(mine.shape)
                print(f"{case:<12}{stage:<28}shape ours {got} vs upstream {tuple(reference.shape)}"
                      "  FAIL")
                failures += 1
                continue
            reference64, mine64 = reference.double(), mine.double()
            diff = float((mine64 - reference64).abs().max())
            std = float(reference64.std()) if reference64.numel() > 1 else 0.0
            scale = std if std > 0 else max(float(reference64.abs().max()), 1.0)
            ratio = diff / scale
            if not math.isfinite(ratio) or ratio > threshold:
                failures += 1
                flag = "  FAIL"
            else:
                flag = ""
            if ratio > worst[0] or not math.isfinite(ratio):
                worst = (ratio, f"{case} {stage}")
            shape = "x".join(str(s) for s in reference.shape)
            print(f"{case:<12}{stage:<28}{shape:<26}{diff:>11.2e}{std:>11.3e}{ratio:>11.2e}{flag}")
    print()
    print(f"worst ratio {worst[0]:.2e} ({worst[1]}); threshold {threshold:g}; "
          f"{failures} stage(s) over it")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="da3-large", choices=MODELS)
    parser.add_argument("--res", type=int, default=140, help="process_res (112-140 suggested)")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--ray-seed", type=int, default=0, help="seed of the ray RANSAC")
    parser.add_argument("--reference-strategy", default="saddle_balanced")
    parser.add_argument("--threshold", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (fp32, TF32 off)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary checkpoint folder goes (default: system tmp)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"model {args.model}, device {device}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, process_res {args.res}, views {args.views}, "
          f"kinds {args.kinds}, weight seed {args.seed}, ray seed {args.ray_seed}")

    photos = make_inputs(args.res)
    height, width = photos.shape[-2:]
    print(f"input {tuple(photos.shape)} from {', '.join(PHOTOS)}")
    cases = {}
    for views in args.views:
        images = photos[:views][None].to(device)
        extrinsics, intrinsics = make_cameras(views, height, width)
        for kind in args.kinds:
            cases[f"{kind}-{views}v"] = (
                images, kind, extrinsics.to(device), intrinsics.to(device)
            )

    with tempfile.TemporaryDirectory(prefix="da3parity-", dir=args.workdir) as scratch:
        folder = Path(scratch) / args.model
        wrapper = save_checkpoint(args.model, folder, args.seed)
        size = (folder / "model.safetensors").stat().st_size / 2**30
        _log(f"upstream built with CI's random weights, checkpoint written ({size:.2f} GiB)",
             started)
        upstream_model = wrapper.model.to(device).eval()
        with torch.inference_mode():
            upstream = run_upstream(upstream_model, cases, args)
        _log(f"upstream ran {len(cases)} cases", started)
        del wrapper, upstream_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        network = load_model(folder, device=device).network
        _log("ours loaded from the folder", started)
        with torch.inference_mode():
            ours = run_ours(network, cases, args)
        _log(f"ours ran {len(cases)} cases", started)
        del network
        gc.collect()

    print()
    failures = compare(ours, upstream, args.threshold)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
