"""The pieces of da3cog.serve on their own: request planning, cameras, zips, video, the
Gaussian fly-through (the PLY is tested in test_export_gaussians.py), the model cache and the
request folders."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from da3cog.serve.request import (
    RequestError,
    RequestValues,
    UserCameras,
    check_cameras,
    check_formats,
    check_values,
    choose_model,
    read_cameras,
)

if TYPE_CHECKING:
    from da3cog.serve.handler import Server

# --------------------------------------------------------------------------------------------
# Which model answers, and what is refused before any work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "size", "metric", "preset"),
    [
        ("multi-view", "giant", False, "da3-giant"),
        ("monocular", "small", False, "da3-small"),
        ("gaussian-splat", "giant", False, "da3-giant"),
        ("gaussian-splat", "giant", True, "da3nested-giant-large"),
        ("multi-view", "giant", True, "da3nested-giant-large"),
        ("monocular", "large", True, "da3metric-large"),
    ],
)
def test_model_choice(mode: str, size: str, metric: bool, preset: str) -> None:
    assert choose_model(mode, size, metric).preset == preset


@pytest.mark.parametrize(
    ("mode", "size", "metric", "version", "key", "hub_id"),
    [
        ("multi-view", "giant", False, "latest", "da3-giant", "depth-anything/DA3-GIANT-1.1"),
        ("multi-view", "giant", False, "1.1", "da3-giant", "depth-anything/DA3-GIANT-1.1"),
        ("multi-view", "giant", False, "1.0", "da3-giant@1.0", "depth-anything/DA3-GIANT"),
        ("monocular", "large", False, "1.0", "da3-large@1.0", "depth-anything/DA3-LARGE"),
        (
            "gaussian-splat",
            "giant",
            True,
            "1.0",
            "da3nested-giant-large@1.0",
            "depth-anything/DA3NESTED-GIANT-LARGE",
        ),
        ("monocular", "small", False, "1.0", "da3-small", "depth-anything/DA3-SMALL"),
        ("monocular", "large", True, "latest", "da3metric-large", "depth-anything/DA3METRIC-LARGE"),
    ],
)
def test_checkpoint_version_picks_the_release(
    mode: str, size: str, metric: bool, version: str, key: str, hub_id: str
) -> None:
    """The newest release by default; an older one on request, under its own cache key and
    override folder (the newest keeps the bare preset name)."""
    choice = choose_model(mode, size, metric, version)
    assert (choice.key, choice.hub_id) == (key, hub_id)


@pytest.mark.parametrize(
    ("size", "metric", "mode"),
    [("small", False, "multi-view"), ("base", False, "monocular"), ("large", True, "monocular")],
)
def test_a_release_a_model_lacks_is_refused_with_its_releases(
    size: str, metric: bool, mode: str
) -> None:
    with pytest.raises(RequestError, match=r"has no such release; its releases: 1.0 \(DA3"):
        choose_model(mode, size, metric, "1.1")


@pytest.mark.parametrize(
    ("mode", "size", "metric", "message"),
    [
        ("gaussian-splat", "large", False, "model_size=giant"),
        ("gaussian-splat", "small", False, "Gaussian head"),
        ("multi-view", "large", True, "mode=monocular"),
        ("monocular", "base", True, "model_size=giant"),
    ],
)
def test_impossible_combinations_say_what_works(
    mode: str, size: str, metric: bool, message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        choose_model(mode, size, metric)


def test_values_are_checked_like_the_server_does(tmp_path: Path) -> None:
    values = RequestValues(image=tmp_path / "a.png")
    check_values(values)
    for change in (
        {"mode": "stereo"},
        {"process_resolution": 14},
        {"confidence_percentile": float("nan")},
        {"seed": -1},
        {"max_frames": True},
    ):
        with pytest.raises(RequestError):
            check_values(replace(values, **change))


def test_cameras_json_forms(tmp_path: Path) -> None:
    k = [[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]]
    path = tmp_path / "cameras.json"
    path.write_text(json.dumps({"intrinsics": k}))
    shared = read_cameras(path, 3)
    assert shared.intrinsics.shape == (3, 3, 3) and shared.extrinsics is None
    pose = np.eye(4)[:3].tolist()
    path.write_text(json.dumps({"intrinsics": [k, k], "extrinsics": [pose, pose]}))
    both = read_cameras(path, 2)
    assert both.extrinsics.shape == (2, 4, 4) and np.allclose(both.extrinsics[:, 3], [0, 0, 0, 1])
    assert both.for_view(1).intrinsics.shape == (1, 3, 3)
    # da3cog's own cameras.json goes back in.
    path.write_text(json.dumps({"views": [{"K": k, "world_to_camera": np.eye(4).tolist()}]}))
    assert read_cameras(path, 1).extrinsics.shape == (1, 4, 4)
    for document, message in (
        ({"intrinsics": [k, k]}, "2 intrinsics for 3 views"),
        ({"extrinsics": [pose]}, "1 extrinsics for 3 views"),
        ({"intrinsics": [[1, 2], [3, 4]]}, "3 x 3"),
        ({"nothing": 1}, "intrinsics"),
        # The pipeline's own checks, before any model is loaded.
        ({"intrinsics": [[[-100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]]] * 3}, "positive focal"),
        ({"extrinsics": [(2 * np.eye(4)[:3]).tolist()] * 3}, "not orthonormal"),
    ):
        path.write_text(json.dumps(document))
        with pytest.raises(RequestError, match=message):
            read_cameras(path, 3)
    path.write_text("{not json")
    with pytest.raises(RequestError, match="JSON"):
        read_cameras(path, 1)


def test_served_cameras_are_checked_against_the_images_as_sent(tmp_path: Path) -> None:
    """A served view downscaled to the pixel limit keeps the user's K for the image as sent
    (moved to the copy); da3cog's own cameras.json must describe images of the sent size."""
    from da3cog.serve.handler import fit_cameras
    from da3cog.serve.media import View

    k = [[2400.0, 0, 1000], [0, 2400.0, 750], [0, 0, 1]]
    views = [View(tmp_path / "a.png", 'image "a.jpg"', (2000, 1500), (1000, 750))]
    path = tmp_path / "cameras.json"
    own = {
        "views": [{"K": k, "world_to_camera": np.eye(4).tolist(), "width": 2000, "height": 1500}]
    }
    path.write_text(json.dumps(own))
    fitted = fit_cameras(read_cameras(path, 1), views, "cameras")
    np.testing.assert_allclose(fitted.intrinsics[0], [[1200, 0, 500], [0, 1200, 375], [0, 0, 1]])
    own["views"][0].update(width=1000, height=750)
    path.write_text(json.dumps(own))
    with pytest.raises(
        RequestError,
        match="cameras: view 0's K describes a 1000x750 image, and input 0 is 2000x1500",
    ):
        fit_cameras(read_cameras(path, 1), views, "cameras")


