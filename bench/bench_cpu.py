#!/usr/bin/env python
"""Benchmark da3cog against the official ``depth_anything_3`` (0.1.1) on the same checkpoint.

    python bench/bench_cpu.py [--models small base] [--repeats N] [--res 504] [--device cpu]
                              [--views 1 4] [--rss-views 4] [--measure cold latency rss]

    # the paper's throughput setting on a GPU (32 views at 504x336, bf16):
    python bench/bench_cpu.py --device cuda --models small base large giant --views 32 \
                              --rss-views 32 --measure latency rss
    # cold start of the deployment's defaults (on a CPU the first forward is slow: low res)
    python bench/bench_cpu.py --models giant nested --measure cold --res 280

For every model a Hub-layout checkpoint folder with random weights (``tests/oracle.py``
``save_checkpoint``, the weights CI uses) is written once under ``bench/.cache/`` and then both
implementations load that same folder. Every measurement runs in its own fresh subprocess:

* cold start: process start -> model ready (then, in the same child, the first 1-view
  forward, since ours leaves CPU weights memory-mapped until they are first used). Ours:
  ``from da3cog import load_model; load_model(folder)``. Upstream:
  ``UpstreamCheckpoint.from_pretrained(folder)`` - the ``PyTorchModelHubMixin`` path of
  upstream's ``DepthAnything3.from_pretrained`` (whose module cannot be imported here): random
  init of the whole network, then a safetensors load into it.
* latency: forwards of the network for each ``--views`` count on real photos (skimage
  astronaut, coffee, chelsea, rocket; above 4 views, 400x600 crops of the Middlebury
  motorcycle pair) preprocessed once by ``da3cog.io.prepare_images`` (the identical tensor
  goes to both), warm-up once, median of ``--repeats``; from 32 views also views/s. fp32 on
  CPU; on CUDA the backbone runs under bf16 autocast on both sides. The depth of both sides is
  compared so the timing compares equal work.
* peak RSS: load + one ``--rss-views`` forward, ``ru_maxrss`` of a fresh process per side.

This is a script, not a test; it exits 2 if the two implementations disagree on the benchmark
input and, with ``--strict``, 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from random_checkpoints import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DEFAULT_CACHE = ROOT / "bench" / ".cache"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
VIEW_COUNTS = (1, 4)

# Targets: cold start upstream/ours, latency upstream/ours, peak RSS ours/upstream.
COLD_TARGET = 5.0
LATENCY_TARGET = 1.0
# The paper's throughput setting on a GPU: 32 views at 504x336 in bf16, views/s >= 1.5x.
THROUGHPUT_VIEWS = 32
THROUGHPUT_TARGET = 1.5
RSS_TARGET = 0.8
# max|ours - upstream| / std(upstream) of the benchmark depth.
PARITY_TOLERANCE = {"fp32": 1e-3}

UPSTREAM_LOAD_PATH = (
    "PyTorchModelHubMixin.from_pretrained(folder) on tests/oracle.UpstreamCheckpoint, the same "
    "mixin path as depth_anything_3.api.DepthAnything3.from_pretrained: the whole network is "
    "built with random init (cfg.create_object), then safetensors.torch.load_model(strict=False) "
    "copies the file into it; .eval()"
)
OURS_LOAD_PATH = (
    "da3cog.load_model(folder): network built on the meta device, safetensors tensors assigned "
    "into it (no init), strict key check. On CPU the assigned tensors stay a private mmap of "
    "model.safetensors, so reading the weights is deferred to the first forward: the 'first "
    "1-view forward' and 'cold start -> first depth' rows include it"
)

# Cold-start children: nothing but the import and the load a user would run.
OURS_COLD = """
import json, sys, time
from da3cog import load_model
imported = time.monotonic()
network = load_model(sys.argv[1], device=sys.argv[2]).network
import torch
cuda = sys.argv[2].startswith("cuda")
if cuda:
    torch.cuda.synchronize()
ready = time.monotonic()
images = torch.load(sys.argv[4])["1"][None].to(sys.argv[2])
started = time.monotonic()
with torch.inference_mode():
    network(images, autocast_dtype=torch.bfloat16 if cuda else None)
if cuda:
    torch.cuda.synchronize()
