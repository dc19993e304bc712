"""The Replicate model through the real cog server (coglet), as Replicate runs it.

``python -m cog.server.http`` serves ``tests/cog_standin.py:Runner`` (the real ``predict.py``
Runner with ViT-S stand-ins registered) on 127.0.0.1, offline (``HF_HUB_OFFLINE=1``), with
Hub-layout random-weight checkpoints under ``$DA3COG_WEIGHTS_DIR`` (da3-giant: da3-small with
the giant's Gaussian head; da3-small; da3nested-giant-large and da3metric-large: ViT-S
versions; no da3-base or da3-large, so asking for them shows the offline error), the schema
file generated from ``predict.py`` in its working folder, and a loopback upload server that
records every uploaded file. Every wait is bounded; the server's process group is killed at
the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hostile
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "cog_standin.py"
SERVER_START_TIMEOUT = 180.0
REQUEST_TIMEOUT = 180.0
SMALL = {"process_resolution": 140}


# --------------------------------------------------------------------------------------------
# Loopback upload server
# --------------------------------------------------------------------------------------------


@dataclass
class Upload:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class UploadStore:
    uploads: list[Upload] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def for_prediction(self, prediction_id: str) -> list[Upload]:
        with self.lock:
            return [u for u in self.uploads if u.headers.get("x-prediction-id") == prediction_id]

    def body(self, url_path: str) -> bytes:
        with self.lock:
            matches = [u.body for u in self.uploads if f"/files{u.path}" == url_path]
        if not matches:
            raise KeyError(url_path)
        return matches[-1]


def _upload_handler(store: UploadStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            with store.lock:
                store.uploads.append(Upload(self.path, body, headers))
            self.send_response(201)
            host, port = self.server.server_address[:2]
            self.send_header("Location", f"http://{host}:{port}/files{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            try:
                body = store.body(self.path)
            except KeyError:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    return Handler


@pytest.fixture(scope="module")
def upload_store() -> Iterator[tuple[UploadStore, str]]:
    store = UploadStore()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _upload_handler(store))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield store, f"http://127.0.0.1:{server.server_address[1]}/upload/"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------------------------
# The cog server
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class CogServer:
    url: str
    process: subprocess.Popen
    log: Path
    statuses: list[str]
    tmp: Path

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/health-check", timeout=10) as response:
            return json.loads(response.read())

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """POST a prediction. coglet 0.23.1 frees its slot asynchronously after answering, so
        a request sent at once after another can get 409 for a few milliseconds (after
        successes and failures alike; README "Replicate / cog"): retried briefly."""
        for _ in range(50):
            code, body = self.request("POST", "/predictions", {"input": inputs})
            if code != 409:
                break
            time.sleep(0.02)
        assert code == 200, body
        return body

    def wait_ready(self, timeout: float = 30.0) -> str:
        """The health status once it is READY (or the last one seen at the deadline)."""
        deadline = time.monotonic() + timeout
        status = self.health()["status"]
        while status != "READY" and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.health()["status"]
        return status


def _write_schema(folder: Path) -> None:
    from da3cog.serve.schema import load_runner, openapi_schema, render

    schema = openapi_schema(load_runner(f"{ROOT / 'predict.py'}:Runner"))
    (folder / ".cog").mkdir(parents=True, exist_ok=True)
    (folder / ".cog" / "openapi_schema.json").write_text(render(schema))


def _server_env(weights: Path, tmp: Path, port: int, predictor: str) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        {
            # coglet starts its worker as `python` from PATH: the test's interpreter first.
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "PORT": str(port),
            "COG_PREDICT_TYPE_STUB": predictor,
            "DA3COG_WEIGHTS_DIR": str(weights),
            "DA3COG_CACHE_DIR": str(tmp / "hub-cache"),
            "DA3COG_SERVE_TMP": str(tmp / "requests"),
            "DA3COG_TEST_HOLD_FILE": str(tmp / "hold"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2",
        }
    )
    return env


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its worker: the process group this test created."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def start_server(
    tmp_path_factory: pytest.TempPathFactory, upload_store: tuple[UploadStore, str]
) -> Iterator[Callable[..., CogServer]]:
    """``start_server(weights_dir)``: a cog server on 127.0.0.1, stopped after the module;
    returns once setup has finished (READY or SETUP_FAILED), with the statuses seen."""
    processes: list[subprocess.Popen] = []

    def start(weights: Path, predictor: str | None = None) -> CogServer:
        work = tmp_path_factory.mktemp("cog-server")
        if predictor is None:
            predictor = f"{STANDIN}:Runner"
            _write_schema(work)
        port = _free_port()
        log = work / "server.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cog.server.http",
                    "--host",
                    "127.0.0.1",
                    "--upload-url",
                    upload_store[1],
                ],
                cwd=work,
                env=_server_env(weights, work, port, predictor),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(process)
        server = CogServer(f"http://127.0.0.1:{port}", process, log, [], work)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"cog server exited: {log.read_text(errors='replace')[-3000:]}")
            try:
                status = server.health()["status"]
            except (OSError, ValueError):
                time.sleep(0.1)
                continue
            if not server.statuses or server.statuses[-1] != status:
                server.statuses.append(status)
            if status in ("READY", "SETUP_FAILED"):
                return server
            time.sleep(0.1)
        pytest.fail(f"cog server not ready in time: {log.read_text(errors='replace')[-3000:]}")

    yield start
    for process in processes:
        _stop(process)


@pytest.fixture(scope="module")
def weights(
    tmp_path_factory: pytest.TempPathFactory,
    small_checkpoint: Path,
    small_zoo_checkpoint: Callable[[str], tuple[Path, Any]],
) -> Path:
    """``$DA3COG_WEIGHTS_DIR`` with one Hub-layout folder per preset the tests use."""
    root = tmp_path_factory.mktemp("weights")
    (root / "da3-giant").symlink_to(small_zoo_checkpoint("small-gs")[0])
    (root / "da3-small").symlink_to(small_checkpoint)
    (root / "da3nested-giant-large").symlink_to(small_zoo_checkpoint("nested-small")[0])
    (root / "da3metric-large").symlink_to(small_zoo_checkpoint("metric-small")[0])
    return root


@pytest.fixture(scope="module")
def server(start_server: Callable[..., CogServer], weights: Path) -> CogServer:
    server = start_server(weights)
    assert server.statuses[-1] == "READY", server.log.read_text(errors="replace")[-3000:]
    return server


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def image_uri(picture: np.ndarray, fmt: str = "PNG", mime: str = "image/png") -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, fmt)
    return data_uri(buffer.getvalue(), mime)


@pytest.fixture(scope="module")
def pictures(photo: Callable[[str], np.ndarray]) -> list[np.ndarray]:
    """Two small real photos (different sizes, as users send them)."""
    return [photo("astronaut")[::4, ::4], photo("coffee")[::4, ::4]]


@dataclass
class Result:
    body: dict[str, Any]
    manifest: dict[str, Any]
    files: dict[str, bytes]

    def names(self, role: str) -> list[str]:
        return sorted(f["name"] for f in self.manifest["files"] if f["role"] == role)


def fetch(server: CogServer, store: UploadStore, body: dict[str, Any]) -> Result:
    """Check that every output was uploaded under a unique name, then read them back."""
    assert body["status"] == "succeeded", body.get("error")
    outputs = body["output"]
    assert all(url.startswith("http://127.0.0.1:") for url in outputs), outputs
    names = [url.rsplit("/", 1)[-1] for url in outputs]
    assert len(set(names)) == len(names), f"duplicate output names: {names}"
    uploaded = sorted(u.path.rsplit("/", 1)[-1] for u in store.for_prediction(body["id"]))
    assert uploaded == sorted(names), "every output is uploaded exactly once"
    files = {}
    for url, name in zip(outputs, names, strict=True):
        with urllib.request.urlopen(url, timeout=30) as response:
            files[name] = response.read()
    manifest = json.loads(files["manifest.json"])
    listed = sorted(f["name"] for f in manifest["files"])
    assert listed == sorted(n for n in names if n != "manifest.json")
    return Result(body, manifest, files)


def check_depth_files(result: Result, views: int) -> None:
    depth = result.names("depth_npy")
    assert len(depth) == views and len(result.names("depth_vis")) == views
    for name in depth:
        array = np.load(io.BytesIO(result.files[name]))
        assert array.dtype == np.float32 and array.ndim == 2 and np.isfinite(array).all()
    for name in result.names("depth_vis"):
        assert Image.open(io.BytesIO(result.files[name])).format == "PNG"


def check_format(result: Result, export_format: str, predictions: int) -> None:
    roles = {f["role"] for f in result.manifest["files"]}
    if export_format in ("glb", "all"):
        assert len(result.names("glb_scene")) == predictions
        assert all(result.files[n][:4] == b"glTF" for n in result.names("glb_scene"))
    if export_format in ("ply", "all"):
        assert len(result.names("point_cloud")) == predictions
        assert all(result.files[n].startswith(b"ply\n") for n in result.names("point_cloud"))
    if export_format in ("npz", "all"):
        for name in result.names("npz"):
            assert "depth" in "".join(np.load(io.BytesIO(result.files[name])).files)
        assert len(result.names("npz")) == predictions
    if export_format in ("colmap", "all"):
        assert len(result.names("colmap_zip")) == predictions
        for name in result.names("colmap_zip"):
            members = zipfile.ZipFile(io.BytesIO(result.files[name])).namelist()
            assert "sparse/0/cameras.txt" in members or "sparse/0/cameras.bin" in members
            assert any(m.startswith("images/") for m in members)
    if export_format == "none":
        assert not roles & {"glb_scene", "point_cloud", "npz", "colmap_zip"}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_health_goes_from_starting_to_ready(server: CogServer) -> None:
    assert server.statuses[0] == "STARTING" and server.statuses[-1] == "READY"
    # The schema generated from predict.py was loaded: inputs are validated.
    assert "Input validation enabled" in server.health()["setup"]["logs"]


MODES = ("monocular", "multi-view", "gaussian-splat")
EXPORTS = ("glb", "ply", "npz", "colmap", "all", "none")


@pytest.mark.parametrize("export_format", EXPORTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_format_returns_its_files_uploaded(
    server: CogServer,
    upload_store: tuple[UploadStore, str],
    pictures: list[np.ndarray],
    mode: str,
    export_format: str,
) -> None:
    body = server.predict(
        {
            "image": image_uri(pictures[0]),
            "images": [image_uri(pictures[1], "JPEG", "image/jpeg")],
            "mode": mode,
            "export_format": export_format,
            **SMALL,
        }
    )
    result = fetch(server, upload_store[0], body)
    predictions = 2 if mode == "monocular" else 1
    assert len(result.manifest["predictions"]) == predictions
    check_depth_files(result, views=2)
    assert len(result.names("cameras_json")) == predictions
    check_format(result, export_format, predictions)
    if mode == "monocular":
        assert all(
            f["name"].startswith(("view_0000_", "view_0001_")) for f in result.manifest["files"]
        )
    gaussians = result.names("gaussian_splats")
    assert len(gaussians) == (1 if mode == "gaussian-splat" else 0)
    if gaussians:
        ply = result.files[gaussians[0]]
        end = ply.index(b"end_header\n") + len(b"end_header\n")
        header = ply[:end].decode()
        assert "property float f_rest_23" in header and "property float rot_3" in header
        count = int(header.split("element vertex ")[1].split()[0])
        assert count > 0 and len(ply) == end + count * header.count("property float") * 4
        (row,) = [f for f in result.manifest["files"] if f["role"] == "gaussian_splats"]
        assert row["name"] == "gaussians.ply" and row["gaussians"] == count


def test_invalid_inputs_are_rejected_with_422(
    server: CogServer, pictures: list[np.ndarray]
) -> None:
    image = image_uri(pictures[0])
    for inputs, field_name in (
        ({"image": image, "mode": "stereo"}, "mode"),
        ({"image": image, "model_size": "huge"}, "model_size"),
        ({"image": image, "export_format": "obj"}, "export_format"),
        ({"image": image, "process_resolution": 5000}, "process_resolution"),
        ({"image": image, "confidence_percentile": -1}, "confidence_percentile"),
        ({"image": image, "max_frames": 0}, "max_frames"),
        ({"image": image, "video_fps": 100}, "video_fps"),
        ({"image": image, "seed": -5}, "seed"),
        ({"image": image, "metric": "yes"}, "metric"),
        ({"mode": "monocular"}, "image"),
    ):
        code, body = server.request("POST", "/predictions", {"input": inputs})
        assert code == 422, (field_name, body.get("status"), body.get("error"))
        assert field_name in json.dumps(body["detail"]), body


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            {"mode": "gaussian-splat", "model_size": "small"},
            "needs a model with a Gaussian head, and model_size=small has none: use "
            "model_size=giant",
        ),
        ({"metric": True, "model_size": "small"}, "metric depth is not available"),
        ({"metric": True, "model_size": "large"}, "mode=monocular"),
        ({"model_size": "base"}, "depth-anything/DA3-BASE"),
        ({"render_video": True, "mode": "gaussian-splat"}, "needs a CUDA GPU"),
    ],
)
def test_combinations_that_cannot_work_fail_with_a_clear_message(
    server: CogServer, pictures: list[np.ndarray], inputs: dict[str, Any], expected: str
) -> None:
    started = time.monotonic()
    body = server.predict({"image": image_uri(pictures[0]), **SMALL, **inputs})
    assert body["status"] == "failed"
    assert expected in body["error"], body["error"]
    if inputs.get("model_size") == "base":
        # Lazy loading of a model without local weights names the repo and the override.
        assert "DA3COG_WEIGHTS_DIR" in body["error"] and "da3-base" in body["error"]
    assert time.monotonic() - started < 30


def test_metric_depth_from_the_nested_and_metric_models(
    server: CogServer, upload_store: tuple[UploadStore, str], pictures: list[np.ndarray]
) -> None:
    nested = fetch(
        server,
        upload_store[0],
        server.predict(
            {"image": image_uri(pictures[0]), "metric": True, "mode": "monocular", **SMALL}
        ),
    )
    assert nested.manifest["model"]["preset"] == "da3nested-giant-large"
    assert nested.manifest["model"]["loaded_preset"] == "nested-small"
    splats = fetch(
        server,
        upload_store[0],
        server.predict(
            {
                "image": image_uri(pictures[0]),
                "images": [image_uri(pictures[1])],
                "metric": True,
                "mode": "gaussian-splat",
                "export_format": "none",
                **SMALL,
            }
        ),
    )
    assert splats.manifest["model"]["preset"] == "da3nested-giant-large"
    assert len(splats.names("gaussian_splats")) == 1
    height, width = pictures[1].shape[:2]
    cameras = {"intrinsics": [[width * 0.9, 0, width / 2], [0, width * 0.9, height / 2], [0, 0, 1]]}
    metric = fetch(
        server,
        upload_store[0],
        server.predict(
            {
                "image": image_uri(pictures[1]),
                "cameras": data_uri(json.dumps(cameras).encode(), "application/json"),
                "metric": True,
                "model_size": "large",
                "mode": "monocular",
                "export_format": "ply",
                **SMALL,
            }
        ),
    )
    assert metric.manifest["model"]["preset"] == "da3metric-large"
    assert metric.manifest["is_metric"] is True
    assert metric.manifest["predictions"][0]["focal_source"] == "user intrinsics"
    assert len(metric.names("point_cloud")) == 1


def test_pose_conditioned_request(
    server: CogServer, upload_store: tuple[UploadStore, str], pictures: list[np.ndarray]
) -> None:
    extrinsics = [np.eye(4).tolist(), np.eye(4).tolist()]
    extrinsics[1][0][3] = 0.5
    k = [[100.0, 0.0, 64.0], [0.0, 100.0, 64.0], [0.0, 0.0, 1.0]]
    cameras = {"intrinsics": k, "extrinsics": extrinsics}
    result = fetch(
        server,
        upload_store[0],
        server.predict(
            {
                "image": image_uri(pictures[0]),
                "images": [image_uri(pictures[1])],
                "cameras": data_uri(json.dumps(cameras).encode(), "application/json"),
                "export_format": "none",
                **SMALL,
            }
        ),
    )
    assert result.manifest["predictions"][0]["pose_conditioned"] is True
    document = json.loads(result.files["cameras.json"])
    assert np.allclose(document["views"][1]["world_to_camera"], extrinsics[1], atol=1e-5)


def test_zip_heic_and_further_images(
    server: CogServer,
    upload_store: tuple[UploadStore, str],
    pictures: list[np.ndarray],
    photo: Callable[[str], np.ndarray],
) -> None:
    import pillow_heif

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for name, picture in (("b_second.png", pictures[1]), ("a_first.png", pictures[0])):
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, "PNG")
            bundle.writestr(f"scene/{name}", buffer.getvalue())
        bundle.writestr("__MACOSX/scene/._a_first.png", b"junk")
        bundle.writestr("scene/notes.txt", b"not an image")
    pillow_heif.register_heif_opener()
    heic = io.BytesIO()
    Image.fromarray(photo("chelsea")[::4, ::4]).save(heic, "HEIF")
    result = fetch(
        server,
        upload_store[0],
        server.predict(
            {
                "image": data_uri(archive.getvalue(), "application/zip"),
                "images": [data_uri(heic.getvalue(), "image/heic")],
                "export_format": "none",
                **SMALL,
            }
        ),
    )
    assert result.manifest["input"]["kind"] == "zip"
    assert result.manifest["input"]["names"][:2] == ["a_first", "b_second"]
    check_depth_files(result, views=3)


def test_video_input_and_depth_video(
    server: CogServer, upload_store: tuple[UploadStore, str], tmp_path: Path
) -> None:
    import av

    from da3cog.serve.video import encode_mp4

    generator = np.random.default_rng(0)
    base = generator.integers(0, 255, (72, 96, 3), dtype=np.uint8)
    clip = tmp_path / "clip.mp4"
    encode_mp4((np.roll(base, 4 * i, axis=1) for i in range(12)), clip, fps=6)
    result = fetch(
        server,
        upload_store[0],
        server.predict(
            {
                "image": data_uri(clip.read_bytes(), "video/mp4"),
                "video_fps": 2.0,
                "max_frames": 3,
                "render_video": True,
                "export_format": "none",
                **SMALL,
            }
        ),
    )
    details = result.manifest["input"].pop("details")
    assert result.manifest["input"] == {
        "kind": "video",
        "views": 3,
        "names": ["frame_0000", "frame_0001", "frame_0002"],
    }
    assert [d["source"] for d in details] == [f'image "file.mp4" frame {i}' for i in range(3)]
    check_depth_files(result, views=3)
    (video_name,) = result.names("depth_video")
    with av.open(io.BytesIO(result.files[video_name])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3


def test_busy_server_answers_409_and_cancel_stops_between_stages(
    server: CogServer, upload_store: tuple[UploadStore, str], pictures: list[np.ndarray]
) -> None:
    hold = server.tmp / "hold"
    hold.touch()
    outcome: dict[str, Any] = {}

    def held_request() -> None:
        outcome["result"] = server.request(
            "PUT",
            "/predictions/held-request",
            {"id": "held-request", "input": {"image": image_uri(pictures[0]), **SMALL}},
        )

    requests = server.tmp / "requests"
    earlier = set(requests.glob("da3cog-request-*"))
    worker = threading.Thread(target=held_request)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        # The held request has gathered its inputs and waits before the network runs.
        while not [p for p in requests.glob("da3cog-request-*/inputs") if p.parent not in earlier]:
            assert time.monotonic() < deadline, "the held request never started"
            time.sleep(0.05)
        code, body = server.request(
            "POST", "/predictions", {"input": {"image": image_uri(pictures[1]), **SMALL}}
        )
        assert code == 409, body
        code, _ = server.request("POST", "/predictions/held-request/cancel")
        assert code == 200
        worker.join(timeout=60)
        assert not worker.is_alive()
    finally:
        hold.unlink(missing_ok=True)
        worker.join(timeout=60)
    code, body = outcome["result"]
    assert code == 200 and body["status"] == "canceled", body
    # The slot comes back asynchronously after the answer (coglet): READY soon, not at once.
    assert server.wait_ready() == "READY"
    # The cancelled request left nothing behind, and the next request runs normally.
    assert not list(requests.glob("da3cog-request-*"))
    after = fetch(
        server,
        upload_store[0],
        server.predict({"image": image_uri(pictures[1]), "export_format": "none", **SMALL}),
    )
    check_depth_files(after, views=1)


HOSTILE_OVER_HTTP = [
    ({"image": "/dev/zero"}, "image: '/dev/zero' is not a file sent with this request"),
    ({"image": "/dev/stdin"}, "image: '/dev/stdin' is not a file sent with this request"),
    ({"image": "/etc/passwd"}, "image: '/etc/passwd' is not a file sent with this request"),
    ({"image": "file:///etc/hosts"}, "is not a file sent with this request"),
    ({"image": ""}, "is not a file sent with this request"),
    ({"image": data_uri(hostile.HLS, "application/vnd.apple.mpegurl")}, "neither an image"),
    ({"image": data_uri(hostile.EPS, "image/png")}, "neither an image"),
    ({"image": data_uri(hostile.png_claiming(12000, 12000), "image/png")}, "at most 100 MP"),
    (
        {
            "image": data_uri(
                hostile.zip_of({"../up.png": hostile.png(hostile.picture())}), "application/zip"
            )
        },
        "a member path that leaves",
    ),
    (
        {
            "image": data_uri(hostile.png(hostile.picture()), "image/png"),
            "cameras": data_uri(
                hostile.cameras(
                    intrinsics=hostile.k_matrix(1e300), extrinsics=[np.eye(4).tolist()]
                ),
                "application/json",
            ),
        },
        "fx = 1e+300 pixels is outside",
    ),
    (
        {
            "image": data_uri(hostile.png(hostile.picture()), "image/png"),
            "images": ["/etc/passwd"],
        },
        "images[0]: '/etc/passwd' is not a file sent with this request",
    ),
]


def test_hostile_requests_over_http_leave_the_worker_ready(
    server: CogServer, upload_store: tuple[UploadStore, str], pictures: list[np.ndarray]
) -> None:
    """A subset of tests/test_hostile_inputs.py through the real server: each is a failed
    prediction with its message, the worker stays READY, and a good request then works."""
    for inputs, expected in HOSTILE_OVER_HTTP:
        body = server.predict({**inputs, **SMALL, "model_size": "small"})
        assert body["status"] == "failed", (expected, body.get("output"))
        assert expected in body["error"], body["error"]
        assert "tmp" not in body["error"].split(":")[0], body["error"]
        assert server.wait_ready() == "READY"
    assert not list((server.tmp / "requests").glob("da3cog-request-*"))
    after = fetch(
        server,
        upload_store[0],
        server.predict({"image": image_uri(pictures[0]), "export_format": "none", **SMALL}),
    )
    check_depth_files(after, views=1)


def test_setup_failure_names_the_repo_and_the_override(
    start_server: Callable[..., CogServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    empty = tmp_path_factory.mktemp("no-weights")
    failed = start_server(empty)
    assert failed.statuses[0] == "STARTING" and failed.statuses[-1] == "SETUP_FAILED"
    logs = failed.health()["setup"]["logs"]
    assert "depth-anything/DA3-GIANT" in logs
    assert "DA3COG_WEIGHTS_DIR" in logs and str(empty / "da3-giant") in logs
    code, body = failed.request("POST", "/predictions", {"input": {"image": "x"}})
    assert code == 503, body


OUTPUT_TYPES = """
from pathlib import Path as _P
import tempfile
from cog import BaseModel, BaseRunner, Path

