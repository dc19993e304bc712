"""``da3cog batch``, in process and on a local Ray cluster: every scene lands once with the
files ``da3cog predict`` writes for it, a broken scene is an error row while the rest land, an
actor killed mid-run is replaced and its scene retried, a killed driver's rerun completes only
the missing scenes, and what a killed run left half-written is cleared. Manifests in JSON
Lines, CSV and Parquet, per-scene options, and inputs and outputs through fsspec URIs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from da3cog.batch import BatchSettings, RayOptions, read_manifest, run_batch
from da3cog.batch.storage import COMPLETE_NAME, PARTIAL_FOLDER, SCENE_MARKER
from da3cog.cli import main
from da3cog.pipeline import DepthAnything3, InferenceOptions

OPTIONS = InferenceOptions(process_res=112)
SCENES = 4
BROKEN = "s2"


def _settings(checkpoint: Path, **changes) -> BatchSettings:
    return BatchSettings(model=str(checkpoint), device="cpu", options=OPTIONS, **changes)


def _write_scenes(folder: Path, picture: np.ndarray, count: int = SCENES) -> list[dict]:
    """``count`` scenes of two small views each (a panning camera over one photo), the second
    image of scene 2 (when there is one) corrupt; returns their manifest rows."""
    rows = []
    for number in range(count):
        scene = folder / f"scene{number}"
        scene.mkdir(parents=True)
        for view in range(2):
            x = 60 * number + 40 * view
            Image.fromarray(np.ascontiguousarray(picture[100:196, x : x + 128])).save(
                scene / f"v{view}.png"
            )
        rows.append(
            {"scene": f"s{number}", "images": [f"scene{number}/v0.png", f"scene{number}/v1.png"]}
        )
    if count > 2:
        (folder / "scene2" / "v1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return rows


@pytest.fixture
def scenes(tmp_path: Path, photo) -> Path:
    """A JSON Lines manifest of :func:`_write_scenes` beside its scenes."""
    rows = _write_scenes(tmp_path, photo("coffee"))
    manifest = tmp_path / "scenes.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


@pytest.fixture(scope="module")
def predicted_alone(tmp_path_factory, photo, small_checkpoint: Path) -> Path:
    """What ``da3cog predict`` writes for each good scene of :func:`_write_scenes`:
    ``<folder>/s0/``, ``s1/``, ``s3/``."""
    folder = tmp_path_factory.mktemp("alone")
    _write_scenes(folder, photo("coffee"))
    for number in (0, 1, 3):
        argv = ["predict", *(str(folder / f"scene{number}" / f"v{v}.png") for v in range(2))]
        argv += ["--model", str(small_checkpoint), "--out", str(folder / f"s{number}")]
        argv += ["--process-res", "112", "--device", "cpu"]
        assert main(argv) == 0
    return folder


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def _check_landed(out: Path, alone: Path, exact: bool = True) -> list[dict]:
    """Every scene once in the index (manifest order), the broken one as an error row naming
    its file, each good scene with the files ``da3cog predict`` writes, nothing else.

    ``exact``: byte-identical files (same process, same torch thread count). A Ray actor runs
    torch with as many threads as it reserves CPUs, so its float sums round differently: then
    arrays agree within 1e-5 of their range, depth images within one step of the colour map
    (<= 4 levels) on < 1% of the pixels, JSON files (manifests, cameras) except the byte
    sizes of those images and with numbers within 1e-5."""
    index = _index(out)
    assert [row["scene"] for row in index] == [f"s{n}" for n in range(SCENES)]
    assert [row["status"] for row in index] == ["done", "done", "failed", "done"]
    assert "v1.png" in index[2]["error"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.jsonl", "index.parquet", "s0", "s1", "s3"]
    )
    for row in index:
        if row["status"] != "done":
            continue
        single = alone / row["scene"]
        assert set(row["files"]) == {p.name for p in single.iterdir()}
        for name in row["files"]:
            ours, theirs = out / row["scene"] / name, single / name
            if exact or ours.read_bytes() == theirs.read_bytes():
                assert ours.read_bytes() == theirs.read_bytes(), name
            elif name.endswith(".npy"):
                reference = np.load(theirs)
                np.testing.assert_allclose(
                    np.load(ours), reference, rtol=0, atol=1e-5 * np.ptp(reference)
                )
            elif name.endswith(".png"):
                difference = np.asarray(Image.open(ours), float) - np.asarray(Image.open(theirs))
                changed = np.abs(difference).max(axis=-1)
                assert changed.max() <= 4 and (changed > 0).mean() < 0.01, name
            else:
                found, expected = (
                    _without_sizes(json.loads(path.read_text())) for path in (ours, theirs)
                )
                if exact:
                    assert found == expected, name
                else:
                    _assert_close_documents(found, expected, name)
        assert (out / row["scene"] / COMPLETE_NAME).is_file()
        assert row["views"] == 2 and set(row["timings"]) == {"inputs", "predict", "export"}
        assert row["cameras"]["cameras_estimated"] and row["cameras"]["path_length"] > 0
    return index


def _assert_close_documents(found, expected, where: str) -> None:
    """Equal JSON documents, numbers within 1e-5 (relative and absolute): floats the
    actor's thread count rounded differently (cameras, scales)."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys(), where
        for key in expected:
            _assert_close_documents(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), where
        for index, (a, b) in enumerate(zip(found, expected, strict=True)):
            _assert_close_documents(a, b, f"{where}[{index}]")
    elif isinstance(expected, float) and not isinstance(found, bool):
        assert isinstance(found, (int, float)), where
        assert math.isclose(found, expected, rel_tol=1e-5, abs_tol=1e-5), (where, found, expected)
    else:
        assert found == expected, where


