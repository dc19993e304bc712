#!/usr/bin/env python
"""Many views: one pass against aligned chunks, views per second and peak memory.

    python bench/bench_views.py [--model small] [--res 280] [--views 8 32 64] [--chunk 16]
                                [--paths one-pass chunked chunked-spill upstream-one-pass]

For every N, a fresh subprocess per path loads a random-weight Hub-layout checkpoint (written
once under bench/.cache/) and predicts N frames panning across a real photo (scikit-image's
coffee, 400x300 crops panning back and forth), through ``DepthAnything3.predict``:

* one pass: ``InferenceOptions(process_res=res)``;
* chunked: the same with ``chunk_size=chunk`` (overlap half the chunk);
* upstream one pass (``--paths upstream-one-pass``, run with the interpreter of
  ``bench/upstream_env.sh``): upstream's ``DepthAnything3.inference(frames)`` on the same
  checkpoint and frames (float32 on a CPU, its own bf16 on a GPU), outputs at the processing
  size, until it runs out of memory;
* chunked spill (``--paths chunked-spill``): the same chunks with every view's outputs in
  memory-mapped temporary files, as the automatic plan runs a request whose outputs do not
  fit (forced here);
* chunked with loop closure (``--paths chunked-loops``): the same chunks with
  ``loop_closure=True``; the frames pan back and forth, so they revisit what they saw, and the
  row says how many look-alike pairs were checked (one more chunk each) and kept (random
  weights: whether a loop is kept means nothing here, its cost does).

It prints the wall time of the prediction, views per second, and the peak memory the
prediction added (CPU: ``VmHWM`` after a reset minus the RSS before; CUDA:
``max_memory_allocated``), beside what the memory model estimated for that request and path
(:func:`da3cog.memory.estimate`, what the pipeline plans with; an upper bound, so the ratio
measured / estimate should stay at or below 1; not for upstream's rows, nor for spilled
outputs, which the estimate counts as kept); with upstream's one pass among the paths, the
speed-up and peak ratio of each of ours against it, measured in the same run. It exits 1 when
a row failed. The chunked path's peak should stay flat in N
(one chunk's activations plus the outputs), the one-pass path's grows with N. Random
weights: the timing and memory are those of the real network; the depth is not meaningful.
Upstream's streaming code is not on PyPI and needs CUDA as published: it is not run here
(bench/README.md has a one-off comparison on a CPU, patched to run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from random_checkpoints import MODEL_NAMES, ROOT, checkpoint

from da3cog import memory
from da3cog.model.presets import PRESETS

# The frames' size (width, height): 400x300 crops of a 600x400 photo, as CHILD cuts them.
FRAME_SIZE = (400, 300)

CHILD = r"""
import json, sys, time
import numpy as np, torch
import skimage.data
from da3cog import DepthAnything3, InferenceOptions

folder, device, chunk = sys.argv[1], sys.argv[2], sys.argv[5]
views, res = int(sys.argv[3]), int(sys.argv[4])
upstream = chunk == "upstream"
if upstream:
    sys.path.insert(0, "bench")
    from upstream_pipeline import load_upstream

    # fp32 on a CPU (the arithmetic of ours); as shipped (bf16) on a GPU, like ours.
    network = load_upstream(folder, device, fp32=not device.startswith("cuda"))
    model = None
else:
    model = DepthAnything3.from_pretrained(folder, device=device)
photo = skimage.data.coffee()
# 400x300 crops panning across the 600x400 photo, back and forth.
span = photo.shape[1] - 400
offsets = [round(span * abs((2 * i / max(views - 1, 1)) % 2 - 1)) for i in range(views)]
frames = [np.ascontiguousarray(photo[50:350, x : x + 400]) for x in offsets]
if upstream:
    options = None
elif chunk.startswith("spill:"):
    # The spilling path as the auto plan takes it when the outputs do not fit (forced here,
    # with the same chunk size as the plain chunked row).
    chunk = chunk.split(":")[1]
    DepthAnything3._plan_chunks = lambda self, images, sizes, options: (int(chunk), True)
    options = InferenceOptions(process_res=res, chunk_size="auto")
elif chunk.startswith("loops:"):
    options = InferenceOptions(
        process_res=res, chunk_size=int(chunk.split(":")[1]), loop_closure=True
    )
else:
    options = InferenceOptions(
        process_res=res, chunk_size=None if chunk == "none" else int(chunk)
    )
# Warm-up: one small request, as the served model does in setup.
if upstream:
    network.inference(frames[:1], process_res=140)
else:
    model.predict(frames[:1], options=InferenceOptions(process_res=140))
cuda = device.startswith("cuda")

sys.path.insert(0, "tests")
from peak_memory import peak_added, reset_peak

# Host memory on every device (on a GPU the kept outputs live there), device memory on CUDA.
host_before = reset_peak()
if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
started = time.perf_counter()
if upstream:
    found = len(network.inference(frames, process_res=res).depth)
    loops = None
