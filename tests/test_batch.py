"""``da3cog batch``, in process: every scene lands once with the files ``da3cog predict`` writes
for it, a broken scene is an error row while the rest land, a rerun resumes (only missing or
failed scenes run), and what a killed run left half-written is cleared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from da3cog.batch import read_manifest, run_batch
from da3cog.cli import main
from da3cog.pipeline import DepthAnything3, InferenceOptions

OPTIONS = InferenceOptions(process_res=112)


@pytest.fixture
def scenes(tmp_path: Path, photo) -> Path:
    """Four scenes of two small views each (a panning camera over one photo), one of them
    with a corrupt second image; a JSON Lines manifest beside them."""
    picture = photo("coffee")
    lines = []
    for number in range(4):
        folder = tmp_path / f"scene{number}"
        folder.mkdir()
        for view in range(2):
            x = 60 * number + 40 * view
            Image.fromarray(np.ascontiguousarray(picture[100:196, x : x + 128])).save(
                folder / f"v{view}.png"
            )
        lines.append(
            {"scene": f"s{number}", "images": [f"scene{number}/v0.png", f"scene{number}/v1.png"]}
        )
    (tmp_path / "scene2" / "v1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = tmp_path / "scenes.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def test_every_scene_lands_once_and_a_broken_one_is_an_error_row(
    scenes: Path, tmp_path: Path, small_model: DepthAnything3, small_checkpoint: Path
) -> None:
    out = tmp_path / "out"
    results = run_batch(read_manifest(scenes), out, small_model, options=OPTIONS)
    assert [(r.scene, r.status) for r in results] == [
        ("s0", "done"),
        ("s1", "done"),
        ("s2", "failed"),
        ("s3", "done"),
    ]
    assert "v1.png" in results[2].error
    index = _index(out)
    assert [row["scene"] for row in index] == ["s0", "s1", "s2", "s3"]
    assert sorted(p.name for p in out.iterdir()) == ["index.jsonl", "s0", "s1", "s3"]
    # Same files as `da3cog predict` on the scene.
    single = tmp_path / "single"
    argv = [
        "predict",
        str(scenes.parent / "scene1" / "v0.png"),
        str(scenes.parent / "scene1" / "v1.png"),
    ]
    argv += [
        "--model",
        str(small_checkpoint),
        "--out",
        str(single),
        "--process-res",
        "112",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    for name in ("depth_0000_v0.npy", "depth_0001_v1.npy"):
        np.testing.assert_array_equal(np.load(out / "s1" / name), np.load(single / name))
    assert set(index[1]["files"]) == {p.name for p in single.iterdir()}


def test_a_rerun_resumes_and_clears_what_a_killed_run_left(
    scenes: Path, tmp_path: Path, small_model: DepthAnything3, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    all_scenes = read_manifest(scenes)
    run_batch(all_scenes[:2], out, small_model, options=OPTIONS)
    # A killed run: a half-written scene folder (no marker) and a partial work folder.
    (out / "s3").mkdir()
    (out / "s3" / "depth_0000_v0.npy").write_bytes(b"half")
    (out / ".partial" / "s2").mkdir(parents=True)
    (tmp_path / "scene2" / "v1.png").write_bytes((tmp_path / "scene2" / "v0.png").read_bytes())
    predicted: list[int] = []
    original = DepthAnything3.predict

    def counting(self, images, **kwargs):
        predicted.append(len(images))
        return original(self, images, **kwargs)

    monkeypatch.setattr(DepthAnything3, "predict", counting)
    results = run_batch(all_scenes, out, small_model, options=OPTIONS)
    assert [r.status for r in results] == ["done"] * 4
    assert predicted == [2, 2], "only the two missing scenes ran"
    assert not (out / ".partial").exists()
    assert np.load(out / "s3" / "depth_0000_v0.npy").shape == (96, 128)
    assert [row["scene"] for row in _index(out)] == ["s0", "s1", "s2", "s3"]


def test_the_batch_command(scenes: Path, tmp_path: Path, small_checkpoint: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["batch", str(scenes), "--out", str(out), "--model", str(small_checkpoint)]
    argv += ["--process-res", "112", "--device", "cpu"]
    assert main(argv) == 1  # one scene failed
    printed = capsys.readouterr()
    assert "3 scene(s) done, 1 failed" in printed.out and "s2:" in printed.out
    assert "scene 4/4 s3: done" in printed.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"scene": "a/b", "images": ["x.png"]}', "'scene' must be an id"),
        ('{"scene": "a", "images": []}', "needs 'images'"),
        ('{"scene": "a", "images": ["x.png"]}\n{"scene": "a", "video": "v.mp4"}', "listed twice"),
        ("not json", "line 1: not JSON"),
    ],
)
def test_bad_manifests_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        read_manifest(manifest)


def test_csv_manifests(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("scene,images,video,cameras\nk,a.png;b.png,,\nw,,walk.mp4,c.json\n")
    first, second = read_manifest(manifest)
    assert first.inputs == (tmp_path / "a.png", tmp_path / "b.png") and first.cameras is None
    assert second.inputs == (tmp_path / "walk.mp4",) and second.cameras == tmp_path / "c.json"