def test_cameras_and_formats_per_model() -> None:
    any_view = choose_model("multi-view", "giant", False).spec
    single_view = choose_model("monocular", "large", True).spec
    k = np.eye(3)[None]
    pose = np.eye(4)[None]
    check_cameras(UserCameras(k, pose), any_view)
    check_cameras(UserCameras(k, None), single_view)
    with pytest.raises(RequestError, match="extrinsics"):
        check_cameras(UserCameras(k, None), any_view)
    with pytest.raises(RequestError, match="single-view"):
        check_cameras(UserCameras(k, pose), single_view)
    values = RequestValues(image=Path("a.png"), export_format="glb")
    with pytest.raises(RequestError, match="focal"):
        check_formats(values, single_view, None, ["a"])
    check_formats(values, single_view, UserCameras(k, None), ["a"])
    check_formats(replace(values, export_format="npz"), single_view, None, ["a"])


# --------------------------------------------------------------------------------------------
# Views from zips and videos
# --------------------------------------------------------------------------------------------


def _png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    return buffer.getvalue()


def test_zip_members_are_never_trusted_as_paths(tmp_path: Path) -> None:
    from da3cog.serve.limits import Limits
    from da3cog.serve.media import gather_views

    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    archive = tmp_path / "views.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("b/frame.png", _png(picture))
        bundle.writestr("a/frame.png", _png(picture))
        bundle.writestr(".hidden/x.png", _png(picture))
        bundle.writestr("c/notes.txt", b"not an image")
        bundle.writestr("c/shot.jfif", _png(picture))  # a JPEG name; the content decides
    messages: list[str] = []
    views, kind = gather_views(
        archive,
        (),
        tmp_path / "out",
        video_fps=1,
        max_frames=1,
        limits=Limits(),
        progress=messages.append,
    )
    assert kind == "zip"
    # Sorted by member name; hidden members are skipped, equal names kept apart.
    assert [v.path.parent.name for v in views] == ["0000", "0001", "0002"]
    assert [v.name for v in views] == ["frame", "frame", "shot"]
    assert [v.label for v in views] == [
        'image "views.zip" member "a/frame.png"',
        'image "views.zip" member "b/frame.png"',
        'image "views.zip" member "c/shot.jfif"',
    ]
    # Files not named as images are left out, and the user hears which.
    assert any('1 file(s) not named as images left out ("c/notes.txt")' in m for m in messages)
    assert all((tmp_path / "out") in v.path.parents for v in views)
    with pytest.raises(RequestError, match="at most 1 views"):
        gather_views(
            archive,
            (),
            tmp_path / "out2",
            video_fps=1,
            max_frames=1,
            limits=Limits(max_views=1),
            progress=print,
        )
    # A member path that leaves the archive's folder is refused by name, not skipped.
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr("../../escape.png", _png(picture))
    with pytest.raises(RequestError, match=r'member "\.\./\.\./escape.png"'):
        gather_views(
            archive,
            (),
            tmp_path / "out3",
            video_fps=1,
            max_frames=1,
            limits=Limits(),
            progress=print,
        )
    assert not (tmp_path.parent / "escape.png").exists()


def test_video_frames_are_sampled_on_a_time_grid(tmp_path: Path) -> None:
    from da3cog.serve.limits import Limits
    from da3cog.serve.video import encode_mp4, sample_video_frames

    frames = [np.full((32, 48, 3), 10 * i, dtype=np.uint8) for i in range(20)]
    clip = tmp_path / "clip.mp4"
    assert encode_mp4(iter(frames), clip, fps=10) == 20

    def sample(folder: str, fps: float, max_frames: int, **limits: object) -> list:
        return sample_video_frames(
            clip,
            "clip",
            tmp_path / folder,
            fps=fps,
            max_frames=max_frames,
            limits=Limits(**limits),
        )

    sampled = sample("a", 2.5, 100)
    assert len(sampled) == 5  # 2 s of video at 2.5 fps: t = 0, 0.4, 0.8, 1.2, 1.6
    levels = [np.asarray(Image.open(v.path)).mean() for v in sampled]
    assert np.allclose(levels, [0, 40, 80, 120, 160], atol=6)
    assert [v.label for v in sampled[:2]] == ["clip frame 0", "clip frame 1"]
    assert len(sample("b", 30, 7)) == 7
    # Frames over the view limit are scaled down while decoding.
    (small,) = sample("c", 1, 1, max_view_pixels=24 * 16)
    assert small.size == (24, 16) and small.input_size == (48, 32)
    assert Image.open(small.path).size == (24, 16)
    with pytest.raises(RequestError, match="more than 3 frames read"):
        sample("d", 0.1, 5, video_max_decoded_frames=3)
    with pytest.raises(RequestError, match="a video frame may have at most"):
        sample("e", 1, 1, max_video_frame_pixels=100)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(RequestError, match="not a video in an accepted container"):
        sample_video_frames(
            tmp_path / "bad.mp4", "bad", tmp_path / "f", fps=1, max_frames=1, limits=Limits()
        )