def _without_sizes(document):
    if isinstance(document, dict):
        return {k: _without_sizes(v) for k, v in document.items() if k != "bytes"}
    if isinstance(document, list):
        return [_without_sizes(item) for item in document]
    return document


def test_every_scene_lands_once_and_a_broken_one_is_an_error_row(
    scenes: Path,
    tmp_path: Path,
    small_model: DepthAnything3,
    small_checkpoint: Path,
    predicted_alone: Path,
) -> None:
    out = tmp_path / "out"
    results = run_batch(read_manifest(scenes), out, _settings(small_checkpoint), model=small_model)
    assert [(r.scene, r.status) for r in results] == [
        ("s0", "done"),
        ("s1", "done"),
        (BROKEN, "failed"),
        ("s3", "done"),
    ]
    _check_landed(out, predicted_alone)
    # The Parquet index holds the same rows.
    import pyarrow.parquet as pq

    table = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["scene"] for row in table] == [r.scene for r in results]
    assert [row["seconds_predict"] is not None for row in table] == [True, True, False, True]


def test_a_rerun_resumes_and_clears_what_a_killed_run_left(
    scenes: Path,
    tmp_path: Path,
    small_model: DepthAnything3,
    small_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    settings = _settings(small_checkpoint)
    all_scenes = read_manifest(scenes)
    run_batch(all_scenes[:2], out, settings, model=small_model)
    # A killed run: a half-written scene folder (an upload to an object store stopped after
    # the scene marker, which goes first, and before the completion marker) and its staging
    # folder on this machine; and a run still going, whose staging stays.
    (out / "s3").mkdir()
    (out / "s3" / SCENE_MARKER).write_bytes(b"")
    (out / "s3" / "depth_0000_v0.npy").write_bytes(b"half")
    finished = subprocess.run([sys.executable, "-c", ""], check=True)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    (out / PARTIAL_FOLDER / f"{host}-{dead.pid}" / "s2.0123").mkdir(parents=True)
    running = out / PARTIAL_FOLDER / f"{host}-{os.getppid()}" / "s1.4567"
    running.mkdir(parents=True)
    (tmp_path / "scene2" / "v1.png").write_bytes((tmp_path / "scene2" / "v0.png").read_bytes())
    predicted: list[int] = []
    original = DepthAnything3.predict

    def counting(self, images, **kwargs):
        predicted.append(len(images))
        return original(self, images, **kwargs)

    monkeypatch.setattr(DepthAnything3, "predict", counting)
    results = run_batch(all_scenes, out, settings, model=small_model)
    assert [r.status for r in results] == ["done"] * 4
    assert predicted == [2, 2], "only the two missing scenes ran"
    assert [p.relative_to(out / PARTIAL_FOLDER) for p in (out / PARTIAL_FOLDER).rglob("*")] == [
        running.parent.relative_to(out / PARTIAL_FOLDER),
        running.relative_to(out / PARTIAL_FOLDER),
    ], "only the running one's staging is left"
    assert finished.returncode == 0
    assert np.load(out / "s3" / "depth_0000_v0.npy").shape == (96, 128)
    assert [row["scene"] for row in _index(out)] == ["s0", "s1", "s2", "s3"]


def test_a_scene_that_kills_its_worker_is_given_up_after_three_attempts(
    scenes: Path, tmp_path: Path, small_model: DepthAnything3, small_checkpoint: Path
) -> None:
    """A scene whose worker is killed (out of memory, a decoder crash) leaves no row: Ray
    retried it without end and an in-process driver died on it at every rerun. Attempts are
    recorded before a scene runs; after three that never ended, its row says failed and the
    batch goes on. One dead attempt is tried again, and a landed scene forgets its own."""
    from da3cog.batch.storage import ATTEMPTS_FOLDER, OutputRoot

    out = tmp_path / "out"
    root = OutputRoot(out)
    root.prepare()
    for scene, dead in (("s0", 3), ("s1", 1)):
        for _ in range(dead):
            root.begin_attempt(scene)  # as a killed worker leaves it: never ended
    results = run_batch(read_manifest(scenes), out, _settings(small_checkpoint), model=small_model)
    rows = {r.scene: r for r in results}
    assert rows["s0"].status == "failed" and "3 attempt(s) ended with their worker killed" in (
        rows["s0"].error or ""
    )
    assert rows["s1"].status == "done" and rows["s3"].status == "done"
    assert not (out / PARTIAL_FOLDER / ATTEMPTS_FOLDER).exists()
    # Given up in that run only: the next run tries it again.
    again = run_batch(read_manifest(scenes), out, _settings(small_checkpoint), model=small_model)
    assert {r.scene: r.status for r in again}["s0"] == "done"


def test_relative_paths_are_made_absolute_for_workers_elsewhere(
    scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray actor on another machine's process resolves a relative path against its own
    working directory: scenes landed elsewhere and were reported done. The driver sends
    absolute paths."""
    from da3cog.batch.storage import OutputRoot

    monkeypatch.chdir(tmp_path)
    assert OutputRoot("out").location == str(tmp_path / "out")
    assert OutputRoot("memory://bucket/out").location == "memory://bucket/out"
    (scene, *_) = read_manifest(scenes.name)
    assert all(Path(item).is_absolute() for item in scene.inputs), scene.inputs
    from da3cog.weights import absolute_model

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert absolute_model("model") == str(tmp_path / "model")
    assert absolute_model("small") == "small"
    # A link to a folder not made yet is made where it points (it failed: "File exists").
    (tmp_path / "link").symlink_to(tmp_path / "target")
    linked = OutputRoot("link")
    linked.prepare()
    assert linked.location == str(tmp_path / "target") and (tmp_path / "target").is_dir()


def test_scenes_made_in_code_are_checked_like_a_manifests(tmp_path: Path) -> None:
    """``Scene`` is public: ids that escape the output folder, or name one folder twice, were
    run and written outside ``--out`` or over each other, all reported done."""
    from da3cog.batch import Scene

    settings = _settings(tmp_path / "no-model")
    for ids, message in (
        (["../escaped"], "must be an id"),
        (["/tmp/abs"], "must be an id"),
        (["dup", "dup"], "'dup' is listed twice"),
        (["Kitchen", "kitchen"], "listed twice \\('Kitchen' before\\)"),
        (["index.jsonl"], "names the batch's index"),
    ):
        scenes = [Scene(scene_id, ("x.png",)) for scene_id in ids]
        with pytest.raises(ValueError, match=message):
            run_batch(scenes, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_a_complete_marker_beside_a_cut_result_runs_the_scene_again(
    scenes: Path, tmp_path: Path, small_model: DepthAnything3, small_checkpoint: Path
) -> None:
    """A scene folder marked complete whose result.json is cut short stopped the whole batch
    with a bare JSON error; the scene now runs again and its folder is replaced."""
    out = tmp_path / "out"
    (first, *_) = read_manifest(scenes)
    run_batch([first], out, _settings(small_checkpoint), model=small_model)
    result = out / first.id / "result.json"
    result.write_text(result.read_text()[:20])
    (again,) = run_batch([first], out, _settings(small_checkpoint), model=small_model)
    assert again.status == "done" and json.loads(result.read_text())["status"] == "done"


def test_a_scenes_seed_reaches_its_point_cloud(
    scenes: Path, tmp_path: Path, small_model: DepthAnything3, small_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point cloud's subsample is seeded as the predict command seeds it: a scene's
    own seed never reached it (the batch's export options had only the batch's)."""
    from da3cog.export import manifest

    seeds = []
    export_all = manifest.export_all

    def spy(prediction, folder, formats, **options):
        seeds.append(options.get("seed"))
        return export_all(prediction, folder, formats, **options)

    monkeypatch.setattr(manifest, "export_all", spy)
    (first, *_) = read_manifest(scenes)
    seeded = dataclasses.replace(first, options={"seed": 7, "export": ["ply"]})
    run_batch([seeded], tmp_path / "out", _settings(small_checkpoint), model=small_model)
    assert seeds == [7]


def test_a_batch_never_replaces_a_folder_it_did_not_write(
    scenes: Path, tmp_path: Path, small_model: DepthAnything3, small_checkpoint: Path, capsys
) -> None:
    """A folder of the user's own under a scene's name (say their input folder, with --out
    beside it) is refused before any scene runs, and left as it is: before, the scene's
    outputs replaced it, files and all, and the run said nothing."""
    out = tmp_path / "out"
    (out / "s1").mkdir(parents=True)
    (out / "s1" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="s1: already there and not written by a da3cog batch"):
        run_batch(read_manifest(scenes), out, _settings(small_checkpoint), model=small_model)
    assert sorted(p.name for p in out.iterdir()) == ["s1"]
    assert [p.name for p in (out / "s1").iterdir()] == ["notes.txt"]
    argv = ["batch", str(scenes), "--out", str(out), "--model", str(small_checkpoint)]
    assert main(argv) == 2
    assert "not written by a da3cog batch" in capsys.readouterr().err
    assert (out / "s1" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    assert main([*argv[:3], str(tmp_path / "file"), *argv[4:]]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_errors_name_remote_inputs_as_the_manifest_gave_them(
    tmp_path: Path, small_model: DepthAnything3, small_checkpoint: Path
) -> None:
    """A broken image fetched from an object store is named by its URI in the index, not by
    the temporary copy the worker read (gone by the time the user looks)."""
    memory = fsspec.filesystem("memory")
    base = f"memory://broken-{tmp_path.name}"
    memory.pipe_file(f"{base}/in/broken.png", b"\x89PNG\r\n\x1a\n broken")
    # A JPEG whose header reads but whose pixels stop short: it fails in the prediction.
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(np.full((96, 128, 3), 128, np.uint8)).save(jpeg, quality=90)
    memory.pipe_file(f"{base}/in/cut.jpg", jpeg.read_bytes()[:400])
    rows = [{"scene": "b", "images": ["broken.png"]}, {"scene": "c", "images": ["cut.jpg"]}]
    memory.pipe_file(f"{base}/in/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    results = run_batch(
        read_manifest(f"{base}/in/m.jsonl"),
        tmp_path / "out",
        _settings(small_checkpoint),
        model=small_model,
    )
    for result, name in zip(results, ["broken.png", "cut.jpg"], strict=True):
        assert result.status == "failed"
        assert f"{base}/in/{name}" in result.error, result.error
        assert ".partial" not in result.error and "da3cog-" not in result.error, result.error


def test_the_batch_command(scenes: Path, tmp_path: Path, small_checkpoint: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["batch", str(scenes), "--out", str(out), "--model", str(small_checkpoint)]
    argv += ["--process-res", "112", "--device", "cpu"]
    assert main(argv) == 1  # one scene failed
    printed = capsys.readouterr()
    assert "3 scene(s) done, 1 failed" in printed.out
    table = printed.out.splitlines()
    assert table[0].split() == ["scene", "status", "views", "seconds", "views/s", "error"]
    assert table[3].startswith("s2") and "failed" in table[3] and "v1.png" in table[3]
    assert "scene 4/4 s3: done" in printed.err and "views/s" in printed.err
    # A rerun skips what is done and says so.
    assert main(argv) == 1
    assert "scene 1/4 s0: done earlier, skipped" in capsys.readouterr().err


def test_ray_options_need_ray(scenes: Path, tmp_path: Path, capsys) -> None:
    argv = ["batch", str(scenes), "--out", str(tmp_path / "o"), "--actors", "2"]
    assert main(argv) == 2
    assert "--actors applies with --ray only" in capsys.readouterr().err


def test_per_scene_options_and_uris(tmp_path: Path, photo, small_model, small_checkpoint) -> None:
    """A manifest, its images and the outputs on an fsspec filesystem (memory://, the same
    calls as s3:// or gs://); one scene with its own resolution and export list."""
    local = tmp_path / "local"
    rows = _write_scenes(local, photo("coffee"), count=2)
    memory = fsspec.filesystem("memory")
    base = f"memory://batch-{tmp_path.name}"
    for path in local.rglob("*.png"):
        memory.pipe_file(f"{base}/in/{path.relative_to(local).as_posix()}", path.read_bytes())
    rows[1]["options"] = {
        "process_res": 56,
        "output_resolution": "processing",
        "export": ["depth_npy"],
    }
    memory.pipe_file(f"{base}/in/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    scenes = read_manifest(f"{base}/in/m.jsonl")
    assert scenes[0].inputs[0] == f"{base}/in/scene0/v0.png"
    results = run_batch(scenes, f"{base}/out", _settings(small_checkpoint), model=small_model)
    assert [r.status for r in results] == ["done", "done"], results
    assert results[1].folder == f"{base}/out/s1"
    assert "depth_0001_v1.npy" in results[1].files
    assert not any(name.endswith(".png") for name in results[1].files), "its own export list"
    assert any(name.endswith(".png") for name in results[0].files)
    with memory.open(f"/batch-{tmp_path.name}/out/s1/depth_0000_v0.npy", "rb") as stream:
        assert np.load(stream).shape == (42, 56)
    with memory.open(f"/batch-{tmp_path.name}/out/s0/depth_0000_v0.npy", "rb") as stream:
        assert np.load(stream).shape == (96, 128)
    assert memory.exists(f"/batch-{tmp_path.name}/out/s0/{COMPLETE_NAME}")
    index = memory.cat_file(f"/batch-{tmp_path.name}/out/index.jsonl").decode().splitlines()
    assert [json.loads(line)["scene"] for line in index] == ["s0", "s1"]


def test_a_remote_folder_gives_its_images_only(
    tmp_path: Path, photo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote folder input downloaded every file under it (a bucket's archives and
    subfolders: 80 MB for 2 views); it now gives its images, as a local folder does, and at
    most the limit of one input in all."""
    from da3cog.batch import storage

    memory = fsspec.filesystem("memory")
    base = f"memory://folder-{tmp_path.name}/scene"
    png = tmp_path / "v.png"
    Image.fromarray(photo("coffee")[:64, :64]).save(png)
    for name in ("b.png", "a.png"):
        memory.pipe_file(f"{base}/{name}", png.read_bytes())
    memory.pipe_file(f"{base}/notes.txt", b"not an image")
    memory.pipe_file(f"{base}/raw/huge.bin", b"\0" * 1_000_000)
    (local,) = storage.fetch_inputs([base], tmp_path / "fetched")
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["a.png", "b.png"]
    monkeypatch.setattr(storage, "MAX_REMOTE_INPUT_BYTES", png.stat().st_size)
    with pytest.raises(ValueError, match=r"scene: its 2 images come to .* GiB, over"):
        storage.fetch_inputs([base], tmp_path / "again")


def test_a_scene_with_its_own_formats_takes_the_batch_export_options_it_can(
    tmp_path: Path, photo, small_model: DepthAnything3, small_checkpoint: Path
) -> None:
    """The batch's export options (the point clouds' seed) go to a scene only as far as its
    own formats take them: a scene without point clouds is done, not failed after its
    prediction for an option it has no use for."""
    rows = _write_scenes(tmp_path, photo("coffee"), count=2)
    rows[1]["options"] = {"export": ["depth_npy", "cameras_json"]}
    text = "".join(json.dumps(r) + "\n" for r in rows)
    settings = _settings(small_checkpoint, formats=("ply", "depth_npy"), export_options={"seed": 3})
    scenes = read_manifest_text(tmp_path, text)
    results = run_batch(scenes, tmp_path / "out", settings, model=small_model)
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    assert any(name.endswith(".ply") for name in results[0].files)
    assert not any(name.endswith(".ply") for name in results[1].files)


def test_a_scene_whose_options_clash_with_the_batchs_is_refused_before_any_run(
    tmp_path: Path, photo, small_checkpoint: Path
) -> None:
    """Checked with the batch's settings, not alone: chunk_overlap under a batch run in one
    pass (chunk_size None) stops the batch naming the scene, before a model loads."""
    rows = _write_scenes(tmp_path, photo("coffee"), count=2)
    rows[1]["options"] = {"chunk_overlap": 2}
    scenes = read_manifest_text(tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    settings = dataclasses.replace(
        _settings(tmp_path / "no-such-checkpoint"),
        options=InferenceOptions(process_res=56, chunk_size=None),
    )
    with pytest.raises(ValueError, match="scene s1: options: chunk_overlap needs chunk_size"):
        run_batch(scenes, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_a_long_scene_runs_in_chunks_inside_its_worker(
    tmp_path: Path, photo, small_model: DepthAnything3, small_checkpoint: Path
) -> None:
    """A scene whose options ask for chunks of 4 views runs as aligned chunks in the worker
    like any other scene: one output per frame, each with its chunk in the manifest."""
    picture = photo("coffee")
    names = []
    for view in range(7):
        name = f"long/v{view}.png"
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(picture[100:196, 30 * view : 30 * view + 128])).save(
            tmp_path / name
        )
        names.append(name)
    row = {"scene": "long", "images": names, "options": {"chunk_size": 4, "chunk_overlap": 2}}
    (result,) = run_batch(
        read_manifest_text(tmp_path, json.dumps(row)),
        tmp_path / "out",
        _settings(small_checkpoint),
        model=small_model,
    )
    assert result.status == "done" and result.views == 7, result.error
    views = json.loads((tmp_path / "out" / "long" / "manifest.json").read_text())["views"]
    assert [view["name"] for view in views] == [f"v{n}" for n in range(7)]
    # Chunks 0-3, 2-5 and 3-6 (the last one full), each view from the chunk it is central in.
    assert [view["chunk"] for view in views] == [0, 0, 0, 1, 1, 2, 2]


def test_csv_and_parquet_manifests(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "scene,images,video,cameras,options\nk,a.png;b.png,,,\n"
        'w,,walk.mp4,c.json,"{""stride"": 5}"\n'
    )
    # Saved by Excel as "CSV UTF-8": a byte-order mark first.
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    first, second = read_manifest(manifest)
    assert first.id == "k"
    assert first.inputs == (str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert first.cameras is None and first.options == {}
    assert second.inputs == (str(tmp_path / "walk.mp4"),)
    assert second.cameras == str(tmp_path / "c.json") and second.options == {"stride": 5}
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [
            {"scene": "k", "images": ["a.png", "s3://b/x.png"], "video": None, "options": None},
            {"scene": "w", "images": None, "video": "w.mp4", "options": '{"process_res": 336}'},
        ]
    )
    pq.write_table(table, tmp_path / "m.parquet")
    first, second = read_manifest(tmp_path / "m.parquet")
    assert first.inputs == (str(tmp_path / "a.png"), "s3://b/x.png")
    assert second.options == {"process_res": 336}
    # A trailing comma (an empty column name) is not a column; a misspelt one is refused.
    (tmp_path / "trailing.csv").write_text("scene,images,\nk,a.png,\n")
    assert read_manifest(tmp_path / "trailing.csv")[0].id == "k"
    (tmp_path / "typo.csv").write_text("scene,image\nk,a.png\n")
    with pytest.raises(ValueError, match=r"typo.csv line 1: unknown column.*image"):
        read_manifest(tmp_path / "typo.csv")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"scene": "a/b", "images": ["x.png"]}', "'scene' must be an id"),
        ('{"scene": "a", "images": []}', "needs 'images'"),
        ('{"scene": "a", "images": ["x.png"]}\n{"scene": "a", "video": "v.mp4"}', "listed twice"),
        ("not json", "line 1: not JSON"),
        ('{"scene": "a", "video": "v.mp4", "options": {"speed": 2}}', "unknown option.*speed"),
        ('{"scene": "a", "video": "v.mp4", "options": {"mixed_shapes": "x"}}', "mixed_shapes"),
        ('{"scene": "a", "video": "v.mp4", "options": {"export": ["gif"]}}', "format.*gif"),
        ('{"scene": "a", "video": "v.mp4", "options": {"fps": 2, "stride": 3}}', "not both"),
        ('{"scene": "a", "video": "v.mp4", "options": {"stride": 0}}', "stride must be a whole"),
        ('{"scene": "a", "video": "v.mp4", "options": {"fps": "1"}}', "fps must be a number"),
        ('{"scene": "a", "video": "v.mp4", "options": {"stride": 2.5}}', "stride must be a whole"),
        ('{"scene": "index.jsonl", "video": "v.mp4"}', "names the batch's index"),
        ('{"scene": "a", "vidoe": "v.mp4", "images": ["x.png"]}', "unknown field.*vidoe"),
        ('{"scene": "a", "images": ["x.png"], "option": {"fps": 1}}', "unknown field.*option"),
        (
            '{"scene": "a", "video": "v.mp4", "options": {"loop_closure": "no"}}',
            "line 1.*loop_closure must be true or false",
        ),
        # One folder on a disk that ignores case (macOS, Windows): refused, not a crash
        # after every scene ran.
        (
            '{"scene": "Kitchen", "video": "v.mp4"}\n{"scene": "kitchen", "video": "w.mp4"}',
            "line 2: scene 'kitchen' is listed twice \\('Kitchen' before\\)",
        ),
        ('{"scene": "INDEX.jsonl", "video": "v.mp4"}', "names the batch's index"),
        # Refused when read, not after the model loaded and the inputs were fetched.
        ('{"scene": "a", "video": "v.mp4", "options": {"process_res": "336"}}', "process_res"),
        ('{"scene": "a", "video": "v.mp4", "options": {"process_res": 0}}', "between 14"),
        ('{"scene": "a", "video": "v.mp4", "options": {"resize_method": "x"}}', "method 'x'"),
        (
            '{"scene": "a", "video": "v.mp4", "options": {"export": ["gaussians_ply"]}}',
            "gaussians_ply needs the Gaussians predicted",
        ),
    ],
)
def test_bad_manifests_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_manifest_text(tmp_path, text)


# --- on a local Ray cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for this module (2 CPUs, no dashboard): its address."""
    ray = pytest.importorskip("ray", reason="Ray Data comes with the batch extra")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_on_ray_every_scene_lands_once(
    scenes: Path, tmp_path: Path, small_checkpoint: Path, predicted_alone: Path, ray_cluster: str
) -> None:
    out = tmp_path / "out"
    results = run_batch(
        read_manifest(scenes),
        out,
        _settings(small_checkpoint),
        ray=RayOptions(min_actors=1, max_actors=2),
    )
    assert [r.scene for r in results] == [f"s{n}" for n in range(SCENES)]
    _check_landed(out, predicted_alone, exact=False)
    assert all(r.worker.split(":")[1] != str(os.getpid()) for r in results)


def test_on_ray_a_killed_actor_is_replaced(
    scenes: Path, tmp_path: Path, small_checkpoint: Path, predicted_alone: Path, ray_cluster: str
) -> None:
    """The actor's process is killed (SIGKILL) while it runs a scene: Ray starts another and
    runs that scene again; every scene still lands exactly once."""
    out = tmp_path / "out"
    results: list = []
    run = threading.Thread(
        target=lambda: results.extend(
            run_batch(
                read_manifest(scenes),
                out,
                _settings(small_checkpoint),
                ray=RayOptions(min_actors=1, max_actors=1),
            )
        )
    )
    run.start()
    deadline = time.monotonic() + 120
    while not (out / "s0" / COMPLETE_NAME).is_file():
        assert time.monotonic() < deadline and run.is_alive(), "s0 never landed"
        time.sleep(0.02)
    victim = int(json.loads((out / "s0" / "result.json").read_text())["worker"].split(":")[1])
    # A staging folder exists from a scene's start to its end: kill while one does.
    while not any((out / PARTIAL_FOLDER).iterdir()):
        assert time.monotonic() < deadline and run.is_alive(), "no scene started after s0"
        time.sleep(0.002)
    os.kill(victim, signal.SIGKILL)
    run.join(timeout=240)
    assert not run.is_alive()
    index = _check_landed(out, predicted_alone, exact=False)
    workers = {row["worker"] for row in index if row["worker"]}
    assert len(workers) == 2 and any(w.endswith(f":{victim}") for w in workers)
    assert not (out / PARTIAL_FOLDER).exists()


@pytest.mark.parametrize("backend", ["in process", "ray"])
def test_a_killed_driver_resumes(
    backend: str,
    scenes: Path,
    tmp_path: Path,
    small_checkpoint: Path,
    predicted_alone: Path,
    request: pytest.FixtureRequest,
) -> None:
    """``da3cog batch`` (in process, or ``--ray ADDRESS``) killed (SIGKILL) after its first
    scene landed; the same command again runs only the scenes that had not landed."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "da3cog.cli", "batch", str(scenes), "--out", str(out)]
    argv += ["--model", str(small_checkpoint), "--process-res", "112", "--device", "cpu"]
    if backend == "ray":
        argv += ["--ray", request.getfixturevalue("ray_cluster"), "--actors", "1"]
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "s0" / COMPLETE_NAME).is_file():
        assert time.monotonic() < deadline and driver.poll() is None, "s0 never landed"
        time.sleep(0.02)
    driver.kill()
    driver.wait()
    landed = {p.parent.name for p in out.glob(f"*/{COMPLETE_NAME}")}
    assert "s3" not in landed, "the driver was killed too late to test a resume"
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 1, rerun.stderr  # s2 is broken
    for scene in sorted(landed):
        assert f"{scene}: done earlier, skipped" in rerun.stderr
    assert rerun.stderr.count("done earlier, skipped") == len(landed)
    _check_landed(out, predicted_alone, exact=backend != "ray")


def test_an_actor_whose_model_does_not_load_fails_its_scenes(tmp_path: Path) -> None:
    """A model that cannot load on a worker makes that worker's scenes error rows (the job
    goes on), without Ray: the actor class is plain Python."""
    from da3cog.batch.ray_backend import SceneActor

    actor = SceneActor(BatchSettings(model=str(tmp_path / "nowhere"), device="cpu"), str(tmp_path))
    scene = read_manifest_text(tmp_path, '{"scene": "a", "images": ["x.png"]}')[0]
    (row,) = actor({"scene": np.array([json.dumps(scene.document())])})["result"]
    row = json.loads(row)
    assert row["status"] == "failed" and "did not load on this worker" in row["error"]
    assert "nowhere" in row["error"]


def read_manifest_text(folder: Path, text: str):
    manifest = folder / "m.jsonl"
    manifest.write_text(text + "\n")
    return read_manifest(manifest)


@pytest.mark.parametrize(
    ("resources", "options", "expected"),
    [
        ({"CPU": 2}, RayOptions(), (0.0, 1)),
        ({"CPU": 16, "GPU": 4}, RayOptions(), (1.0, 4)),
        ({"CPU": 16, "GPU": 4}, RayOptions(gpus_per_actor=0.5), (0.5, 8)),
        ({"CPU": 16, "GPU": 4}, RayOptions(min_actors=1, max_actors=2), (1.0, 2)),
        ({"CPU": 8}, RayOptions(max_actors=3), (0.0, 3)),
    ],
)
def test_actor_pool_bounds(resources, options, expected) -> None:
    from da3cog.batch.ray_backend import _pool

    assert _pool(resources, options) == expected


def test_actor_pool_refusals() -> None:
    from da3cog.batch.ray_backend import _pool

    with pytest.raises(ValueError, match=r"asks for 1 GPU.*cluster has 0"):
        _pool({"CPU": 2}, RayOptions(gpus_per_actor=1))
    with pytest.raises(ValueError, match="below min actors"):
        RayOptions(min_actors=3, max_actors=2)


def test_each_worker_loads_the_model_at_the_batch_precision(small_checkpoint: Path) -> None:
    assert _settings(small_checkpoint).load_model().precision == "fp32"
    assert _settings(small_checkpoint, precision="bf16").load_model().precision == "bf16"
