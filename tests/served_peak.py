"""The peak memory one request to the served model adds, measured in a fresh process
(shared by ``tests/test_memory_budget.py`` and ``bench/memory_outputs.py``).

The child sets up the cog handler with random-weight small, writes ``views`` random PNGs of
``side`` x ``side * 3/4`` as the request's downloads and measures the peak resident memory
the request adds (:mod:`peak_memory`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from da3cog import memory
from da3cog.model.presets import PRESETS

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
torch.set_num_threads(2)
from da3cog.serve.handler import Server
from da3cog.serve.provenance import RequestFiles
from da3cog.serve.request import RequestError, RequestValues

downloads, requests = Path(sys.argv[1]), Path(sys.argv[2])
views, side, export = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
process_resolution, max_points = int(sys.argv[6]), int(sys.argv[7])
sys.path.insert(0, sys.argv[8])
from peak_memory import peak_added, reset_peak
server = Server(torch.device("cpu"), tmp_root=requests, files=RequestFiles(downloads))
server.setup("small", progress=lambda _: None)
paths = []
for index in range(views):
    picture = np.random.default_rng(index).integers(0, 255, (side * 3 // 4, side, 3), np.uint8)
    path = downloads / f"tmp{index:08d}view{index}.png"
    Image.fromarray(picture).save(path, compress_level=1)
    paths.append(path)

values = RequestValues(image=paths[0], images=tuple(paths[1:]), model_size="small",
                       process_resolution=process_resolution, export_format=export,
                       max_points=max_points)
before = reset_peak()
try:
    files = server.handle(values, progress=lambda _: None)
    outcome = f"ran: {len(files)} files"
except RequestError as error:
    outcome = "refused: " + str(error)
print(json.dumps({"outcome": outcome, "added": peak_added(before)}))
"""


def served_estimate(
    views: int, side: int, export: str, process_res: int, max_points: int = 1_000_000
) -> memory.MemoryEstimate:
    """The memory model's estimate of the request :func:`measure_served_request` sends, as
    the handler computes it on a CPU (a point cloud only when the format writes one)."""
    from da3cog.serve.handler import exports_points, exports_tracks

    points = max_points if exports_points(export) else 0
    sizes = [(side, side * 3 // 4)] * views
    size = memory.request_size(
        sizes, process_res, "input", gaussians=False, points=points, tracked=exports_tracks(export)
    )
    return memory.estimate(PRESETS["da3-small"], size, on_gpu=False)


def measure_served_request(
    checkpoint: Path,
    scratch: Path,
    views: int,
    side: int,
    export: str,
    process_res: int,
    max_points: int = 1_000_000,
    budget_bytes: int | None = None,
) -> dict[str, object]:
    """Run one request of ``views`` random views of ``side`` pixels wide, outputs at the
    input size, with ``export``, in a fresh process working in the empty folder ``scratch``;
    ``budget_bytes``: the worker's memory budget (``DA3COG_MEMORY_BUDGET_GB``; None: what the
    machine has). Returns ``outcome`` ("ran: N files" or "refused: <message>") and ``added``,
    the peak RSS the request added in bytes."""
    downloads, weights = scratch / "downloads", scratch / "weights"
    downloads.mkdir()
    weights.mkdir()
    (weights / "da3-small").symlink_to(checkpoint.resolve())
    env = {**os.environ, "DA3COG_WEIGHTS_DIR": str(weights), "OMP_NUM_THREADS": "2"}
    if budget_bytes is not None:
        env[memory.MEMORY_BUDGET_ENV] = f"{budget_bytes / memory.GIB:.6f}"
    tests = Path(__file__).resolve().parent
    arguments = (downloads, scratch / "requests", views, side, export, process_res, max_points)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, arguments), str(tests)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the request's process failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