def test_a_panoramas_video_fits_what_h264_encodes(tmp_path: Path) -> None:
    """libx264 refuses frames over 16384 pixels a side: a depth video of panoramas that
    wide is written at most MAX_VIDEO_SIDE a side, aspect kept, and reads back."""
    import av

    from da3cog.export.video import MAX_VIDEO_SIDE
    from da3cog.serve.video import encode_mp4

    strip = np.tile(np.linspace(0, 255, 17000, dtype=np.uint8)[None, :, None], (30, 1, 3))
    clip = tmp_path / "panorama.mp4"
    assert encode_mp4(iter([strip, strip]), clip, fps=2) == 2
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (MAX_VIDEO_SIDE, 8)
        assert sum(1 for _ in container.decode(stream)) == 2


def _with_display_matrix(clip: Path, matrix: tuple[int, ...]) -> None:
    """Rewrite the MP4 track header's display matrix (what phones set for portrait video)."""
    import struct

    data = bytearray(clip.read_bytes())
    header = data.find(b"tkhd")
    assert data[header + 4] == 0, "a version-0 track header"
    # size/type, version/flags, created, modified, track id, reserved, duration, reserved x2,
    # layer, group, volume, reserved: then the 3x3 matrix.
    at = header + 4 + 4 + 4 * 5 + 8 + 8
    data[at : at + 36] = struct.pack(">9i", *matrix)
    clip.write_bytes(bytes(data))


def test_portrait_phone_video_frames_come_out_upright(tmp_path: Path) -> None:
    """A phone's portrait video: landscape frames with a display rotation of 90 degrees
    clockwise. Its sampled frames are turned as players show them (sizes swapped; the coded
    frame's left edge at the top), downscaled or not."""
    from da3cog.serve.limits import Limits
    from da3cog.serve.video import encode_mp4, sample_video_frames

    frame = np.full((32, 48, 3), 30, dtype=np.uint8)
    frame[:, :12] = 220  # the coded frame's left quarter
    clip = tmp_path / "portrait.mp4"
    encode_mp4(iter([frame] * 4), clip, fps=4)
    one = 0x00010000
    _with_display_matrix(clip, (0, one, 0, -one, 0, 0, 0, 0, 0x40000000))
    for folder, view_pixels, shown in (("full", 48 * 32, (32, 48)), ("small", 24 * 16, (16, 24))):
        (view, *_) = sample_video_frames(
            clip,
            "portrait",
            tmp_path / folder,
            fps=4,
            max_frames=1,
            limits=Limits(max_view_pixels=view_pixels),
        )
        assert view.size == shown and view.input_size == (32, 48)
        picture = np.asarray(Image.open(view.path), dtype=float)
        assert picture.shape[:2] == (shown[1], shown[0])
        quarter = shown[1] // 4
        assert picture[: quarter - 2].mean() > 180 and picture[quarter + 2 :].mean() < 70


def test_mirrored_video_frames_come_out_mirrored_not_turned(tmp_path: Path) -> None:
    """A display matrix that mirrors (x' = -x) was read as its rotation angle alone (-180
    degrees): frames came out upside down. Mirrored as players show them; the quarter
    turns as before."""
    from da3cog.io.video import sample_frames
    from da3cog.serve.video import encode_mp4

    frame = np.full((32, 48, 3), 30, dtype=np.uint8)
    frame[:8] = 250  # the coded top rows
    frame[:, :12, 2] = 250  # the coded left quarter, blue
    one, w = 0x10000, 0x40000000
    cases = {
        "mirrored": ((-one, 0, 0, 0, one, 0, 0, 0, w), (48, 32), "top", "right"),
        "turned": ((-one, 0, 0, 0, -one, 0, 0, 0, w), (48, 32), "bottom", "right"),
        "quarter": ((0, one, 0, -one, 0, 0, 0, 0, w), (32, 48), "right", "top"),
    }
    for name, (matrix, shown, bright_side, blue_side) in cases.items():
        clip = tmp_path / f"{name}.mp4"
        encode_mp4(iter([frame] * 2), clip, fps=2)
        _with_display_matrix(clip, matrix)
        (sampled,) = sample_frames(clip, name, stride=2, max_frames=1)
        assert sampled.size == shown, name
        picture = sampled.picture.astype(float)
        edges = {
            "top": picture[:3],
            "bottom": picture[-3:],
            "left": picture[:, :3],
            "right": picture[:, -3:],
        }
        assert edges[bright_side][..., 1].mean() > 200, name
        assert edges[blue_side][..., 2].mean() > 200, name
        opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
        assert edges[opposite[blue_side]][..., 2].mean() < 200, name


# --------------------------------------------------------------------------------------------
# Gaussians
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_prediction(small_zoo_checkpoint: Callable, photo: Callable):
    from small_zoo import SMALL_GS, small_model

    from da3cog.pipeline import InferenceOptions

    model = small_model(small_zoo_checkpoint("small-gs")[0], SMALL_GS)
    views = [photo("astronaut")[::4, ::4], photo("coffee")[::4, ::4]]
    return model.predict(views, options=InferenceOptions(process_res=140, infer_gaussians=True))