else:
    prediction = model.predict(frames, options=options)
    found = len(prediction.views)
    loops = next((n for n in prediction.notes if n.startswith("loop closure: ")), None)
    del prediction
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - started
host_added = peak_added(host_before)
added = torch.cuda.max_memory_allocated() - before if cuda else host_added
assert found == views
print(json.dumps({"seconds": seconds, "added": added, "host_added": host_added, "loops": loops}))
"""


def run(folder: Path, device: str, views: int, res: int, chunk: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), device, str(views), str(res), chunk],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def estimated(
    preset: str, views: int, res: int, chunk: int | None, on_gpu: bool
) -> memory.MemoryEstimate:
    """What the memory model estimates a prediction of ``views`` frames adds, in one pass
    (``chunk`` None) or in chunks of ``chunk`` views, outputs at the input size. On a GPU the
    device part counts every head tail of a pass at once (the pipeline runs as many as the
    free memory holds, :func:`da3cog.memory.head_views`: on a large GPU all of them), where
    the planner's estimate counts one."""
    size = memory.request_size([FRAME_SIZE] * views, res, "input", gaussians=False, points=0)
    planned = memory.estimate(PRESETS[preset], size, on_gpu, chunk=chunk)
    if not on_gpu:
        return planned
    per_pass = size.processing_pixels[: chunk or views]
    network = memory.network_bytes(
        PRESETS[preset], memory.RequestSize(per_pass, per_pass, per_pass), len(per_pass)
    )
    return memory.MemoryEstimate(host=planned.host, device=network)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small", choices=MODEL_NAMES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--res", type=int, default=280)
    parser.add_argument("--views", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=("one-pass", "chunked", "chunked-spill", "chunked-loops", "upstream-one-pass"),
        default=["one-pass", "chunked"],
        help="which paths to run (the one pass of many views is slow and large: chunked alone)",
    )
    args = parser.parse_args()
    folder = checkpoint(MODEL_NAMES[args.model])
    print(f"{args.model} at {args.res} px on {args.device}; chunks of {args.chunk} views")
    cuda = args.device.startswith("cuda")
    if cuda:
        print(
            "| views | path | seconds | views/s | GPU peak added / estimate (MiB) "
            "| host peak added / estimate (MiB) |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
    else:
        print("| views | path | seconds | views/s | peak added / estimate (MiB) |")
        print("| --- | --- | --- | --- | --- |")
    failed = False
    ratios: list[str] = []
    for views in args.views:
        measured: dict[str, dict] = {}
        paths = (
            ("one pass", "none"),
            ("chunked", str(args.chunk)),
            ("chunked spill", f"spill:{args.chunk}"),
            ("chunked loops", f"loops:{args.chunk}"),
            ("upstream one pass", "upstream"),
        )
        for path, chunk in paths:
            if path.replace(" ", "-") not in args.paths:
                continue
            row = run(folder, args.device, views, args.res, chunk)
            if "error" in row:
                print(f"| {views} | {path} | failed: {row['error']} | | |", flush=True)
                failed = True
                continue
            measured[path] = row
            if row.get("loops"):
                # "loop closure: 1 of 3 candidate loop(s) kept (...); ..." -> "1 of 3 ... kept"
                path += f" ({row['loops'].removeprefix('loop closure: ').split(' (')[0]})"
            estimate = None
            if chunk == "none" or chunk.isdigit() or chunk.startswith("loops:"):
                planned = None if chunk == "none" else int(chunk.split(":")[-1])
                estimate = estimated(MODEL_NAMES[args.model], views, args.res, planned, cuda)
            # On a CPU the peak added is the host's.
            memory_cells = f"{against(row['host_added'], estimate.host if estimate else None)} |"
            if cuda:
                device_cell = against(row["added"], estimate.device if estimate else None)
                memory_cells = f"{device_cell} | {memory_cells}"
            print(
                f"| {views} | {path} | {row['seconds']:.1f} | {views / row['seconds']:.3g} | "
                f"{memory_cells}",
                flush=True,
            )
        ratios.extend(_against_upstream(views, measured, cuda))
    if ratios:
        print("\nAgainst upstream's one pass, measured in this run (time: upstream's / ours;")
        print("peak: ours / upstream's, host RSS on a CPU, allocated device memory on CUDA)")
        print("| views | path | speed-up | peak ratio |")
        print("| --- | --- | --- | --- |")
        print("\n".join(ratios))
    return 1 if failed else 0


def _against_upstream(views: int, measured: dict[str, dict], cuda: bool) -> list[str]:
    """Table rows of each of ours against the upstream one pass of the same views."""
    upstream = measured.get("upstream one pass")
    if upstream is None:
        return []
    peak = "added" if cuda else "host_added"
    return [
        f"| {views} | {path} | {upstream['seconds'] / row['seconds']:.2f}x | "
        f"{row[peak] / upstream[peak]:.2f}x |"
        for path, row in measured.items()
        if path != "upstream one pass"
    ]


def against(measured: int, estimate: int | None) -> str:
    """``measured / estimate (ratio)`` in MiB, or the measured figure alone."""
    if estimate is None:
        return f"{measured / 2**20:.0f}"
    return f"{measured / 2**20:.0f} / {estimate / 2**20:.0f} ({measured / estimate:.2f})"


if __name__ == "__main__":
    sys.exit(main())
