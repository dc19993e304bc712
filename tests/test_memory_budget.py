"""The memory budget of the served model, measured: a request at the edge of the budget runs,
one just past it is refused before any model work, and the peak RSS a request adds stays under
its estimate. Each measurement runs in a fresh subprocess and reads its peak from ``VmHWM``
(``ru_maxrss`` would carry the parent's RSS over fork + exec: a test process grown to 1.3 GB
made a 250 MB request look like 1.3 GB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from da3cog import memory
from da3cog.model.presets import PRESETS

CHILD = r"""
import json, os, sys, tempfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
torch.set_num_threads(2)
from da3cog.serve.handler import Server
from da3cog.serve.provenance import RequestFiles
from da3cog.serve.request import RequestError, RequestValues

downloads, requests, views, side, export = (Path(sys.argv[1]), Path(sys.argv[2]),
    int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
server = Server(torch.device("cpu"), tmp_root=requests, files=RequestFiles(downloads))
server.setup("small", progress=lambda _: None)
paths = []
for index in range(views):
    picture = np.random.default_rng(index).integers(0, 255, (side * 3 // 4, side, 3), np.uint8)
    path = downloads / f"tmp{index:08d}view{index}.png"
    Image.fromarray(picture).save(path, compress_level=1)
    paths.append(path)

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
values = RequestValues(image=paths[0], images=tuple(paths[1:]), model_size="small",
                       process_resolution=280, export_format=export)
try:
    server.handle(values, progress=lambda _: None)
    outcome = "ran"
except RequestError as error:
    outcome = "refused: " + str(error)
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "added": peak - before}))
"""

VIEWS, SIDE, EXPORT = 3, 1200, "glb"


def _estimate() -> memory.MemoryEstimate:
    sizes = [(SIDE, SIDE * 3 // 4)] * VIEWS
    size = memory.request_size(sizes, 280, "input", False, 1_000_000)
    return memory.estimate(PRESETS["da3-small"], size, on_gpu=False)


def _run(tmp_path: Path, small_checkpoint: Path, budget_bytes: int) -> dict[str, object]:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "da3-small").symlink_to(small_checkpoint)
    env = {
        **os.environ,
        "DA3COG_WEIGHTS_DIR": str(weights),
        memory.MEMORY_BUDGET_ENV: f"{budget_bytes / memory.GIB:.6f}",
        "OMP_NUM_THREADS": "2",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(downloads),
            str(tmp_path / "requests"),
            str(VIEWS),
            str(SIDE),
            EXPORT,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("margin", [1.01, 0.99])
def test_budget_edge_and_measured_peak(
    tmp_path: Path, small_checkpoint: Path, margin: float
) -> None:
    estimate = _estimate().host
    outcome = _run(tmp_path, small_checkpoint, int(estimate * margin))
    if margin > 1:
        assert outcome["outcome"] == "ran", outcome
        # What the request really added stays under what it was allowed.
        assert 0 < outcome["added"] <= estimate, (outcome["added"], estimate)
    else:
        message = str(outcome["outcome"])
        assert message.startswith("refused: this request (3 view(s) at process_resolution=280)")
        assert "at most 2 of these views" in message or "output_resolution=processing" in message