def test_the_served_video_renders_the_gaussians_the_ply_keeps(
    gaussian_prediction, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served fly-through renders what gaussians.ply keeps (no border band, no far
    background, no invalid Gaussians), as the library's gaussians_video does; it rendered
    every Gaussian."""
    from da3cog.export import video
    from da3cog.export.gaussians import gaussian_keep_mask
    from da3cog.serve.handler import Server
    from da3cog.serve.outputs import OutputFolder
    from da3cog.serve.provenance import RequestFiles

    rendered: list[np.ndarray | None] = []

    def spy(prediction, path, *, keep=None, **kwargs) -> int:
        rendered.append(keep)
        return 1

    monkeypatch.setattr(video, "render_flythrough", spy)
    server = Server(torch.device("cpu"), tmp_root=tmp_path / "r", files=RequestFiles(tmp_path))
    values = RequestValues(
        image=tmp_path / "a.png", mode="gaussian-splat", render_video=True, export_format="none"
    )
    outputs = OutputFolder(tmp_path / "outputs")
    server._extra_files(gaussian_prediction, values, outputs, lambda _: None)
    (keep,) = rendered
    expected, removed = gaussian_keep_mask(gaussian_prediction)
    assert keep is not None and np.array_equal(keep, expected)
    assert sum(removed.values()) > 0, "the case leaves some out"


def test_flythrough_passes_through_every_camera() -> None:
    from da3cog.export.video import flythrough_cameras

    angle = np.deg2rad(30)
    turn = np.array(
        [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    )
    second = np.eye(4)
    second[:3, :3], second[:3, 3] = turn, [0.3, 0.0, 0.1]
    extrinsics = np.stack([np.eye(4), second])
    intrinsics = np.stack([np.diag([100.0, 100.0, 1.0]), np.diag([120.0, 120.0, 1.0])])
    viewmats, ks = flythrough_cameras(extrinsics, intrinsics, frames=10)
    assert len(viewmats) == 11
    assert np.allclose(viewmats[0], extrinsics[0]) and np.allclose(viewmats[-1], extrinsics[1])
    assert np.allclose(ks[5], (intrinsics[0] + intrinsics[1]) / 2)
    rotations = viewmats[:, :3, :3]
    assert np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    single, _ = flythrough_cameras(extrinsics[:1], intrinsics[:1], wander_radius=0.1)
    centres = -np.einsum("nji,nj->ni", single[:, :3, :3], single[:, :3, 3])
    assert np.allclose(single[0], np.eye(4)) and np.abs(centres).max() <= 0.2 + 1e-9


def test_render_flythrough_wiring(gaussian_prediction, tmp_path: Path) -> None:
    """The video path with a stand-in rasteriser: camera count, image size and the frames
    that reach the MP4 (the real renderers: tests/test_splat_render.py)."""
    import av

    from da3cog.export.video import render_flythrough

    calls = {"views": 0}

    def rasterizer(means, quats, scales, opacities, harmonics, viewmats, ks, width, height):
        # A few cameras per call: the frames are encoded as they come.
        assert len(viewmats) <= 8
        calls.update(count=len(means), views=calls["views"] + len(viewmats), size=(height, width))
        assert harmonics.shape[1:] == (3, 9) and quats.shape[1] == 4
        levels = torch.linspace(0, 1, len(viewmats))[:, None, None, None]
        return levels.expand(len(viewmats), height, width, 3)

    path = tmp_path / "fly.mp4"
    frames = render_flythrough(
        gaussian_prediction,
        path,
        rasterizer=rasterizer,
        device=torch.device("cpu"),
    )
    _, height, width = gaussian_prediction.gaussians.grid
    assert calls == {
        "count": len(gaussian_prediction.gaussians),
        "views": frames,
        "size": (height, width),
    }
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames


# --------------------------------------------------------------------------------------------
# Model cache and request folders
# --------------------------------------------------------------------------------------------


def test_model_cache_offloads_least_recently_used(small_checkpoint: Path) -> None:
    from da3cog.pipeline import DepthAnything3
    from da3cog.serve.models import ModelCache, _weight_bytes
    from da3cog.weights import load_model

    loads: list[str] = []

    def loader(preset: str, device: torch.device):
        loads.append(preset)
        return load_model(small_checkpoint, device=device)

    budget = 2.5  # models' worth of device memory

    def free_bytes() -> int:
        return int((budget - len(cache.resident)) * size)

    size = _weight_bytes(DepthAnything3(load_model(small_checkpoint), torch.device("cpu")))
    sizes = dict.fromkeys("abc", size)
    cache = ModelCache(
        torch.device("cpu"), loader=loader, free_bytes=free_bytes, needed_bytes=sizes.__getitem__
    )
    for name in ("a", "b"):
        cache.get(name)
    assert cache.resident == ["a", "b"]
    cache.get("a")  # a is now the most recently used
    cache.get("c")
    assert cache.resident == ["a", "c"] and cache.offloaded == ["b"]
    cache.get("b")
    assert cache.resident == ["c", "b"] and cache.offloaded == ["a"]
    assert loads == ["a", "b", "c"], "offloaded models come back without reloading"


def test_model_cache_says_what_loading_a_model_would_take(small_checkpoint: Path) -> None:
    """What a request's memory check sets aside for its model before loading it: nothing
    when the model is resident; on the CPU its weights; on a GPU its weights on the device
    less the models moved to the host to make room for it, which the host then holds."""
    from da3cog.pipeline import DepthAnything3
    from da3cog.serve.models import ModelCache, _weight_bytes
    from da3cog.weights import load_model

    model = DepthAnything3(load_model(small_checkpoint), torch.device("cpu"))
    size = _weight_bytes(model)
    sizes = {"a": size, "b": size, "big": 3 * size}
    on_cpu = ModelCache(
        torch.device("cpu"),
        loader=lambda preset, device: load_model(small_checkpoint, device=device),
        needed_bytes=sizes.__getitem__,
    )
    assert on_cpu.load_cost("a") == (size, 0)
    on_cpu.get("a")
    assert on_cpu.load_cost("a") == (0, 0)
    free = 3.5 * size  # device bytes free with nothing resident

    def free_bytes() -> int:
        return int(free - sum(sizes[name] for name in on_gpu.resident))

    on_gpu = ModelCache(torch.device("cuda"), free_bytes=free_bytes, needed_bytes=sizes.__getitem__)
    on_gpu._resident.update(a=model, b=model)  # as if loaded: this machine has no GPU
    assert on_gpu.load_cost("a") == (0, 0)
    # 1.5 models' worth free: "big" needs 3, so a (least recently used) then b move out.
    assert on_gpu.load_cost("big") == (2 * size, size)
    on_gpu._resident.move_to_end("a")
    free = 2.5 * size  # half a model's worth free: b alone moves out for a model of one
    sizes["c"] = size
    assert on_gpu.load_cost("c") == (size, 0)


def test_checkpoint_override_and_offline_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path
) -> None:
    from da3cog.serve.models import checkpoint_folder, load_preset
    from da3cog.weights import CheckpointError

    monkeypatch.setenv("DA3COG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DA3COG_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "da3-small").symlink_to(small_checkpoint)
    assert checkpoint_folder("da3-small") == tmp_path / "da3-small"
    # The override folder stands in for the Hub repo, whose id the predictions report.
    loaded = load_preset("da3-small", torch.device("cpu"))
    assert loaded.model_id == "depth-anything/DA3-SMALL"
    assert loaded.source == tmp_path / "da3-small"
    with pytest.raises(CheckpointError) as error:
        checkpoint_folder("da3-base")
    message = str(error.value)
    assert "depth-anything/DA3-BASE" in message and str(tmp_path / "da3-base") in message
    # An older release has its own folder; the bare preset name is the newest release. The
    # folder must hold the model it stands in for: here a small stand-in registered for giant
    # (tests only), then the same folder without that registration.
    from da3cog.serve import models

    monkeypatch.setitem(models.STAND_INS, "da3-small", "da3-giant")
    (tmp_path / "da3-giant@1.0").symlink_to(small_checkpoint)
    assert checkpoint_folder("da3-giant@1.0") == tmp_path / "da3-giant@1.0"
    assert load_preset("da3-giant@1.0", torch.device("cpu")).model_id == (
        "depth-anything/DA3-GIANT"
    )
    with pytest.raises(CheckpointError) as error:
        checkpoint_folder("da3-giant")
    message = str(error.value)
    assert "depth-anything/DA3-GIANT-1.1" in message and str(tmp_path / "da3-giant") in message
    monkeypatch.delitem(models.STAND_INS, "da3-small")
    # Weights of another model under a preset's name (mono in the metric folder would load
    # strictly, and be served as metric): refused, naming both.
    with pytest.raises(CheckpointError, match=r"holds a da3-small checkpoint .*not da3-giant"):
        checkpoint_folder("da3-giant@1.0")


def test_request_folders_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path, photo: Callable
) -> None:
    """Each request has its own folder; it goes when the next request starts, or at once on
    failure; the runtime's input files go when the request ends; setup removes the folders
    of a worker that is gone."""
    from da3cog.serve.handler import REQUEST_PREFIX, Server
    from da3cog.serve.provenance import RequestFiles

    monkeypatch.setenv("DA3COG_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "da3-small").symlink_to(small_checkpoint)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    requests = tmp_path / "requests"
    requests.mkdir()
    # Left by a killed worker (a pid that cannot exist) and by a live one (ours' parent).
    orphan = requests / f"{REQUEST_PREFIX}999999999-abcd"
    (orphan / "inputs").mkdir(parents=True)
    alive = requests / f"{REQUEST_PREFIX}{os.getppid()}-efgh"
    alive.mkdir()
    server = Server(torch.device("cpu"), tmp_root=requests, files=RequestFiles(downloads))
    server.setup("small", progress=lambda _: None)
    assert not orphan.exists() and alive.exists()
    alive.rmdir()

    def upload(name: str, data: bytes) -> Path:
        path = downloads / f"tmp{os.urandom(4).hex()}{name}"
        path.write_bytes(data)
        return path

    values = RequestValues(
        image=upload("photo.png", _png(photo("astronaut")[::4, ::4])),
        model_size="small",
        export_format="none",
        process_resolution=140,
        mode="monocular",
    )
    first = server.handle(values, progress=lambda _: None)
    assert first[0].name == "manifest.json" and all(p.is_file() for p in first)
    assert len({p.name for p in first}) == len(first)
    # The request's upload and a failed download of the same window are gone.
    assert list(downloads.iterdir()) == []
    failed_download = upload("lost.png", b"")
    values = replace(values, image=upload("photo.png", _png(photo("coffee")[::4, ::4])))
    second = server.handle(values, progress=lambda _: None)
    assert not any(p.exists() for p in first) and all(p.is_file() for p in second)
    assert not failed_download.exists()
    with pytest.raises(RequestError):
        server.handle(
            replace(values, image=upload("broken.png", b"\x89PNG broken")),
            progress=lambda _: None,
        )
    assert list(requests.iterdir()) == []
    assert list(downloads.iterdir()) == []


def test_notes_name_files_as_they_are_returned() -> None:
    """A note about an exported file names it as the server returns it: inside the zip of
    the prediction it belongs to (monocular mode prefixes each view's files)."""
    from da3cog.serve.outputs import _renamed_notes

    renamed = {
        "colmap/images/image_0000_b.png": "view_0001_colmap.zip!images/image_0000_b.png",
        "depth_0000_b.npy": "view_0001_depth_0000_b.npy",
    }
    notes = [
        "colmap/images/image_0000_b.png: upsampled from 40x36",
        "the prediction is at processing resolution",
    ]
    assert _renamed_notes(notes, renamed) == [
        "view_0001_colmap.zip!images/image_0000_b.png: upsampled from 40x36",
        "the prediction is at processing resolution",
    ]


def _small_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path
) -> tuple[Server, Path]:
    """A worker set up with the small random-weight checkpoint, and the folder its runtime
    downloads requests' files into."""
    from da3cog.serve.handler import Server
    from da3cog.serve.provenance import RequestFiles

    monkeypatch.setenv("DA3COG_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "da3-small").symlink_to(small_checkpoint)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    server = Server(
        torch.device("cpu"), tmp_root=tmp_path / "requests", files=RequestFiles(downloads)
    )
    server.setup("small", progress=lambda _: None)
    return server, downloads


def _panning_request(downloads: Path, picture: np.ndarray, views: int) -> RequestValues:
    """The runtime's downloads for one request: ``views`` 128x96 frames of a camera panning
    across ``picture``."""
    paths = []
    for index in range(views):
        path = downloads / f"tmp{os.urandom(4).hex()}frame{index}.png"
        path.write_bytes(_png(np.ascontiguousarray(picture[100:196, 40 * index :][:, :128])))
        paths.append(path)
    return RequestValues(
        image=paths[0],
        images=tuple(paths[1:]),
        model_size="small",
        export_format="none",
        process_resolution=140,
    )


def test_a_request_too_big_for_one_pass_runs_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path, photo: Callable
) -> None:
    """With a memory budget that holds 6 views' outputs and one chunk's activations but not
    one pass over all 6, the multi-view request runs as aligned chunks (and says so) instead
    of being refused."""
    from da3cog import memory
    from da3cog.memory import MIN_CHUNK
    from da3cog.model.presets import PRESETS

    size = memory.request_size([(128, 96)] * 6, 140, "input", False, 0)
    preset = PRESETS["da3-small"]
    one_pass = memory.estimate(preset, size, on_gpu=False).host
    chunked = memory.estimate(preset, size, on_gpu=False, chunk=MIN_CHUNK).host
    bigger = memory.estimate(preset, size, on_gpu=False, chunk=MIN_CHUNK + 1).host
    assert chunked < bigger < one_pass
    # Room for chunks of 4 views, not 5 (nor one pass over all 6).
    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, f"{(chunked + bigger) / 2 / memory.GIB:.9f}")
    server, downloads = _small_server(tmp_path, monkeypatch, small_checkpoint)
    picture = photo("coffee")

    def request() -> RequestValues:
        return _panning_request(downloads, picture, 6)

    messages: list[str] = []
    values = request()
    files = server.handle(values, progress=messages.append)
    assert "6 views do not fit in one pass: chunks of 4 views" in messages
    manifest = json.loads(files[0].read_text())
    (prediction,) = manifest["predictions"]
    assert [view["chunk"] for view in prediction["views"]] == [0, 0, 0, 1, 1, 1]
    assert any("reconstructed in 2 chunks of 4 views" in note for note in manifest["notes"])
    # The same request under a time budget that its first chunk already shows it cannot
    # meet: refused after that chunk, naming the budget; the worker then serves it again.
    from da3cog.serve.limits import TIME_BUDGET_ENV

    monkeypatch.setenv(TIME_BUDGET_ENV, "0.001")
    with pytest.raises(RequestError, match=r"over its 0.001s time budget: not even one chunk fits"):
        server.handle(request(), progress=messages.append)
    monkeypatch.delenv(TIME_BUDGET_ENV)
    assert server.handle(request(), progress=lambda _: None)[0].name == "manifest.json"
    # loop_closure reaches the pipeline (two chunks: nothing to close, and the notes say so).
    looped = replace(request(), loop_closure=True)
    manifest = json.loads(server.handle(looped, progress=lambda _: None)[0].read_text())
    assert any("loop closure: not run, 6 views" in n for n in manifest["notes"])
    # Chunks that cannot be aligned (here: an alignment asking for more pixels than there
    # are): refused with what the user can change, not the library's chunk_overlap.
    from da3cog import chunked

    monkeypatch.setattr(chunked, "MIN_ALIGNMENT_PIXELS", 10**9)
    with pytest.raises(RequestError) as refused:
        server.handle(request(), progress=lambda _: None)
    message = str(refused.value)
    assert "chunk 2 cannot be aligned with chunk 1" in message, message
    assert "send fewer views or a lower process_resolution" in message
    assert "chunk_overlap" not in message