print(json.dumps({"imported": imported, "ready": ready, "forward": time.monotonic() - started}))
"""
UPSTREAM_COLD = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
from oracle import UpstreamCheckpoint
imported = time.monotonic()
model = UpstreamCheckpoint.from_pretrained(sys.argv[1]).model.to(sys.argv[2])
import torch
cuda = sys.argv[2].startswith("cuda")
if cuda:
    torch.cuda.synchronize()
ready = time.monotonic()
images = torch.load(sys.argv[4])["1"][None].to(sys.argv[2])
started = time.monotonic()
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
    model(images)
if cuda:
    torch.cuda.synchronize()
print(json.dumps({"imported": imported, "ready": ready, "forward": time.monotonic() - started}))
"""
WRITE_CHECKPOINT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from oracle import save_checkpoint
save_checkpoint(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
print("{}")
"""


# --------------------------------------------------------------------------------------------
# Subprocess plumbing
# --------------------------------------------------------------------------------------------


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in child output:\n{stdout[-2000:]}")


def _run_child(argv: list[str], what: str) -> tuple[dict, float]:
    """Run a child Python process; returns its last JSON line and the monotonic start time."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return _last_json(result.stdout), started


def _worker(mode: str, spec: dict, what: str) -> dict:
    argv = [str(Path(__file__).resolve()), "--worker", mode, "--spec", json.dumps(spec)]
    return _run_child(argv, what)[0]


# --------------------------------------------------------------------------------------------
# Worker side (runs in the child processes)
# --------------------------------------------------------------------------------------------


def _maxrss_mib() -> float:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _vmhwm_mib() -> float | None:
    """Peak RSS of this process image (Linux ``VmHWM``; unlike ``ru_maxrss`` it does not carry
    the parent's RSS over ``fork``/``exec``)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def _head_views(model, images, device: str, heads: str) -> int:
    """Head tails at once for ours: ``shipped``, what the pipeline picks on this device
    (:func:`da3cog.memory.head_views`: one on a CPU, as many as fit on a GPU); ``lever``, the
    other choice (every view where ours runs one, else one), the lever ``--lever-heads``
    times beside it."""
    from da3cog import memory

    views, height, width = images.shape[1], images.shape[-2], images.shape[-1]
    shipped = memory.head_views(model.preset, views, (height, width), images.device)
    if heads == "shipped":
        return shipped
    return 1 if shipped > 1 else views


def _load(side: str, folder: str, device: str):
    if side == "ours":
        from da3cog import load_model

        return load_model(folder, device=device).network
    sys.path.insert(0, str(TESTS))
    from oracle import UpstreamCheckpoint

    return UpstreamCheckpoint.from_pretrained(folder).model.to(device)


def _forward(
    side: str, model, images, device: str, bf16: bool | None = None, head_views: int = 1
):
    """One network forward; returns (depth, extrinsics). ``bf16``: backbone under bf16 autocast
    (default: on CUDA)."""
    import torch

    cuda = device.startswith("cuda") if bf16 is None else bf16
    if side == "ours":
        output = model(
            images, autocast_dtype=torch.bfloat16 if cuda else None, head_views=head_views
        )
        return output.depth, output.extrinsics
    context = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    )
    with context:
        output = model(images)
    return output["depth"], output["extrinsics"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _clear_upstream_caches(model) -> None:
    """Drop upstream's memoised RoPE tables. Its RotaryPositionEmbedding2D caches cos/sin keyed
    by the tokens' dtype only, so tables computed under bf16 autocast (its einsum then runs in
    bf16 on CUDA) would leak into a later fp32 forward of the same process."""
    for module in model.modules():
        for name in ("frequency_cache", "position_cache"):
            cache = getattr(module, name, None)
            if isinstance(cache, dict):
                cache.clear()


def _count_ops(side: str, model, images, device: str, head_views: int = 1) -> dict:
    """Operations of one forward under torch.profiler: leaf aten ops (each launches one kernel
    or CPU loop; what a launch-bound GPU forward pays for) and, on CUDA, the GPU kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        _forward(side, model, images, device, head_views=head_views)
        _sync(device)
    events = profiler.events()
    counts = {
        "aten": sum(1 for e in events if e.name.startswith("aten::") and not e.cpu_children)
    }
    if device.startswith("cuda"):
        counts["kernels"] = sum(1 for e in events if e.device_type.name == "CUDA")
    return counts


