"""The memory budget of the served model, measured: a request at the edge of the budget runs,
one just past it is refused before any model work, and the peak RSS a request adds stays under
its estimate. Each measurement runs in a fresh subprocess (:mod:`served_peak`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from served_peak import measure_served_request, served_estimate

from da3cog import memory
from da3cog.model.presets import PRESETS

VIEWS, SIDE, EXPORT, PROCESS_RES, MAX_POINTS = 3, 1200, "glb", 280, 1_000_000


def _run(
    tmp_path: Path,
    small_checkpoint: Path,
    budget_bytes: int,
    views: int = VIEWS,
    side: int = SIDE,
    export: str = EXPORT,
    process_res: int = PROCESS_RES,
    max_points: int = MAX_POINTS,
) -> dict[str, object]:
    return measure_served_request(
        small_checkpoint, tmp_path, views, side, export, process_res, max_points, budget_bytes
    )


@pytest.mark.parametrize("margin", [1.01, 0.99])
def test_budget_edge_and_measured_peak(
    tmp_path: Path, small_checkpoint: Path, margin: float
) -> None:
    estimate = served_estimate(VIEWS, SIDE, EXPORT, PROCESS_RES, MAX_POINTS).host
    outcome = _run(tmp_path, small_checkpoint, int(estimate * margin))
    if margin > 1:
        assert str(outcome["outcome"]).startswith("ran"), outcome
        # What the request really added stays under what it was allowed.
        assert 0 < outcome["added"] <= estimate, (outcome["added"], estimate)
    else:
        message = str(outcome["outcome"])
        assert message.startswith("refused: this request (3 view(s) at process_resolution=280)")
        assert "at most 2 of these views" in message or "output_resolution=processing" in message


def test_outputs_of_many_large_views_stay_under_the_estimate(
    tmp_path: Path, small_checkpoint: Path
) -> None:
    """Many large views, every export format, a small network and point cloud: the outputs
    and what the exporters copy of all views at once make the peak, which stays under the
    estimate (measured at about 0.55 of it; one that counted only the 11 bytes a pixel kept
    for each view, without the exporters' copies, fails here)."""
    shape = {"views": 12, "side": 1600, "export": "all", "process_res": 140, "max_points": 10_000}
    estimate = served_estimate(**shape).host
    outcome = _run(tmp_path, small_checkpoint, int(estimate * 1.01), **shape)
    assert str(outcome["outcome"]).startswith("ran"), outcome
    assert 0 < outcome["added"] <= estimate, (outcome["added"], estimate)


NETWORK_CHILD = r"""
import json, sys
from dataclasses import replace
import torch
sys.path.insert(0, sys.argv[1])
from peak_memory import peak_added, reset_peak
from small_zoo import METRIC_SMALL, NESTED_SMALL
from da3cog import memory
from da3cog.model.network import build_network
from da3cog.model.presets import PRESETS

name, views, height, width = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(2)
torch.manual_seed(0)
if name == "nested-wide-metric":
    large = PRESETS["da3-large"]
    # The metric branch as wide as ViT-L (the any-view one: ViT-S), so its run sets the peak
    # clearly above the any-view branch's estimate (at ViT-B's width it was 7% above).
    metric = replace(METRIC_SMALL, name="metric-large-width",
                     backbone=replace(METRIC_SMALL.backbone, embed_dim=1024, num_heads=16),
                     head=large.head)
    preset = replace(NESTED_SMALL, name=name, metric_branch=metric)
else:
    preset = PRESETS[name]
network = build_network(preset).eval()
with torch.inference_mode():
    # Warm-up, as the served model's setup; then a forward as the pipeline runs it.
    network(torch.randn(1, 1, 3, 98, 140), keep_intermediates=False)
    before = reset_peak()
    network(torch.randn(1, views, 3, height, width), keep_intermediates=False)
added = peak_added(before)
size = memory.RequestSize(*(((height * width,) * views,) * 3))
row = {"added": added, "estimate": memory.network_bytes(preset, size)}
if preset.metric_branch is not None:
    row["anyview_alone"] = memory.network_bytes(preset.anyview_branch, size)
print(json.dumps(row))
"""


def _child_row(code: str, *arguments: str) -> dict:
    """Run ``code`` in a fresh process (2 threads) with this folder and ``arguments`` on its
    command line; its last line of output, a JSON object."""
    result = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _network_peak(preset: str, views: int, height: int = 210, width: int = 280) -> dict:
    """The peak RSS one forward of ``views`` random images adds (after a one-view warm-up,
    heads' tails one image at a time, as on a CPU), measured in a fresh process, beside
    :func:`memory.network_bytes` of it."""
    return _child_row(NETWORK_CHILD, preset, str(views), str(height), str(width))


def test_nested_estimate_bounds_the_measured_peak() -> None:
    """A nested network's branches run one after the other: the estimate takes the larger
    one's peak with the first branch's outputs held, not their sum (which doubled the estimate
    of da3nested-giant-large, bench/README.md). With a metric branch wider than the any-view
    one, the measured peak stays under the estimate and above what the any-view branch alone
    would be estimated at (so an estimate that left the metric branch out fails here)."""
    row = _network_peak("nested-wide-metric", views=4)
    assert row["anyview_alone"] < row["added"] <= row["estimate"], row


def test_network_estimate_past_one_head_call_is_a_close_upper_bound() -> None:
    """Past the views one head call takes (``HEAD_CHUNK_VIEWS``) only the backbone's term
    grows with the views. At 24 views of small the measured peak stays under the estimate and
    above 0.55 of it (0.76-0.83 measured): the earlier model, linear in tokens at 300 bytes a
    token-channel, was used to about half here (0.47-0.51; it chunked and refused requests at
    about a third of the views that fit on a CPU) and fails. The larger of two runs is taken:
    the allocator's reuse of blocks the warm-up freed can lower one run's peak (0.547 of the
    estimate once in CI, 2026-12-07), and the upper bound must hold for the larger anyway."""
    views = 3 * memory.HEAD_CHUNK_VIEWS
    rows = [_network_peak("da3-small", views=views) for _ in range(2)]
    row = max(rows, key=lambda r: r["added"])
    assert 0.55 * row["estimate"] < row["added"] <= row["estimate"], rows


def _views(count: int, pixels: int = 504 * 378) -> memory.RequestSize:
    return memory.RequestSize((pixels,) * count, (pixels,) * count, (pixels,) * count)


@pytest.mark.parametrize("preset_name", ["da3-small", "da3-giant", "da3nested-giant-large"])
def test_head_tails_batch_as_many_views_as_the_device_budget_holds(preset_name: str) -> None:
    preset, size = PRESETS[preset_name], _views(32)
    one, every = memory.network_bytes(preset, size, 1), memory.network_bytes(preset, size, 32)
    assert one < memory.network_bytes(preset, size, 2) < every
    assert memory.plan_head_views(preset, size, every) == 32
    assert memory.plan_head_views(preset, size, 10 * every) == 32
    assert memory.plan_head_views(preset, size, one) == 1
    assert memory.plan_head_views(preset, size, one // 2) == 1  # nothing fits: the lightest
    for views in (2, 7, 31):
        edge = memory.network_bytes(preset, size, views)
        assert memory.plan_head_views(preset, size, edge) == views
        assert memory.plan_head_views(preset, size, edge - 1) == views - 1


def test_head_tails_run_one_at_a_time_without_a_device_budget(monkeypatch) -> None:
    preset = PRESETS["da3-small"]
    assert memory.plan_head_views(preset, _views(32), None) == 1
    assert memory.head_views(preset, 32, (378, 504), torch.device("cpu")) == 1
    budget = memory.network_bytes(preset, _views(32), 5)
    asked = []
    monkeypatch.setattr(memory, "device_budget", lambda device: asked.append(device) or budget)
    assert memory.head_views(preset, 32, (378, 504), torch.device("cuda", 1)) == 5
    assert asked == [torch.device("cuda", 1)]  # the pipeline's device, not the current one


def test_device_memory_counts_the_allocators_cached_blocks_as_available(monkeypatch) -> None:
    """A previous request's blocks stay reserved by PyTorch's caching allocator: the driver
    counts them as taken, but the next request reuses them first. Each query names the
    device asked about."""
    gib = memory.GIB
    asked = []

    def on(result):
        return lambda device=None: asked.append(device) or result

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", on((10 * gib, 80 * gib)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", on(30 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", on(6 * gib))
    second = torch.device("cuda", 1)
    assert memory.available_device_bytes(second) == 34 * gib
    assert asked == [second] * 3
    assert memory.device_budget(second) == int(34 * gib * memory.SAFETY_FRACTION)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.available_device_bytes() is None


def test_shipped_network_constants_are_the_fit_of_the_committed_measurements() -> None:
    """The network's constants are not typed in: they are the tightest upper bound of every
    forward measured in ``bench/results/`` (``bench/memory_model.py --fit``) with its margin,
    so a measurement committed without a refit, or a constant changed by hand, fails here; and
    every committed peak lies under the shipped estimate."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import memory_model
    finally:
        sys.path.remove(str(bench))
    logs = sorted(bench.glob("results/cpu-*/memory_model*.log"))
    rows = memory_model.read_rows(logs)
    assert len(rows) >= 80, [str(log) for log in logs]
    fitted, kept, terms, measured = memory_model.fit_constants(rows)
    shipped = memory_model.shipped_constants()
    assert [math.ceil(value * memory_model.FIT_MARGIN) for value in fitted] == list(shipped)
    assert (measured <= terms @ shipped).all()
    assert {row[0] for row in kept} == {"small", "base", "large", "giant"}


GAUSSIAN_CHILD = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from peak_memory import peak_added, reset_peak
from small_zoo import SMALL_GS, small_model
from da3cog import memory
from da3cog.export.gaussians import gaussians_ply_files
from da3cog.pipeline import InferenceOptions

folder, views, side = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
model = small_model(folder, SMALL_GS)
height = side * 3 // 4
images = [np.random.default_rng(i).integers(0, 255, (height, side, 3), np.uint8)
          for i in range(views)]
model.predict(images[:1], options=InferenceOptions(process_res=140, infer_gaussians=True))

before = reset_peak()
options = InferenceOptions(process_res=side, infer_gaussians=True, chunk_size=None)
prediction = model.predict(images, options=options)
with tempfile.TemporaryDirectory() as scratch:
    gaussians_ply_files(prediction, Path(scratch))
added = peak_added(before)
estimates = {}
for gaussians in (True, False):
    size = memory.request_size([(side, height)] * views, side, "input", gaussians, points=0)
    estimates[gaussians] = memory.estimate(SMALL_GS, size, on_gpu=False).host
print(json.dumps({"added": added, "estimate": estimates[True], "without": estimates[False]}))
"""


def test_gaussian_request_stays_under_the_estimate(small_zoo_checkpoint) -> None:
    """A request with Gaussians (the ViT-S stand-in with a GS head, 32 views of 280 px, one
    pass, the Gaussian PLY written): the peak stays under the estimate and above what it
    would be without Gaussians, so they weigh in it. Measured 0.65-0.66 of it; the code
    before the adapter built Gaussians a few views at a time, when the network also built
    its own set and the pipeline held it, took 1827 MiB on this request, 1.06 of it."""
    row = _child_row(GAUSSIAN_CHILD, str(small_zoo_checkpoint("small-gs")[0]), "32", "280")
    assert row["without"] < row["added"] <= row["estimate"], row


@pytest.mark.parametrize("method", ["upper_bound_resize", "lower_bound_resize", "lower_bound_crop"])
@pytest.mark.parametrize("mixed_shapes", ["resize", "crop"])
def test_the_estimate_counts_the_pixels_preprocessing_gives(method: str, mixed_shapes: str) -> None:
    """Each view's processing pixels as prepare_images makes them, for every resize method
    and with a panorama among 16:9 frames: before, every view was counted with its longer
    side at process_res (a lower_bound method puts the shorter side there: 3x the pixels of
    a 16:9 frame), and a panorama at its own size although it is resized to the others'."""
    import numpy as np

    from da3cog.io.preprocess import prepare_images

    sizes = [(1920, 1080)] * 3 + [(4000, 1000)]
    arrays = [np.zeros((height, width, 3), np.uint8) for width, height in sizes]
    batch = prepare_images(arrays, 504, method, mixed_shapes=mixed_shapes)
    height, width = batch.processing_size
    size = memory.request_size(
        sizes, 504, "processing", False, 0, resize_method=method, mixed_shapes=mixed_shapes
    )
    assert size.processing_pixels == (height * width,) * 4
    assert size.output_pixels == size.processing_pixels


def test_a_chunked_gpu_estimate_holds_one_chunks_gaussians() -> None:
    """A chunked gaussian-splat run builds each chunk's Gaussians on the GPU and copies them
    to the host: its device estimate is one chunk's whatever the number of views (before,
    every view's Gaussians were counted on the device: 700 views of 504 px needed 63 GiB
    there, and chunks that fit were refused); the host holds them all."""
    preset = PRESETS["da3-giant"]

    def chunked(views: int) -> memory.MemoryEstimate:
        size = memory.request_size([(504, 378)] * views, 504, "input", True, 0)
        return memory.estimate(preset, size, on_gpu=True, chunk=4)

    alone = memory.estimate(
        preset, memory.request_size([(504, 378)] * 4, 504, "input", True, 0), on_gpu=True
    )
    assert chunked(700).device == chunked(40).device == alone.device
    assert chunked(700).host > 10 * chunked(40).host / 2


@pytest.mark.parametrize("value", ["8GB", "nan", "inf", "-2", "0"])
def test_a_bad_memory_budget_is_named(value: str, monkeypatch, tmp_path: Path) -> None:
    """$DA3COG_MEMORY_BUDGET_GB that is not a positive number of GiB is refused naming the
    variable (before, '8GB' failed every request with float()'s message and '-2' became a
    negative budget that refused everything); the cog worker refuses it at boot."""
    from da3cog.serve.handler import Server
    from da3cog.serve.provenance import RequestFiles

    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, value)
    with pytest.raises(ValueError, match=rf"\$DA3COG_MEMORY_BUDGET_GB .*got '{value}'"):
        memory.host_budget()
    server = Server(torch.device("cpu"), tmp_root=tmp_path / "r", files=RequestFiles(tmp_path))
    with pytest.raises(RuntimeError, match="DA3COG_MEMORY_BUDGET_GB"):
        server.setup("small", progress=lambda _: None)
    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, "0.5")
    assert memory.host_budget() == memory.GIB // 2