def test_a_monocular_request_counts_the_outputs_of_every_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Monocular requests run one view at a time but keep every view's outputs for the
    exports: their estimate is one view's network and all views' outputs, so many large
    views are refused with how many fit, as multi-view ones are (before, only the largest
    view was counted and any number was accepted)."""
    from da3cog import memory
    from da3cog.model.presets import PRESETS
    from da3cog.serve.handler import Server
    from da3cog.serve.media import View
    from da3cog.serve.provenance import RequestFiles
    from da3cog.serve.request import ModelChoice

    preset = PRESETS["da3-small"]
    views = [
        View(tmp_path / f"v{index}.png", f"images[{index}]", (1600, 1200), (1600, 1200))
        for index in range(12)
    ]
    size = memory.request_size([(1600, 1200)] * 4, 504, "input", False, 0)
    four = memory.estimate(preset, size, on_gpu=False, chunk=1).host
    assert memory.estimate(preset, size, on_gpu=False).host > four  # the network counted once
    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, f"{four * 1.05 / memory.GIB:.9f}")
    server = Server(
        torch.device("cpu"), tmp_root=tmp_path / "requests", files=RequestFiles(tmp_path)
    )
    values = RequestValues(
        image=tmp_path / "v0.png", mode="monocular", export_format="none", process_resolution=504
    )
    choice = ModelChoice(preset.name, "test")
    assert server._check_memory(values, choice, views[:4]) is None
    with pytest.raises(RequestError, match="Send at most 4 of these views") as refused:
        server._check_memory(values, choice, views)
    # The outputs at the input size set the bound: a lower resolution would not help.
    assert "process_resolution=280" not in str(refused.value)


def test_the_memory_check_counts_views_upright(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phone photos stored landscape with an EXIF rotation are processed portrait: the check
    sizes them so (stored sizes made portrait photos the minority among landscape frames, and
    the estimate 35% low); a view too elongated for the 280 px advice leaves that advice out
    instead of failing the refusal."""
    from da3cog import memory
    from da3cog.serve.handler import Server
    from da3cog.serve.media import View
    from da3cog.serve.provenance import RequestFiles
    from da3cog.serve.request import ModelChoice

    views = [
        View(tmp_path / f"p{index}.jpg", f"images[{index}]", (4032, 3024), (4032, 3024), True)
        for index in range(3)
    ] + [View(tmp_path / "w.png", "images[3]", (1920, 1080), (1920, 1080))]
    asked: list[list[tuple[int, int]]] = []
    original = memory.request_size

    def spy(sizes, *args, **kwargs):
        asked.append(list(sizes))
        return original(sizes, *args, **kwargs)

    monkeypatch.setattr(memory, "request_size", spy)
    server = Server(torch.device("cpu"), tmp_root=tmp_path / "r", files=RequestFiles(tmp_path))
    values = RequestValues(image=views[0].path, export_format="none", process_resolution=504)
    server._check_memory(values, ModelChoice("da3-small", "test"), views)
    assert asked[0] == [(3024, 4032)] * 3 + [(1920, 1080)]
    # 5000x100 processes at 504 px, not at 280: the refusal still comes, without that advice.
    thin = [
        View(tmp_path / f"t{i}.png", f"images[{i}]", (5000, 100), (5000, 100)) for i in range(40)
    ]
    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, "0.001")
    with pytest.raises(RequestError, match="needs about") as refused:
        server._check_memory(values, ModelChoice("da3-small", "test"), thin)
    assert "process_resolution=280" not in str(refused.value)