def _count_syncs(side: str, model, images, device: str, head_views: int = 1) -> int | None:
    """Host synchronisations one CUDA forward makes (``torch.cuda.set_sync_debug_mode``
    warns at each); None off CUDA or where the mode is unavailable."""
    import warnings

    import torch

    if not device.startswith("cuda"):
        return None
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _forward(side, model, images, device, head_views=head_views)
        return sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    except Exception:  # a probe that fails must not cost the timing rows
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def worker_latency(spec: dict) -> dict:
    import numpy as np
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model = _load(spec["side"], spec["folder"], device)
    if spec.get("compile"):
        # The backbone only: the rest of the forward is data-dependent Python (reference view,
        # RANSAC) and the heads are a small share of the time at the paper's setting.
        mode = None if spec["compile"] == "default" else spec["compile"]
        for network in [m for m in model.modules() if hasattr(m, "backbone")]:  # nested: two
            network.backbone = torch.compile(network.backbone, mode=mode, dynamic=False)
    inputs = torch.load(spec["inputs"])
    result: dict = {
        "threads": torch.get_num_threads(), "latency": {}, "ops": {}, "head_views": {},
        "first_call": {},
    }
    arrays = {}
    with torch.inference_mode():
        for views in spec["views"]:
            images = inputs[str(views)][None].to(device)
            tails = 1
            if spec["side"] == "ours":
                tails = _head_views(model, images, device, spec["heads"])
                result["head_views"][str(views)] = tails
            run = functools.partial(_forward, head_views=tails)
            started = time.perf_counter()
            depth, extrinsics = run(spec["side"], model, images, device)  # warm-up
            _sync(device)
            result["first_call"][str(views)] = time.perf_counter() - started
            arrays[f"depth_{views}"] = depth.float().cpu().numpy()
            arrays[f"extrinsics_{views}"] = extrinsics.float().cpu().numpy()
            times = []
            for _ in range(spec["repeats"]):
                _sync(device)
                started = time.perf_counter()
                run(spec["side"], model, images, device)
                _sync(device)
                times.append(time.perf_counter() - started)
            result["latency"][str(views)] = times
            result["ops"][str(views)] = _count_ops(spec["side"], model, images, device, tails)
            syncs = _count_syncs(spec["side"], model, images, device, tails)
            if syncs is not None:
                result["ops"][str(views)]["syncs"] = syncs
            if device.startswith("cuda"):
                # fp32 reference (TF32 off): the yardstick for the bf16 comparison.
                flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                _clear_upstream_caches(model)
                depth, extrinsics = run(spec["side"], model, images, device, bf16=False)
                _clear_upstream_caches(model)
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
                arrays[f"fp32_depth_{views}"] = depth.float().cpu().numpy()
                arrays[f"fp32_extrinsics_{views}"] = extrinsics.float().cpu().numpy()
    np.savez(spec["out"], **arrays)
    return result


def worker_rss(spec: dict) -> dict:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    imported = _maxrss_mib()
    model = _load(spec["side"], spec["folder"], device)
    loaded = _maxrss_mib()
    images = torch.load(spec["inputs"])[str(spec["views"])][None].to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        _forward(spec["side"], model, images, device)
    _sync(device)
    result = {
        "imported": imported, "loaded": loaded, "peak": _maxrss_mib(), "vmhwm": _vmhwm_mib()
    }
    if device.startswith("cuda"):
        result["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def worker_env(spec: dict) -> dict:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    info["parallel"] = torch.__config__.parallel_info().splitlines()[0:4]
    if spec["device"].startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(spec["device"]))
    return info


