"""The ``da3cog`` command, run in-process on the small random-weight checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from da3cog.cli import main

Photo = Callable[[str], np.ndarray]
PROCESS_RES = "112"


@pytest.fixture
def images(tmp_path: Path, photo: Photo) -> list[Path]:
    """Two 512x512 PNGs: an RGB photo and a greyscale one."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [folder / "astronaut.png", folder / "camera.png"]
    for path in paths:
        Image.fromarray(photo(path.stem)).save(path)
    return paths


def predict_args(model: Path, out: Path, images: list[Path], *extra: str) -> list[str]:
    return [
        "predict",
        *map(str, images),
        "--model",
        str(model),
        "--out",
        str(out),
        "--process-res",
        PROCESS_RES,
        "--device",
        "cpu",
        *extra,
    ]


def read_cameras(out: Path) -> dict:
    return json.loads((out / "cameras.json").read_text())


def test_predict_writes_depth_confidence_and_cameras(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert main(predict_args(small_checkpoint, out, images)) == 0

    expected = {
        "depth_0000_astronaut.npy",
        "confidence_0000_astronaut.npy",
        "depth_0001_camera.npy",
        "confidence_0001_camera.npy",
        "depth_vis_0000_astronaut.png",
        "depth_vis_0001_camera.png",
        "cameras.json",
        "manifest.json",
    }
    assert {path.name for path in out.iterdir()} == expected
    # No staging folder or temporary file is left beside the output.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "out"]
    printed = capsys.readouterr()
    assert sorted(Path(line).name for line in printed.out.splitlines()) == sorted(expected)
    assert "[da3cog] running da3-small" in printed.err

    for index, stem in enumerate(("astronaut", "camera")):
        for kind in ("depth", "confidence"):
            array = np.load(out / f"{kind}_{index:04d}_{stem}.npy")
            assert array.dtype == np.float32
            assert array.shape == (512, 512)
            assert np.isfinite(array).all() and (array > 0).all()

    document = read_cameras(out)
    assert document["model"]["preset"] == "da3-small"
    assert document["is_metric"] is False
    assert document["output_resolution"] == "input"
    assert document["conventions"]["world_frame"] == "camera of the first view"
    assert document["processing_size"] == {"height": 112, "width": 112}
    assert [view["name"] for view in document["views"]] == ["astronaut", "camera"]
    for index, view in enumerate(document["views"]):
        assert view["index"] == index
        assert (view["width"], view["height"]) == (512, 512)
        K = np.array(view["K"])
        world_to_camera = np.array(view["world_to_camera"])
        camera_to_world = np.array(view["camera_to_world"])
        assert K.shape == (3, 3) and K[0, 0] > 0 and K[1, 1] > 0
        np.testing.assert_array_equal(K[2], [0, 0, 1])
        assert world_to_camera.shape == camera_to_world.shape == (4, 4)
        np.testing.assert_allclose(world_to_camera @ camera_to_world, np.eye(4), atol=1e-6)
        np.testing.assert_allclose(camera_to_world, np.linalg.inv(world_to_camera), atol=1e-6)
    assert document["views"][0]["world_to_camera"] == np.eye(4).tolist()


def test_non_empty_out_folder_is_refused_and_left_untouched(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(predict_args(small_checkpoint, out, images)) == 2
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "out"]
    assert "not empty" in capsys.readouterr().err


def test_an_empty_existing_out_folder_is_used(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert main(predict_args(small_checkpoint, out, images[:1])) == 0
    assert (out / "cameras.json").is_file()
    assert np.load(out / "depth_0000_astronaut.npy").shape == (512, 512)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if any model is loaded (or downloaded); the list records attempts."""
    from da3cog.pipeline import DepthAnything3

    attempts: list[str] = []

    def refuse(source: object, **_: object) -> None:
        attempts.append(str(source))
        raise AssertionError(f"a model was loaded: {source}")

    monkeypatch.setattr(DepthAnything3, "from_pretrained", staticmethod(refuse))
    return attempts


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder / "no_such_photo.jpg", "no_such_photo.jpg: no such file"),
        (
            lambda folder: (folder / "empty", (folder / "empty").mkdir())[0],
            "empty: a folder with no image files",
        ),
        (
            lambda folder: (folder / "notes.txt", (folder / "notes.txt").write_text("hi"))[0],
            "notes.txt",
        ),
        (
            lambda folder: (folder / "cut.png", (folder / "cut.png").write_bytes(b""))[0],
            "cut.png",
        ),
    ],
    ids=["missing", "folder-without-images", "not-an-image", "empty"],
)
def test_bad_images_exit_2_before_any_model_is_loaded(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
    make: Callable[[Path], Path],
    message: str,
) -> None:
    """A newcomer's typo must not cost a model download: every input is checked first."""
    bad = make(tmp_path / "images")
    out = tmp_path / "out"
    assert main(predict_args(tmp_path / "weights", out, [images[0], bad])) == 2
    err = capsys.readouterr().err
    assert "da3cog: error:" in err and message in err, err
    assert not out.exists() and no_model_load == []


def test_out_naming_a_file_says_so_before_any_model_is_loaded(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:
    out = tmp_path / "result.txt"
    out.write_text("mine")
    assert main(predict_args(tmp_path / "weights", out, images)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "mine" and no_model_load == []


def test_out_under_a_file_says_so_before_any_model_is_loaded(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:
    """``--out some.png/out`` cannot be created: refused up front (before, the prediction ran
    and the export failed with a traceback)."""
    assert main(predict_args(tmp_path / "weights", images[0] / "out", images)) == 2
    assert f"{images[0]} is a file, not a folder" in capsys.readouterr().err
    assert no_model_load == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stride", "0"], "--stride must be a whole number of at least 1, got 0"),
        (["--fps", "0"], "--fps must be a number of frames a second above 0, got 0.0"),
        (["--fps", "inf"], "--fps must be a number of frames a second above 0, got inf"),
        (["--fps", "-1"], "--fps must be"),
        (["--max-frames", "0"], "--max-frames must be a whole number of at least 1"),
    ],
)
def test_bad_frame_sampling_exits_2_naming_the_flag(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
    flags: list[str],
    message: str,
) -> None:
    """Before, --stride 0 and --fps 0 fell back to 2 frames a second without a word, and
    --fps inf divided by zero while decoding."""
    assert main([*predict_args(tmp_path / "weights", tmp_path / "out", images), *flags]) == 2
    assert message in capsys.readouterr().err
    assert no_model_load == []


def test_local_videos_are_not_held_to_the_hosted_decode_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI and the batch decode the user's own videos for as long as that takes (the
    hosted model stops after 120 s: an hour of 30 fps video was refused, and --fps could not
    help since every frame is decoded). A clock that jumps an hour a frame stands in for a
    long video."""
    import itertools

    from da3cog.export.video import encode_mp4
    from da3cog.io import video
    from da3cog.io.inputs import expand_inputs

    clip = tmp_path / "clip.mp4"
    base = np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)
    encode_mp4((np.roll(base, 4 * i, axis=1) for i in range(12)), clip, fps=6)
    hours = itertools.count(step=3600.0)
    monkeypatch.setattr(video.time, "monotonic", lambda: next(hours))
    with pytest.raises(video.VideoDecodeError, match="decoding took longer than 120 s"):
        list(video.sample_frames(clip, "clip", fps=2.0, max_frames=10))
    assert len(expand_inputs([clip], tmp_path / "frames")) == 4


def test_a_folder_of_numbered_frames_comes_in_frame_order(tmp_path: Path) -> None:
    """ffmpeg's ``%d.png`` frames: 2 before 10 (a plain name sort put 10 and 100 first, and a
    chunked run then aligned frames that are not neighbours)."""
    from da3cog.io.inputs import expand_inputs

    folder = tmp_path / "frames"
    folder.mkdir()
    picture = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    names = ["1.png", "10.png", "100.png", "11.png", "2.png", "9.png", "x1²3.png"]
    for name in names:
        picture.save(folder / name)
    found = [path.name for path in expand_inputs([folder], tmp_path / "unused")]
    # Digits other than 0-9 ("²") are text, not numbers; a run of 5000 digits (a zip member's
    # name may have them) sorts as a number too (int() refuses more than 4300).
    from da3cog.io.inputs import natural_order

    assert sorted(["1" * 5000 + ".png", "2.png", "0" * 5000 + "3.png"], key=natural_order) == [
        "2.png",
        "0" * 5000 + "3.png",
        "1" * 5000 + ".png",
    ]
    assert found == ["1.png", "2.png", "9.png", "10.png", "11.png", "100.png", "x1²3.png"]


@pytest.mark.parametrize(
    ("model", "flags", "count", "message"),
    [
        ("da3mono-large", ["--export", "ply"], 2, "--export ply places the views in one world"),
        ("da3metric-large", ["--export", "glb"], 1, "--export glb needs the view's focal length"),
        ("da3-small", ["--gaussians"], 1, "small has no Gaussian head"),
    ],
    ids=["mono-ply", "metric-glb-no-exif", "small-gaussians"],
)
def test_what_the_model_cannot_do_is_refused_before_it_loads(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
    model: str,
    flags: list[str],
    count: int,
    message: str,
) -> None:
    """Known from the checkpoint's config before loading it (a preset, an official Hub id or
    a folder): a single-view model asked for a point format it cannot place, or Gaussians
    from a model without their head. Before, these were refused after the download and the
    whole prediction."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_name": model}))
    (folder / "model.safetensors").write_bytes(b"")
    args = predict_args(folder, tmp_path / "out", images[:count], *flags)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert no_model_load == []


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from da3cog import __version__

    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out.strip() == f"da3cog {__version__}"