def test_only_formats_with_a_point_cloud_count_its_points() -> None:
    """NPZ writes no point cloud: its requests are not charged for a million points."""
    from da3cog.serve.handler import exports_points
    from da3cog.serve.inputs import EXPORT_FORMATS

    assert [f for f in EXPORT_FORMATS if exports_points(f)] == ["glb", "ply", "colmap", "all"]


def test_a_multi_view_refusal_gives_the_chunked_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-view request the worker would run in chunks is refused with what it needs in
    the smallest chunks, and "at most N of these views" is the largest count it accepts
    (before, both were one-pass figures: "at most 22" where 34 views were accepted)."""
    import re

    from da3cog import memory
    from da3cog.model.presets import PRESETS
    from da3cog.serve.handler import Server
    from da3cog.serve.media import View
    from da3cog.serve.provenance import RequestFiles
    from da3cog.serve.request import ModelChoice

    preset = PRESETS["da3-small"]
    views = [
        View(tmp_path / f"v{index}.png", f"images[{index}]", (1600, 1200), (1600, 1200))
        for index in range(60)
    ]

    def chunked(count: int) -> memory.MemoryEstimate:
        size = memory.request_size([(1600, 1200)] * count, 504, "input", False, 0)
        return memory.estimate(preset, size, on_gpu=False, chunk=memory.MIN_CHUNK)

    budget = (chunked(30).host + chunked(31).host) / 2
    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, f"{budget / memory.GIB:.9f}")
    server = Server(
        torch.device("cpu"), tmp_root=tmp_path / "requests", files=RequestFiles(tmp_path)
    )
    values = RequestValues(image=tmp_path / "v0.png", export_format="none", process_resolution=504)
    choice = ModelChoice(preset.name, "test")
    assert server._check_memory(values, choice, views[:30]) is not None  # accepted, in chunks
    with pytest.raises(RequestError) as refused:
        server._check_memory(values, choice, views[:31])
    with pytest.raises(RequestError) as refused:
        server._check_memory(values, choice, views)
    message = str(refused.value)
    assert "Send at most 30 of these views" in message, message
    assert f"needs about {chunked(60).describe()};" in message, message
    assert re.search(r"needs about [0-9.]+ GiB of RAM", message)


def test_a_monocular_request_counts_each_view_at_its_own_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Monocular views run one at a time, each at its own shape: three panoramas do not make
    a square photo count as a panorama (it did once views were counted at the scene's common
    shape, and a request the square alone did not fit was accepted with them)."""
    from da3cog import memory
    from da3cog.model.presets import PRESETS
    from da3cog.serve.handler import Server
    from da3cog.serve.media import View
    from da3cog.serve.provenance import RequestFiles
    from da3cog.serve.request import ModelChoice

    preset = PRESETS["da3-small"]
    square = View(tmp_path / "s.png", "image", (1000, 1000), (1000, 1000))
    panoramas = [
        View(tmp_path / f"p{i}.png", f"images[{i}]", (2000, 500), (2000, 500)) for i in range(3)
    ]
    alone = memory.request_size([(1000, 1000)], 504, "input", False, 0)
    needed = memory.estimate(preset, alone, on_gpu=False, chunk=1).host
    monkeypatch.setenv(memory.MEMORY_BUDGET_ENV, f"{needed * 0.9 / memory.GIB:.9f}")
    server = Server(torch.device("cpu"), tmp_root=tmp_path / "r", files=RequestFiles(tmp_path))
    values = RequestValues(
        image=square.path, mode="monocular", export_format="none", process_resolution=504
    )
    choice = ModelChoice(preset.name, "test")
    for views in ([square], [*panoramas, square]):
        with pytest.raises(RequestError, match="needs about"):
            server._check_memory(values, choice, views)