def worker_inputs(spec: dict) -> dict:
    import skimage.data
    import torch

    from da3cog.io import prepare_images

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    # More views than photos (the paper's throughput setting, 32 views at 504x336): 3:2 crops
    # of 400x600 panning across the Middlebury motorcycle pair.
    left, right, _ = skimage.data.stereo_motorcycle()

    def crops(count: int) -> list:
        offsets = [(v // 2) * (left.shape[1] - 600) // max(count // 2, 1) for v in range(count)]
        return [
            ((left, right)[v % 2])[50:450, x : x + 600] for v, x in enumerate(offsets)
        ]

    batches = {
        str(views): prepare_images(
            photos[:views] if views <= len(photos) else crops(views),
            spec["res"],
            "upper_bound_resize",
        ).images
        for views in spec["views"]
    }
    torch.save(batches, spec["path"])
    return {key: list(batch.shape) for key, batch in batches.items()}


def worker_compare(spec: dict) -> dict:
    """[max|a - b|, std(b), ratio] for ours vs upstream of every saved array; with fp32
    references (CUDA) also each side's bf16 result vs its own fp32 one (``self_*`` keys)."""
    import numpy as np

    def stats(a: np.ndarray, b: np.ndarray, key: str) -> list[float]:
        if a.shape != b.shape:
            raise RuntimeError(f"{key}: shapes {a.shape} vs {b.shape}")
        a, b = a.astype(np.float64), b.astype(np.float64)
        diff, std = float(np.abs(a - b).max()), float(b.std())
        return [diff, std, diff / std if std > 0 else float("inf")]

    result = {}
    with np.load(spec["ours"]) as ours, np.load(spec["upstream"]) as upstream:
        for key in upstream.files:
            result[key] = stats(ours[key], upstream[key], key)
            if f"fp32_{key}" in upstream.files:
                result[f"self_ours_{key}"] = stats(ours[key], ours[f"fp32_{key}"], key)
                result[f"self_upstream_{key}"] = stats(
                    upstream[key], upstream[f"fp32_{key}"], key
                )
    return result


WORKERS = {
    "env": worker_env,
    "inputs": worker_inputs,
    "latency": worker_latency,
    "rss": worker_rss,
    "compare": worker_compare,
}


# --------------------------------------------------------------------------------------------
# Parent side (standard library only, so its RSS does not raise the children's ru_maxrss:
# Linux carries the parent's peak over fork/exec into the child's ru_maxrss)
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown (not installed as a distribution)"


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def print_environment(args: argparse.Namespace) -> None:
    env = _worker("env", {"threads": args.threads, "device": args.device}, "environment probe")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print("== environment")
    print(f"python            {platform.python_version()} ({sys.executable})")
    print(f"torch             {env['torch']}, intra-op threads {env['threads']}")
    for line in env["parallel"]:
        print(f"                  {line}")
    print(f"cpu               {_cpu_model()}; {os.cpu_count()} logical CPUs, {affinity} usable")
    print(f"memory            {_mem_total_gib()}")
    print(f"load average      {_loadavg()} (other work on the machine skews the timings)")
    if "gpu" in env:
        print(f"gpu               {env['gpu']}")
    for package in ("da3cog", "depth-anything-3", "safetensors", "huggingface-hub"):
        print(f"{package:<18}{_version(package)}")
    print(f"ours load         {OURS_LOAD_PATH}")
    print(f"upstream load     {UPSTREAM_LOAD_PATH}")
    if args.device.startswith("cuda"):
        print(
            "precision         CUDA: backbone under bf16 autocast on both sides (ours: "
            "autocast_dtype=torch.bfloat16; upstream: torch.autocast('cuda', dtype=torch.bfloat16) "
            "around model(images), its heads disable autocast themselves); timing with "
            "torch.cuda.synchronize"
        )
    else:
        print("precision         fp32 on CPU, torch.inference_mode, both sides")
    print(f"input             {', '.join(PHOTOS)} (skimage.data), process_res {args.res}, "
          "upper_bound_resize via da3cog.io.prepare_images (one tensor, fed to both)")
    print("peak RSS          resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh child per side "
          "(parent kept light: its RSS would floor the child's); /proc VmHWM as cross-check")
    print()


def ensure_checkpoint(model_name: str, seed: int, cache: Path) -> Path:
    folder = cache / f"{model_name}-seed{seed}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    print(f"writing random-weight checkpoint {folder} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        staging = Path(scratch) / "checkpoint"
        _run_child(
            ["-c", WRITE_CHECKPOINT, model_name, str(staging), str(seed), str(TESTS)],
            f"writing the {model_name} checkpoint",
        )
        os.replace(staging, folder)
    return folder


def measure_cold(
    folder: Path, inputs: Path, args: argparse.Namespace
) -> dict[str, list[tuple[float, float, float]]]:
    """(process start -> ready, import part, first 1-view forward) per run, sides interleaved."""
    code = {"ours": OURS_COLD, "upstream": UPSTREAM_COLD}
    runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "upstream": []}
    for index in range(args.cold_runs + 1):  # run 0 warms the page cache, not counted
        for side in ("ours", "upstream"):
            argv = ["-c", code[side], str(folder), args.device, str(TESTS), str(inputs)]
            result, started = _run_child(argv, f"{side} cold start")
            if index:
                runs[side].append((
                    result["ready"] - started, result["imported"] - started, result["forward"]
                ))
    return runs


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value * 1000:.0f} ms"
    return f"{value:.0f} MiB"


