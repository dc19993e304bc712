#!/usr/bin/env python
"""Many scenes: ``da3cog batch`` in process against Ray Data with 1 and 2 actors.

    python bench/bench_batch.py [--model small] [--scenes 12] [--views 4] [--res 280]
                                [--device cpu] [--actors 1 2]

Writes ``--scenes`` scenes of ``--views`` views each (400x300 crops panning across
scikit-image's coffee photo, each scene a different pan) and a JSON Lines manifest under
``bench/.cache/batch/``, then runs the same command, ``da3cog batch`` on a random-weight
Hub-layout checkpoint, once in process and once per pool size on a local Ray cluster that the
command starts itself (``--ray``; each actor reserves 1 CPU, or 1 GPU with ``--device cuda``).

For each run it prints the wall time of the whole command (start-up included: Python, the
model load, and for Ray the cluster and its actors), scenes/s, the mean time a scene took on
its worker (``seconds`` in the index), the time to the first scene landed, and the overhead
per scene: ``(wall - first) / scenes * actors - mean``, the time an actor spends per scene
outside the scene's own work once the pool runs. Random weights: the timing is that of the
real network; the depth is not meaningful.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from random_checkpoints import CACHE, MODEL_NAMES, checkpoint


def write_scenes(folder: Path, scenes: int, views: int) -> Path:
    import skimage.data
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    photo = skimage.data.coffee()
    span = photo.shape[1] - 400
    rows = []
    for scene in range(scenes):
        names = []
        for view in range(views):
            x = (scene * 37 + view * 50) % span
            name = f"scene{scene:03d}/v{view}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(photo[50:350, x : x + 400])).save(folder / name)
            names.append(name)
        rows.append({"scene": f"s{scene:03d}", "images": names})
    manifest = folder / "scenes.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def run(manifest: Path, out: Path, model: Path, args: argparse.Namespace, actors: int | None):
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "da3cog.cli", "batch", str(manifest), "--out", str(out)]
    command += ["--model", str(model), "--process-res", str(args.res), "--device", args.device]
    if actors is not None:
        command += ["--ray", "--actors", str(actors)]
        if args.device.startswith("cuda"):
            command += ["--gpus-per-actor", "1"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while process.poll() is None:
        if first is None and any(out.glob("*/.complete")):
            first = time.perf_counter() - started
        time.sleep(0.05)
    wall = time.perf_counter() - started
    _, errors = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"batch failed ({process.returncode}): {errors.strip()[-400:]}")
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert all(row["status"] == "done" for row in index), index
    mean = sum(row["seconds"] for row in index) / len(index)
    first = first if first is not None else wall
    pool = actors or 1
    overhead = (wall - first) / max(len(index) - 1, 1) * pool - mean
    return wall, len(index) / wall, mean, first, overhead


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small", choices=MODEL_NAMES)
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--res", type=int, default=280)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    model = checkpoint(MODEL_NAMES[args.model])
    work = CACHE / "batch"
    manifest = write_scenes(work / "scenes", args.scenes, args.views)
    print(
        f"{args.scenes} scenes x {args.views} views, {args.model} at {args.res} px on {args.device}"
    )
    print("| run | wall (s) | scenes/s | mean scene (s) | first scene (s) | overhead/scene (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    baseline = None
    for actors in (None, *args.actors):
        label = "in process" if actors is None else f"Ray, {actors} actor(s)"
        wall, rate, mean, first, overhead = run(manifest, work / "out", model, args, actors)
        baseline = baseline or rate
        print(
            f"| {label} | {wall:.1f} | {rate:.3f} ({rate / baseline:.2f}x) | {mean:.2f} | "
            f"{first:.1f} | {overhead:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