def test_the_memory_check_sets_aside_the_weights_of_a_model_still_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs before the request's model loads: a model not loaded yet takes its
    weights out of the memory the request may plan on (before, a request that fitted only
    with the weights' memory was accepted, and the weights then loaded into it)."""
    from da3cog import memory
    from da3cog.model.presets import PRESETS
    from da3cog.serve.handler import Server
    from da3cog.serve.media import View
    from da3cog.serve.models import ModelCache
    from da3cog.serve.provenance import RequestFiles
    from da3cog.serve.request import ModelChoice

    preset, weights = PRESETS["da3-small"], memory.GIB
    views = [
        View(tmp_path / f"v{index}.png", f"images[{index}]", (1600, 1200), (1600, 1200))
        for index in range(4)
    ]
    size = memory.request_size([(1600, 1200)] * 4, 504, "input", False, 0)
    needed = memory.estimate(preset, size, on_gpu=False, chunk=1).host
    monkeypatch.delenv(memory.MEMORY_BUDGET_ENV, raising=False)
    available = needed / memory.SAFETY_FRACTION + weights / 2
    monkeypatch.setattr(memory, "available_host_bytes", lambda: int(available))
    cache = ModelCache(torch.device("cpu"), needed_bytes=lambda preset: weights)
    server = Server(
        torch.device("cpu"),
        tmp_root=tmp_path / "requests",
        cache=cache,
        files=RequestFiles(tmp_path),
    )
    values = RequestValues(
        image=tmp_path / "v0.png", mode="monocular", export_format="none", process_resolution=504
    )
    choice = ModelChoice(preset.name, "test")
    with pytest.raises(RequestError, match="needs about"):
        server._check_memory(values, choice, views)
    cache._resident[preset.name] = None  # type: ignore[assignment]  # as if loaded
    assert server._check_memory(values, choice, views) is None


def test_a_monocular_request_runs_under_the_time_budget_view_by_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path, photo: Callable
) -> None:
    """One view at a time, each reported with the time left; a request whose first view
    shows it cannot finish in the time budget stops there and is refused with how many views
    would fit, instead of running every view past the platform's timeout."""
    from da3cog.pipeline import DepthAnything3
    from da3cog.serve.limits import TIME_BUDGET_ENV

    server, downloads = _small_server(tmp_path, monkeypatch, small_checkpoint)
    picture = photo("coffee")
    messages: list[str] = []
    values = replace(_panning_request(downloads, picture, 3), mode="monocular")
    files = server.handle(values, progress=messages.append)
    views = [m for m in messages if m.startswith("view ")]
    assert [m.split(":")[0] for m in views] == ["view 1/3", "view 2/3", "view 3/3"]
    assert "s left" not in views[0] and all("s left" in m for m in views[1:])
    assert files[0].name == "manifest.json"

    ran: list[int] = []
    real_predict = DepthAnything3.predict

    def counted(self: DepthAnything3, *args: object, **kwargs: object) -> object:
        ran.append(1)
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(DepthAnything3, "predict", counted)
    monkeypatch.setenv(TIME_BUDGET_ENV, "0.001")
    with pytest.raises(RequestError, match=r"over its 0\.001s time budget: not even one view fits"):
        server.handle(replace(_panning_request(downloads, picture, 3), mode="monocular"))
    assert len(ran) == 1