def bench_model(
    name: str, args: argparse.Namespace, inputs: Path, scratch: Path
) -> tuple[list, bool]:
    rows: list[tuple[str, ...]] = []
    folder = ensure_checkpoint(name, args.seed, args.cache_dir)
    size_mib = (folder / "model.safetensors").stat().st_size / 2**20
    print(f"[{name}] checkpoint {folder} ({size_mib:.0f} MiB)", flush=True)

    if "cold" in args.measure:
        rows += _cold_rows(name, folder, inputs, args)
    agree = True
    if "latency" in args.measure:
        latency_rows, agree = _latency_rows(name, folder, args, inputs, scratch)
        rows += latency_rows
    if "rss" in args.measure:
        rows += _rss_rows(name, folder, args, inputs)
    return rows, agree


def _cold_rows(
    name: str, folder: Path, inputs: Path, args: argparse.Namespace
) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    print(f"[{name}] cold start, {args.cold_runs} runs per side (+1 warm-up) ...", flush=True)
    cold = measure_cold(folder, inputs, args)
    medians = {side: statistics.median(r[0] for r in runs) for side, runs in cold.items()}
    imports = {side: statistics.median(r[1] for r in runs) for side, runs in cold.items()}
    firsts = {side: statistics.median(r[2] for r in runs) for side, runs in cold.items()}
    ratio = medians["upstream"] / medians["ours"]
    rows.append((
        name, "cold start -> ready (median)", _fmt(medians["ours"], "s"),
        _fmt(medians["upstream"], "s"), f"{ratio:.2f}x faster", f">= {COLD_TARGET:g}x",
        "PASS" if ratio >= COLD_TARGET else "MISS",
    ))
    rows.append((
        name, "  of which process start + imports", _fmt(imports["ours"], "s"),
        _fmt(imports["upstream"], "s"), f"{imports['upstream'] / imports['ours']:.2f}x", "", "",
    ))
    rows.append((
        name, "  of which load (after import)", _fmt(medians["ours"] - imports["ours"], "s"),
        _fmt(medians["upstream"] - imports["upstream"], "s"),
        f"{(medians['upstream'] - imports['upstream']) / (medians['ours'] - imports['ours']):.2f}x",
        "", "",
    ))
    rows.append((
        name, "first 1-view forward after load", _fmt(firsts["ours"], "ms"),
        _fmt(firsts["upstream"], "ms"), f"{firsts['upstream'] / firsts['ours']:.2f}x", "", "",
    ))
    total = {side: medians[side] + firsts[side] for side in medians}
    rows.append((
        name, "cold start -> first depth", _fmt(total["ours"], "s"), _fmt(total["upstream"], "s"),
        f"{total['upstream'] / total['ours']:.2f}x faster", "", "",
    ))

    return rows