def test_unknown_model_exits_2(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(predict_args(tmp_path / "not a model", tmp_path / "out", images)) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


def write_cameras(path: Path, extrinsics: np.ndarray, intrinsics: np.ndarray) -> Path:
    path.write_text(
        json.dumps({"extrinsics": extrinsics.tolist(), "intrinsics": intrinsics.tolist()})
    )
    return path


def two_posed_cameras() -> tuple[np.ndarray, np.ndarray]:
    extrinsics = np.tile(np.eye(4), (2, 1, 1))
    angle = np.deg2rad(20.0)
    extrinsics[1, :3, :3] = [
        [np.cos(angle), 0, -np.sin(angle)],
        [0, 1, 0],
        [np.sin(angle), 0, np.cos(angle)],
    ]
    extrinsics[1, :3, 3] = [-0.8, 0.1, 0.2]
    intrinsics = np.array([[[600.0, 0, 256], [0, 600, 250], [0, 0, 1]]] * 2)
    return extrinsics, intrinsics


def test_cameras_json_conditions_on_poses(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    extrinsics, intrinsics = two_posed_cameras()
    cameras = write_cameras(tmp_path / "cams.json", extrinsics, intrinsics)
    out = tmp_path / "out"
    assert main(predict_args(small_checkpoint, out, images, "--cameras", str(cameras))) == 0
    document = read_cameras(out)
    assert document["conventions"]["world_frame"] == "the user's input frame"
    for view, given_extrinsics, given_intrinsics in zip(
        document["views"], extrinsics, intrinsics, strict=True
    ):
        np.testing.assert_allclose(view["world_to_camera"], given_extrinsics, atol=1e-6)
        np.testing.assert_allclose(
            view["camera_to_world"], np.linalg.inv(given_extrinsics), atol=1e-6
        )
        np.testing.assert_allclose(view["K"], given_intrinsics, rtol=1e-5)
    depth = np.load(out / "depth_0000_astronaut.npy")
    assert depth.shape == (512, 512) and np.isfinite(depth).all()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"extrinsics": []}', "extrinsics must be N x 3 x 4 or N x 4 x 4, got shape (0,)"),
        ("not json", "not a readable JSON file"),
        ('{"K": []}', "give 'intrinsics' and/or 'extrinsics'"),
    ],
)
def test_bad_cameras_json_exits_2(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    cameras = tmp_path / "cams.json"
    cameras.write_text(content)
    out = tmp_path / "out"
    assert main(predict_args(small_checkpoint, out, images, "--cameras", str(cameras))) == 2
    err = capsys.readouterr().err
    assert message in err and str(cameras) in err
    assert not out.exists()


def test_cameras_json_with_the_wrong_count_exits_2(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extrinsics, intrinsics = two_posed_cameras()
    cameras = write_cameras(tmp_path / "cams.json", extrinsics[:1], intrinsics[:1])
    out = tmp_path / "out"
    assert main(predict_args(small_checkpoint, out, images, "--cameras", str(cameras))) == 2
    assert "1 extrinsics for 2 views (one per view)" in capsys.readouterr().err
    assert not out.exists()


def test_module_help_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "da3cog.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "predict" in result.stdout
    assert "usage: da3cog" in result.stdout


def test_predict_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--model",
        "--out",
        "--process-res",
        "--cameras",
        "--intrinsics",
        "--gaussians",
        "--seed",
        "--ray-pose",
        "--precision",
    ):
        assert option in out


def test_export_option_selects_the_files(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = predict_args(small_checkpoint, out, images, "--export", "ply", "glb", "cameras_json")
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    roles = {entry["role"] for entry in manifest["files"]}
    assert {"point_cloud", "glb_scene", "cameras_json"} <= roles
    assert not list(out.glob("depth_*.npy"))


def test_precision_flag_sets_the_backbone_dtype_and_the_manifest_says_so(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    runs = {}
    for precision in ("auto", "bf16"):
        out = tmp_path / precision
        args = predict_args(small_checkpoint, out, images, "--precision", precision)
        assert main(args) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        runs[manifest["model"]["precision"]] = np.load(out / "depth_0000_astronaut.npy")
    assert sorted(runs) == ["bf16", "fp32"]
    assert not np.array_equal(runs["bf16"], runs["fp32"])


def test_unknown_export_format_is_rejected(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(predict_args(small_checkpoint, tmp_path / "out", images, "--export", "obj"))
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Gaussians and intrinsics alone, on the ViT-S stand-ins of the giant (with its Gaussian head)
# and of the metric model (tests/small_zoo.py), registered as presets for the run
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def zoo(
    small_zoo_checkpoint: Callable[[str], tuple[Path, object]], monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], Path]:
    """``zoo("small-gs")``: the stand-in's checkpoint folder, its preset registered (its
    config.json names it) for this test only."""
    from small_zoo import SMALL_ZOO

    from da3cog.model.presets import PRESETS

    def folder(name: str) -> Path:
        monkeypatch.setitem(PRESETS, name, SMALL_ZOO[name])
        return small_zoo_checkpoint(name)[0]

    return folder


def test_gaussians_flag_adds_the_3dgs_ply_to_the_defaults(
    zoo: Callable[[str], Path], images: list[Path], tmp_path: Path
) -> None:
    plyfile = pytest.importorskip("plyfile")
    out = tmp_path / "out"
    assert main(predict_args(zoo("small-gs"), out, images, "--gaussians")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["formats"] == ["depth_npy", "depth_vis", "cameras_json", "gaussians_ply"]
    (row,) = [f for f in manifest["files"] if f["role"] == "gaussian_splats"]
    assert row["path"] == "gaussians.ply"
    vertex = plyfile.PlyData.read(str(out / "gaussians.ply"))["vertex"]
    assert vertex.count == row["gaussians"] > 0
    assert row["total"] == 2 * 112 * 112  # one per pixel of each view at the processing size
    assert (out / "depth_0000_astronaut.npy").is_file()


def test_gaussians_flag_with_explicit_exports(
    zoo: Callable[[str], Path], images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = predict_args(zoo("small-gs"), out, images[:1], "--gaussians", "--export", "npz")
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "prediction.npz"]
    out = tmp_path / "all"
    args = predict_args(zoo("small-gs"), out, images[:1], "--gaussians", "--export", "all")
    assert main(args) == 0
    assert (out / "gaussians.ply").is_file()


def test_gaussians_flag_on_a_model_without_a_gaussian_head_exits_2(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert main(predict_args(small_checkpoint, out, images, "--gaussians")) == 2
    err = capsys.readouterr().err
    assert "small has no Gaussian head; models with one: giant, nested" in err
    assert not out.exists()


@pytest.mark.parametrize("export", ["gaussians_ply", "gaussians_video"])
def test_gaussian_exports_without_the_flag_exit_2_before_loading(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], export: str
) -> None:
    # The model does not exist: the export check comes first.
    args = predict_args(tmp_path / "no model", tmp_path / "out", images, "--export", export)
    assert main(args) == 2
    assert f"--export {export} needs --gaussians" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def write_intrinsics(path: Path, intrinsics: np.ndarray) -> Path:
    path.write_text(json.dumps({"intrinsics": intrinsics.tolist()}))
    return path


def test_intrinsics_make_the_metric_model_metric(
    zoo: Callable[[str], Path], images: list[Path], tmp_path: Path
) -> None:
    model = zoo("metric-small")
    _, intrinsics = two_posed_cameras()
    given = write_intrinsics(tmp_path / "k.json", intrinsics)
    out = tmp_path / "metric"
    assert main(predict_args(model, out, images, "--intrinsics", str(given))) == 0
    document = read_cameras(out)
    assert document["is_metric"] is True
    assert document["focal_source"] == document["intrinsics_source"] == "user intrinsics"
    for view, matrix in zip(document["views"], intrinsics, strict=True):
        np.testing.assert_allclose(view["K"], matrix, rtol=1e-5)
        assert view["world_to_camera"] is None
    metric_depth = np.load(out / "depth_0000_astronaut.npy")
    # Without a focal length (PNGs carry no EXIF) the same depth stays relative.
    relative = tmp_path / "relative"
    assert main(predict_args(model, relative, images)) == 0
    assert read_cameras(relative)["is_metric"] is False
    relative_depth = np.load(relative / "depth_0000_astronaut.npy")
    # metric depth = relative depth x focal / 300, focal in pixels of the 112 px processed image
    focal = 600.0 * 112 / 512
    np.testing.assert_allclose(metric_depth, relative_depth * focal / 300, rtol=1e-4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"K": []}', "give 'intrinsics' and/or 'extrinsics'"),
        ("[1, 2]", "expected a JSON object"),
        (
            json.dumps({"intrinsics": [np.eye(3).tolist()] * 3}),
            "3 intrinsics for 2 views (give one 3 x 3 matrix for all views, or one per view)",
        ),
        (
            json.dumps({"intrinsics": np.eye(3).tolist(), "extrinsics": [np.eye(4).tolist()] * 2}),
            "has 'extrinsics' too: pass it with --cameras",
        ),
    ],
)
def test_bad_intrinsics_json_exits_2(
    zoo: Callable[[str], Path],
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    given = tmp_path / "k.json"
    given.write_text(content)
    out = tmp_path / "out"
    assert main(predict_args(zoo("metric-small"), out, images, "--intrinsics", str(given))) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_own_cameras_json_goes_back_in_only_for_the_images_it_describes(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """cameras.json at the input resolution is accepted as --cameras; one written at the
    processing resolution (K in 112 px pixels) was read as input pixels without a word."""
    extrinsics, intrinsics = two_posed_cameras()
    given = write_cameras(tmp_path / "given.json", extrinsics, intrinsics)
    runs = {}
    for resolution in ("input", "processing"):
        out = tmp_path / resolution
        run = [
            "--cameras",
            str(given),
            "--output-resolution",
            resolution,
            "--export",
            "cameras_json",
        ]
        assert main(predict_args(small_checkpoint, out, images, *run)) == 0
        runs[resolution] = out / "cameras.json"
    again = tmp_path / "again"
    assert main(predict_args(small_checkpoint, again, images, "--cameras", str(runs["input"]))) == 0
    np.testing.assert_allclose(read_cameras(again)["views"][1]["K"], intrinsics[1], rtol=1e-5)
    capsys.readouterr()
    refused = tmp_path / "refused"
    run = ["--cameras", str(runs["processing"])]
    assert main(predict_args(small_checkpoint, refused, images, *run)) == 2
    err = capsys.readouterr().err
    assert (
        f"{runs['processing']}: view 0's K describes a 112x112 image, and input 0 is 512x512" in err
    )
    assert not refused.exists()


def test_implausible_intrinsics_are_refused_naming_the_file_before_loading(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extrinsics, intrinsics = two_posed_cameras()
    intrinsics[1, 0, 0] = 1e6
    given = write_cameras(tmp_path / "given.json", extrinsics, intrinsics)
    out = tmp_path / "out"
    # No checkpoint there: the file is refused before any model is looked for.
    missing = tmp_path / "no-model"
    assert main(predict_args(missing, out, images, "--cameras", str(given))) == 2
    assert f"{given}: intrinsics[1]: fx = 1e+06" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--intrinsics", "--cameras"])
def test_intrinsics_alone_are_refused_by_any_view_models(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
) -> None:
    _, intrinsics = two_posed_cameras()
    given = write_intrinsics(tmp_path / "k.json", intrinsics)
    out = tmp_path / "out"
    assert main(predict_args(small_checkpoint, out, images, flag, str(given))) == 2
    assert "intrinsics alone are not used by any-view models" in capsys.readouterr().err
    assert not out.exists()


def test_cameras_and_intrinsics_exclude_each_other(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, intrinsics = two_posed_cameras()
    given = write_intrinsics(tmp_path / "k.json", intrinsics)
    out = tmp_path / "out"
    both = ["--cameras", str(given), "--intrinsics", str(given)]
    with pytest.raises(SystemExit) as exited:
        main(predict_args(small_checkpoint, out, images, *both))
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not out.exists()


def test_a_returned_cameras_json_conditions_the_next_run(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """The cameras.json da3cog writes is a valid --cameras file: the next run keeps its poses."""
    first = tmp_path / "first"
    assert main(predict_args(small_checkpoint, first, images)) == 0
    estimated = read_cameras(first)
    second = tmp_path / "second"
    given = ["--cameras", str(first / "cameras.json")]
    assert main(predict_args(small_checkpoint, second, images, *given)) == 0
    document = read_cameras(second)
    assert document["conventions"]["world_frame"] == "the user's input frame"
    for view, before in zip(document["views"], estimated["views"], strict=True):
        np.testing.assert_allclose(view["world_to_camera"], before["world_to_camera"], atol=1e-5)
        np.testing.assert_allclose(view["K"], before["K"], rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--video-frames", "5"], "--video-frames applies to --export gaussians_video only"),
        (
            ["--gaussians", "--export", "gaussians_video", "--video-frames", "0"],
            "--video-frames must be at least 1",
        ),
    ],
)
def test_video_frames_is_checked_before_loading(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    # The model does not exist: the option check comes first.
    args = predict_args(tmp_path / "no model", tmp_path / "out", images, *extra)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gaussian_video_with_video_frames(
    zoo: Callable[[str], Path], images: list[Path], tmp_path: Path
) -> None:
    av = pytest.importorskip("av", reason="PyAV is installed by scripts/test.sh (.[cog])")
    out = tmp_path / "out"
    extra = ["--gaussians", "--export", "gaussians_video", "--video-frames", "3"]
    assert main(predict_args(zoo("small-gs"), out, images, *extra)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (row,) = [f for f in manifest["files"] if f["role"] == "gaussian_video"]
    with av.open(str(out / row["path"])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    # The path keeps a few frames per pair of cameras however few are asked for; far fewer
    # than the default 120 shows the option took effect.
    assert frames == row["frames"]
    assert 3 <= frames <= 6


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("small@1.1", "da3-small has no Hub version '1.1'; its versions: 1.0"),
        ("giant@0.9", "its versions: 1.1 (depth-anything/DA3-GIANT-1.1), 1.0"),
    ],
)
def test_a_release_that_does_not_exist_exits_2_naming_the_releases(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    message: str,
) -> None:
    """``--model giant@1.0`` picks a release; an unknown one is refused before any download."""

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be downloaded for an unknown release")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_download)
    assert main(predict_args(Path(model), tmp_path / "out", images)) == 2
    assert message in capsys.readouterr().err


def test_chunk_flags_run_a_long_request_in_chunks(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    three = [*images, images[0]]
    assert main(predict_args(small_checkpoint, out, three, "--chunk-size", "2")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [view["chunk"] for view in manifest["views"]] == [0, 0, 1]
    assert any("reconstructed in 2 chunks of 2 views sharing 1" in n for n in manifest["notes"])


def test_a_bad_chunk_plan_exits_2_before_loading(
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:
    args = predict_args(tmp_path / "w", tmp_path / "out", images, "--chunk-size", "4")
    assert main([*args, "--chunk-overlap", "4"]) == 2
    assert "chunk overlap must be between 1 and size - 1 = 3" in capsys.readouterr().err
    args = predict_args(tmp_path / "w", tmp_path / "out", images, "--chunk-size", "none")
    assert main([*args, "--chunk-overlap", "2"]) == 2
    assert "error: --chunk-overlap needs --chunk-size" in capsys.readouterr().err  # the flags
    assert no_model_load == []


def test_folders_and_videos_are_expanded_into_views(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """A folder gives its images in name order (other files skipped); a video its frames
    sampled by --stride (or --fps), named after the video."""
    from da3cog.export.video import encode_mp4

    folder = tmp_path / "images"
    (folder / "notes.txt").write_text("not an image")
    generator = np.random.default_rng(0)
    base = generator.integers(0, 255, (72, 96, 3), dtype=np.uint8)
    clip = tmp_path / "clip.mp4"
    encode_mp4((np.roll(base, 4 * i, axis=1) for i in range(12)), clip, fps=6)
    out = tmp_path / "out"
    args = predict_args(small_checkpoint, out, [folder, clip], "--stride", "5")
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = [view["name"] for view in manifest["views"]]
    assert names == ["astronaut", "camera", "clip_frame_0000", "clip_frame_0001", "clip_frame_0002"]
    assert main([*predict_args(small_checkpoint, tmp_path / "o2", [clip]), "--fps", "1"]) == 0
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert len(manifest["views"]) == 2  # 2 s of video at 1 frame a second


def test_running_out_of_memory_exits_3_with_advice(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An allocation failure the memory model did not foresee (a GPU's, or the host
    allocator's) ends the command with status 3 and what to change, writing nothing; any
    other failure still surfaces as itself."""
    from da3cog.pipeline import DepthAnything3

    failures = iter(
        [
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"),
            RuntimeError("a bug, not memory"),
        ]
    )

    def fail(*args: object, **kwargs: object) -> None:
        raise next(failures)

    monkeypatch.setattr(DepthAnything3, "predict", fail)
    for index, ran_out in enumerate(["GPU memory", "memory"]):
        out = tmp_path / f"out{index}"
        assert main(predict_args(small_checkpoint, out, images)) == 3
        message = capsys.readouterr().err
        assert f"da3cog: error: ran out of {ran_out} (" in message
        assert "--chunk-size" in message and "--process-res" in message
        assert not out.exists() or not any(out.iterdir())
    with pytest.raises(RuntimeError, match="a bug, not memory"):
        main(predict_args(small_checkpoint, tmp_path / "out2", images))


def test_an_image_whose_name_is_not_utf8_exports_every_format(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """A Latin-1 file name reaches Python with lone surrogates: the 16-bit depth PNG's text
    chunk refused it after the model ran (exit 2), and cameras.json wrote it as escapes
    that strict JSON readers refuse. The view is named with U+FFFD for the odd byte."""
    import os
    import shutil

    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    shutil.copy(images[0], odd)
    out = tmp_path / "out"
    args = predict_args(small_checkpoint, out, [odd], "--export", "depth_png16", "cameras_json")
    assert main(args) == 0
    (png,) = out.glob("depth_*.png")
    assert Image.open(png).text["view_name"] == "caf\ufffd"
    cameras = (out / "cameras.json").read_text()
    assert "\\ud" not in cameras and json.loads(cameras)["views"][0]["name"] == "caf\ufffd"


def test_the_working_directory_is_no_output_folder(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--out .`` in an empty folder: the results were staged inside it (its parent is
    itself) and then refused as "not empty", after the model ran."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(predict_args(small_checkpoint, Path("."), images)) == 2
    message = capsys.readouterr().err
    assert "--out . is the working directory" in message and "running" not in message
    assert not any(here.iterdir())


def test_an_empty_output_folder_given_through_a_link_is_filled(
    small_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """``--out link`` to an empty folder: the results were written beside the link and
    renamed onto it, which failed after the model ran ("Not a directory", exit 3)."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(predict_args(small_checkpoint, link, images)) == 0
    assert link.is_symlink() and (target / "manifest.json").is_file()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_made_is_refused_before_the_model_runs(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Write permission does not tell for root (/proc reads as writable to root, yet no
    folder can be made there): the folder is tried, before the model runs; through a link,
    where the link points."""
    dangling = tmp_path / "dangling"
    dangling.symlink_to("/proc/no-such-folder/out")
    for out in (Path("/proc/da3cog-out"), dangling):
        assert main(predict_args(small_checkpoint, out, images)) == 2
        message = capsys.readouterr().err
        assert f"--out {out}: /proc is not writable" in message
        assert "running" not in message


def test_an_output_folder_removed_while_written_exits_3(
    small_checkpoint: Path,
    images: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The output's parent folder deleted during the export (the machine's doing) exited 2,
    the status of a request's own error, such as an input that does not exist."""
    import shutil

    from da3cog.export import manifest

    write_formats = manifest._write_formats

    def write_then_remove_parent(prediction: object, staging: Path, *args: object) -> object:
        entries = write_formats(prediction, staging, *args)
        shutil.rmtree(staging.parent)
        return entries

    monkeypatch.setattr(manifest, "_write_formats", write_then_remove_parent)
    out = tmp_path / "parent" / "out"
    assert main(predict_args(small_checkpoint, out, images)) == 3
    message = capsys.readouterr().err
    assert f"da3cog: error: {out}: could not be written" in message
    assert not out.exists()
    monkeypatch.undo()
    missing = tmp_path / "missing.png"
    assert main(predict_args(small_checkpoint, tmp_path / "out2", [missing])) == 2


@pytest.mark.parametrize("command", ["predict", "batch"])
def test_a_device_torch_does_not_know_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """``--device gpu`` ended in a RuntimeError traceback (exit 1)."""
    args = [command, str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "gpu"]
    assert main(args) == 2
    assert "--device gpu: not a torch device" in capsys.readouterr().err