def test_a_view_too_elongated_to_process_is_refused_before_any_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path, photo: Callable
) -> None:
    """A 3000x2 strip among good photos, in any mode: refused from its header before the
    network sees any view (the last view of a monocular request used to be refused after all
    the others ran), named as the user sent it."""
    from da3cog.pipeline import DepthAnything3

    server, downloads = _small_server(tmp_path, monkeypatch, small_checkpoint)
    ran: list[object] = []
    monkeypatch.setattr(DepthAnything3, "predict", lambda *args, **kwargs: ran.append(args))
    for mode in ("monocular", "multi-view"):
        request = _panning_request(downloads, photo("coffee"), 3)
        strip = downloads / f"tmp{os.urandom(4).hex()}strip.png"
        strip.write_bytes(_png(np.zeros((2, 3000, 3), dtype=np.uint8)))
        values = replace(request, images=(*request.images, strip), mode=mode)
        with pytest.raises(RequestError) as refused:
            server.handle(values, progress=lambda _: None)
        message = str(refused.value)
        assert "strip.png" in message and "3000x2 pixels is too elongated" in message, message
        assert "process_resolution=140" in message and str(downloads) not in message
    assert ran == []


def test_a_failed_prediction_is_refused_and_frees_what_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path, photo: Callable
) -> None:
    """A prediction that fails part way (out of memory although the estimate fit: an upper
    bound of measured peaks, not a guarantee; over the time budget; refused by the pipeline)
    is refused with what to send instead; the failed run's tensors are already free when the
    worker hands its memory back (the CUDA cache can only return blocks nothing holds), and
    the same worker serves the next request. Other failures are not dressed up as the
    user's."""
    import weakref

    from da3cog.chunked import TimeBudgetExceeded
    from da3cog.pipeline import DepthAnything3
    from da3cog.serve import handler

    server, downloads = _small_server(tmp_path, monkeypatch, small_checkpoint)
    picture = photo("coffee")

    def request() -> RequestValues:
        return _panning_request(downloads, picture, 3)

    failures: list[tuple[Callable[[], Exception], str]] = [
        (
            lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            "(3 view(s) at process_resolution=140, in one pass) ran out of GPU memory although "
            "its estimate fit this worker. Send fewer or smaller views or a lower "
            "process_resolution",
        ),
        (
            lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to 8"),
            "in one pass) ran out of memory although",
        ),
        (
            lambda: TimeBudgetExceeded(900.0, 600.0, 2),
            "over its 600s time budget: at most 2 of these views would fit. Send fewer views",
        ),
        (
            lambda: ValueError("the shared views have fewer than 3 usable pixels"),
            "fewer than 3 usable",
        ),
    ]
    real_predict = DepthAnything3.predict
    held: list[weakref.ref] = []

    def predict(self: DepthAnything3, *args: object, **kwargs: object) -> object:
        if not failures:
            return real_predict(self, *args, **kwargs)
        activations = torch.ones(1 << 20)
        held.append(weakref.ref(activations))
        raise failures[0][0]()

    still_held_at_release: list[bool] = []
    real_release = handler.release_memory

    def release(device: torch.device) -> None:
        still_held_at_release.append(bool(held) and held[-1]() is not None)
        real_release(device)

    monkeypatch.setattr(DepthAnything3, "predict", predict)
    monkeypatch.setattr(handler, "release_memory", release)
    while failures:
        expected = failures[0][1]
        still_held_at_release.clear()
        with pytest.raises(RequestError) as refused:
            server.handle(request(), progress=lambda _: None)
        failures.pop(0)
        assert expected in str(refused.value)
        assert still_held_at_release and not any(still_held_at_release), expected
    failures.append((lambda: RuntimeError("a bug, not memory"), ""))
    with pytest.raises(RuntimeError, match="a bug, not memory") as other:
        server.handle(request(), progress=lambda _: None)
    assert not isinstance(other.value, RequestError)
    failures.clear()
    assert list((tmp_path / "requests").iterdir()) == []
    files = server.handle(request(), progress=lambda _: None)
    assert files[0].name == "manifest.json"