def _latency_rows(
    name: str, folder: Path, args: argparse.Namespace, inputs: Path, scratch: Path
) -> tuple[list[tuple[str, ...]], bool]:
    rows: list[tuple[str, ...]] = []
    latency = {}
    outputs = {}
    runs = [("ours", "ours", "shipped", None), ("upstream", "upstream", "shipped", None)]
    if args.lever_heads:
        runs.append(("ours, lever", "ours", "lever", None))
    if args.lever_compile:
        runs.append(("ours, compiled", "ours", "shipped", args.lever_compile))
    # Round after round, the sides' order reversed each time: on a loaded machine a side
    # does not get all its forwards in one quiet (or busy) stretch.
    for round_index in range(args.rounds):
        for label, side, heads, compile_mode in runs[:: 1 if round_index % 2 == 0 else -1]:
            print(
                f"[{name}] latency {label} (warm-up + {args.repeats} repeats; round "
                f"{round_index + 1} of {args.rounds}) ...",
                flush=True,
            )
            out = scratch / f"{name}-{label.replace(', ', '-')}.npz"
            measured = _worker(
                "latency",
                {
                    "side": side, "folder": str(folder), "inputs": str(inputs),
                    "device": args.device, "repeats": args.repeats, "threads": args.threads,
                    "out": str(out), "views": args.views, "heads": heads,
                    "compile": compile_mode,
                },
                f"{label} latency",
            )
            if label in latency:
                for views, times in measured["latency"].items():
                    latency[label]["latency"][views] += times
            else:
                latency[label] = measured
            outputs[label] = str(out)
    for views in args.views:
        ours_t = statistics.median(latency["ours"]["latency"][str(views)])
        up_t = statistics.median(latency["upstream"]["latency"][str(views)])
        ratio = up_t / ours_t
        rows.append((
            name,
            f"latency {views} view{'s' if views > 1 else ''} (median of "
            f"{args.repeats * args.rounds})",
            _fmt(ours_t, "ms"), _fmt(up_t, "ms"), f"{ratio:.3f}x faster",
            f">= {LATENCY_TARGET:g}x", "PASS" if ratio >= LATENCY_TARGET else "MISS",
        ))
        if views >= THROUGHPUT_VIEWS:
            gpu = args.device.startswith("cuda")
            rows.append((
                name, f"  views/s at {views} views", f"{views / ours_t:.1f}",
                f"{views / up_t:.1f}", f"{ratio:.2f}x",
                f">= {THROUGHPUT_TARGET:g}x" if gpu else "info (GPU target)",
                ("PASS" if ratio >= THROUGHPUT_TARGET else "MISS") if gpu else "",
            ))
        for kind, label in (
            ("aten", "leaf aten ops"), ("kernels", "CUDA kernels"), ("syncs", "host syncs"),
        ):
            ours_n = latency["ours"]["ops"][str(views)].get(kind)
            up_n = latency["upstream"]["ops"][str(views)].get(kind)
            if ours_n is not None and up_n is not None:
                rows.append((
                    name, f"  {label} per {views}-view forward", str(ours_n), str(up_n),
                    f"{ours_n / up_n:.2f} of upstream" if up_n else "", "info", "",
                ))

    if args.lever_heads:
        rows.extend(_lever_rows(name, args, latency, outputs))
    if args.lever_compile:
        rows.extend(_compile_rows(name, args, latency, outputs))
    parity = _worker(
        "compare", {"ours": outputs["ours"], "upstream": outputs["upstream"]}, "output comparison"
    )
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    tolerance = PARITY_TOLERANCE["fp32"]
    agree = True
    for views in args.views:
        for what in ("depth", "extrinsics"):
            key = f"{what}_{views}"
            diff, std, rel = parity[key]
            if precision == "fp32":
                ok = rel <= tolerance
                rows.append((
                    name, f"parity {what} {views}v max|d|/std", f"max|d| {diff:.2e}",
                    f"std {std:.3e}", f"{rel:.2e}", f"<= {tolerance:g} (fp32)",
                    "OK" if ok else "DIFFER",
                ))
                agree &= ok
                continue
            # bf16: the two implementations round differently (and the random weights amplify
            # rounding), so equal work is established by fp32 parity on the same device and
            # input; the bf16 rows are information: each side's bf16 error vs its own fp32.
            _, _, fp32_rel = parity[f"fp32_{key}"]
            ours_err = parity[f"self_ours_{key}"][2]
            upstream_err = parity[f"self_upstream_{key}"][2]
            fp32_ok = fp32_rel <= PARITY_TOLERANCE["fp32"]
            agree &= fp32_ok
            rows.append((
                name, f"parity {what} {views}v fp32 max|d|/std", f"max|d| "
                f"{parity[f'fp32_{key}'][0]:.2e}", f"std {parity[f'fp32_{key}'][1]:.3e}",
                f"{fp32_rel:.2e}", f"<= {PARITY_TOLERANCE['fp32']:g}",
                "OK" if fp32_ok else "DIFFER",
            ))
            rows.append((
                name, "  bf16 ours vs upstream max|d|/std", f"max|d| {diff:.2e}",
                f"std {std:.3e}", f"{rel:.2e}", "info", "",
            ))
            rows.append((
                name, "  bf16 error vs own fp32 (/std)", f"{ours_err:.2e}", f"{upstream_err:.2e}",
                f"{ours_err / upstream_err:.2f}x" if upstream_err else "", "info", "",
            ))
    return rows, agree