def _files():
    folder = _P(tempfile.mkdtemp())
    paths = []
    for index in range(3):
        (folder / str(index)).mkdir()
        path = folder / str(index) / "same.txt"
        path.write_text(str(index))
        paths.append(Path(path))
    return paths

class Files(BaseModel):
    first: Path
    rest: list[Path]

class ObjectRunner(BaseRunner):
    def run(self) -> Files:
        files = _files()
        return Files(first=files[0], rest=files[1:])

class ListRunner(BaseRunner):
    def run(self) -> list[Path]:
        return _files()
"""


def test_how_coglet_returns_each_output_type(
    start_server: Callable[..., CogServer],
    upload_store: tuple[UploadStore, str],
    tmp_path: Path,
) -> None:
    """Why the Runner returns list[Path] with unique names: in coglet 0.23.1 Path fields of an
    output object come back inlined as data URIs even with an upload URL, while list[Path]
    uploads each file as <upload URL><base name> (same names collide)."""
    runner = tmp_path / "output_types.py"
    runner.write_text(OUTPUT_TYPES)
    inline = start_server(tmp_path, f"{runner}:ObjectRunner").predict({})
    assert inline["output"]["first"].startswith("data:")
    assert all(item.startswith("data:") for item in inline["output"]["rest"])
    uploaded = start_server(tmp_path, f"{runner}:ListRunner").predict({})
    assert all(url.startswith("http://127.0.0.1:") for url in uploaded["output"])
    assert {url.rsplit("/", 1)[-1] for url in uploaded["output"]} == {"same.txt"}
    assert len(upload_store[0].for_prediction(uploaded["id"])) == 3