def _lever_rows(
    name: str, args: argparse.Namespace, latency: dict, outputs: dict
) -> list[tuple[str, ...]]:
    """``--lever-heads``: ours with the other number of head tails at once (every view where
    ours runs one, else one) against ours as shipped: time, launches, and how far its depth
    moves (in fp32 with TF32 off on CUDA: in bf16 with TF32 convolutions another batch size
    picks other kernels, whose rounding a random-weight network amplifies)."""
    rows: list[tuple[str, ...]] = []
    lever = latency["ours, lever"]
    for views in args.views:
        shipped_n = latency["ours"]["head_views"][str(views)]
        lever_n = lever["head_views"][str(views)]
        shipped_t = statistics.median(latency["ours"]["latency"][str(views)])
        lever_t = statistics.median(lever["latency"][str(views)])
        rows.append((
            name, f"  lever: head tails {lever_n} at once, {views} views", _fmt(lever_t, "ms"),
            _fmt(shipped_t, "ms") + f" (ours, {shipped_n})", f"{shipped_t / lever_t:.3f}x faster",
            "info", "",
        ))
        ops = lever["ops"][str(views)].get("kernels", lever["ops"][str(views)]["aten"])
        shipped_ops = latency["ours"]["ops"][str(views)].get(
            "kernels", latency["ours"]["ops"][str(views)]["aten"]
        )
        kind = "CUDA kernels" if "kernels" in lever["ops"][str(views)] else "leaf aten ops"
        rows.append((
            name, f"  lever: {kind}, {views} views", str(ops), f"{shipped_ops} (ours)",
            f"{ops / shipped_ops:.2f} of ours", "info", "",
        ))
    return rows + _moved_rows(name, args, outputs, "ours, lever", "depth")


def _moved_rows(
    name: str, args: argparse.Namespace, outputs: dict, label: str, what: str
) -> list[tuple[str, ...]]:
    """How far a lever's depth moved from ours as shipped: the fp32 outputs (TF32 off) on
    CUDA, where each run also saves them, else the timed ones (fp32 on a CPU)."""
    moved = _worker(
        "compare", {"ours": outputs[label], "upstream": outputs["ours"]}, f"{label} comparison"
    )
    rows = []
    for views in args.views:
        key = f"fp32_depth_{views}" if f"fp32_depth_{views}" in moved else f"depth_{views}"
        diff, std, rel = moved[key]
        rows.append((
            name, f"  lever: {what} {views}v fp32 vs ours max|d|/std", f"max|d| {diff:.2e}",
            f"std {std:.3e}", f"{rel:.2e}", f"<= {PARITY_TOLERANCE['fp32']:g}",
            "OK" if rel <= PARITY_TOLERANCE["fp32"] else "DIFFER",
        ))
    return rows


def _compile_rows(
    name: str, args: argparse.Namespace, latency: dict, outputs: dict
) -> list[tuple[str, ...]]:
    """``--lever-compile MODE``: ours with ``torch.compile`` on the backbone against ours as
    shipped: time, the first call (compiling included), and its fp32 depth against ours."""
    rows: list[tuple[str, ...]] = []
    compiled = latency["ours, compiled"]
    for views in args.views:
        shipped_t = statistics.median(latency["ours"]["latency"][str(views)])
        compiled_t = statistics.median(compiled["latency"][str(views)])
        rows.append((
            name, f"  lever: compiled backbone ({args.lever_compile}), {views} views",
            _fmt(compiled_t, "ms"), _fmt(shipped_t, "ms") + " (ours)",
            f"{shipped_t / compiled_t:.3f}x faster", "info", "",
        ))
        rows.append((
            name, f"  lever: its first {views}-view call (compiles)",
            f"{compiled['first_call'][str(views)]:.1f} s",
            f"{latency['ours']['first_call'][str(views)]:.1f} s (ours)", "", "info", "",
        ))
    return rows + _moved_rows(name, args, outputs, "ours, compiled", "compiled depth")


def _rss_rows(
    name: str, folder: Path, args: argparse.Namespace, inputs: Path
) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    rss = {}
    for side in ("ours", "upstream"):
        what = f"load + one {args.rss_views}-view forward"
        print(f"[{name}] peak RSS {side} ({what}) ...", flush=True)
        rss[side] = _worker(
            "rss",
            {
                "side": side, "folder": str(folder), "inputs": str(inputs), "device": args.device,
                "threads": args.threads, "views": args.rss_views,
            },
            f"{side} peak RSS",
        )
    forward = f"load + {args.rss_views}-view fwd"
    for label, key in (("peak RSS after load", "loaded"), (f"peak RSS {forward}", "peak")):
        ratio = rss["ours"][key] / rss["upstream"][key]
        main = key == "peak"
        rows.append((
            name, label, _fmt(rss["ours"][key], "MiB"), _fmt(rss["upstream"][key], "MiB"),
            f"{ratio:.2f} of upstream", f"<= {RSS_TARGET:g}" if main else "",
            ("PASS" if ratio <= RSS_TARGET else "MISS") if main else "",
        ))
    if rss["ours"]["vmhwm"] is not None:
        rows.append((
            name, "  cross-check: VmHWM load + fwd", _fmt(rss["ours"]["vmhwm"], "MiB"),
            _fmt(rss["upstream"]["vmhwm"], "MiB"),
            f"{rss['ours']['vmhwm'] / rss['upstream']['vmhwm']:.2f} of upstream", "", "",
        ))
    rows.append((
        name, "  RSS after import torch", _fmt(rss["ours"]["imported"], "MiB"),
        _fmt(rss["upstream"]["imported"], "MiB"), "", "", "",
    ))
    if "cuda_peak" in rss["ours"]:
        rows.append((
            name, f"CUDA peak allocated ({args.rss_views}-view fwd)",
            _fmt(rss["ours"]["cuda_peak"], "MiB"),
            _fmt(rss["upstream"]["cuda_peak"], "MiB"),
            f"{rss['ours']['cuda_peak'] / rss['upstream']['cuda_peak']:.2f} of upstream", "", "",
        ))

    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("model", "measure", "ours", "upstream", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small"],
                        help="small base large giant (or da3-*)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per view count")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="latency children per side, the sides taking turns (their repeats pooled): "
        "more than 1 on a machine with other load",
    )
    parser.add_argument("--cold-runs", type=int, default=5, help="cold starts per side")
    parser.add_argument("--measure", nargs="+", choices=("cold", "latency", "rss"),
                        default=["cold", "latency", "rss"],
                        help="what to measure (default: all; giant on a CPU: cold)")
    parser.add_argument("--views", nargs="+", type=int, default=list(VIEW_COUNTS),
                        help="view counts timed (default 1 4; the paper's throughput setting: "
                        "32, 3:2 crops that become 504x336)")
    parser.add_argument("--rss-views", type=int, default=4, help="views of the peak-RSS forward")
    parser.add_argument("--res", type=int, default=504, help="process_res (upper_bound_resize)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in the children (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where the checkpoint folders are written once")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--lever-heads", action="store_true",
        help="also time ours with the other number of head tails at once (every view where "
        "ours runs one, as on a CPU; one where ours batches them, as on a GPU): what the "
        "choice of da3cog.memory.head_views costs or saves on this machine",
    )
    parser.add_argument(
        "--lever-compile", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        help="also time ours with torch.compile on the backbone in this mode (reduce-overhead: "
        "CUDA graphs on a GPU); its first call, which compiles, is reported apart",
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec)
        print(json.dumps(WORKERS[args.worker](spec)))
        return 0

    names = []
    for model in args.models:
        key = model.lower()
        names.append(MODEL_NAMES.get(key, key))
    print_environment(args)
    rows: list[tuple[str, ...]] = []
    agree = True
    with tempfile.TemporaryDirectory(prefix="da3bench-") as scratch:
        inputs = Path(scratch) / "inputs.pt"
        counts = sorted({*args.views, args.rss_views})
        spec = {"res": args.res, "path": str(inputs), "views": counts}
        shapes = _worker("inputs", spec, "input preparation")
        print("input tensors: " + ", ".join(f"{k} view(s) {tuple(v)}" for k, v in shapes.items()))
        for name in names:
            model_rows, model_agree = bench_model(name, args, inputs, Path(scratch))
            rows += model_rows
            agree &= model_agree
    print()
    print_table(rows)
    print(f"load average after the run: {_loadavg()}")
    with contextlib.suppress(OSError):
        if os.getloadavg()[0] > 1.25 * (os.cpu_count() or 1) and not args.device.startswith("cuda"):
            print("WARNING: the machine was busier than its CPU count during the run; CPU "
                  "timings are unreliable, run again on a quiet machine")
    print()
    missed = [r for r in rows if r[-1] == "MISS"]
    if not agree:
        print("ours and upstream DIFFER on the benchmark input: the timings do not compare "
              "equal work")
        return 2
    print(f"depth/extrinsics agree on the benchmark input; {len(missed)} target(s) missed")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
