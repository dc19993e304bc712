"""Hostile requests against the real predictor (:class:`da3cog.serve.handler.Server`): every
one is refused with the message it must give, before any model runs, and leaves nothing
behind; the server answers a good request afterwards. The same rules over HTTP through the
real cog server are in test_cog_server.py; property-based fuzzing is at the end."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hostile
import numpy as np
import pytest
import torch

from da3cog.serve.limits import Limits
from da3cog.serve.request import RequestError, RequestValues

SMALL_REQUEST = {"model_size": "small", "process_resolution": 140, "export_format": "none"}


@dataclass
class Uploads:
    """The folder the runtime downloads into, and files as the runtime names them."""

    folder: Path

    def add(self, name: str, data: bytes) -> Path:
        token = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789_") for _ in range(8))
        path = self.folder / f"tmp{token}{name}"
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Uploads:
    return Uploads(tmp_path_factory.mktemp("runtime-downloads"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, small_checkpoint: Path, uploads: Uploads
) -> Iterator[Any]:
    from da3cog.serve.handler import Server
    from da3cog.serve.provenance import RequestFiles

    weights = tmp_path_factory.mktemp("weights")
    (weights / "da3-small").symlink_to(small_checkpoint)
    patch = pytest.MonkeyPatch()
    patch.setenv("DA3COG_WEIGHTS_DIR", str(weights))
    server = Server(
        torch.device("cpu"),
        tmp_root=tmp_path_factory.mktemp("requests"),
        files=RequestFiles(uploads.folder),
    )
    server.setup("small", progress=lambda _: None)
    yield server
    patch.undo()


@dataclass
class Case:
    """One hostile request: ``files`` builds its file inputs from the uploads folder."""

    name: str
    files: Callable[[Uploads, Path], dict[str, Any]]
    message: str
    values: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)


def up(name: str, data: bytes) -> Callable[[Uploads, Path], dict[str, Any]]:
    return lambda uploads, _: {"image": uploads.add(name, data)}


def up_with(main: bytes, **inputs: tuple[str, bytes]) -> Callable[[Uploads, Path], dict[str, Any]]:
    def build(uploads: Uploads, _: Path) -> dict[str, Any]:
        files: dict[str, Any] = {"image": uploads.add("photo.png", main)}
        for key, (name, data) in inputs.items():
            added = uploads.add(name, data)
            files[key] = (added,) if key == "images" else added
        return files

    return build


def path_input(text: str, key: str = "image") -> Callable[[Uploads, Path], dict[str, Any]]:
    def build(uploads: Uploads, _: Path) -> dict[str, Any]:
        files: dict[str, Any] = {"image": uploads.add("photo.png", PNG)}
        files[key] = (Path(text),) if key == "images" else Path(text)
        return files

    return build


def _outside(uploads: Uploads, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "tmpabcdefghphoto.png"
    path.write_bytes(PNG)
    return {"image": path}


def _symlink(uploads: Uploads, tmp_path: Path) -> dict[str, Any]:
    link = uploads.folder / f"tmp{secrets.token_hex(4)}link.png"
    link.symlink_to("/etc/passwd")
    return {"image": link}


def _folder(uploads: Uploads, tmp_path: Path) -> dict[str, Any]:
    folder = uploads.folder / f"tmp{secrets.token_hex(4)}dir"
    folder.mkdir()
    return {"image": folder}


def _fifo(uploads: Uploads, tmp_path: Path) -> dict[str, Any]:
    fifo = uploads.folder / f"tmp{secrets.token_hex(4)}pipe.png"
    os.mkfifo(fifo)
    return {"image": fifo}


def _badly_named(uploads: Uploads, tmp_path: Path) -> dict[str, Any]:
    path = uploads.folder / "photo.png"
    path.write_bytes(PNG)
    return {"image": path}


PICTURE = hostile.picture()
PNG = hostile.png(PICTURE)
JPEG = hostile.jpeg(PICTURE)
VIEWS = 2  # views of up_with(PNG, images=...)
K = hostile.k_matrix()
POSE = np.eye(4).tolist()

REFUSED = "is not a file sent with this request"
NOT_IMAGE = "not an image in an accepted format"
NEITHER = "neither an image"

CASES = [
    # Paths that are not the request's own files: never opened.
    Case("dev-zero", path_input("/dev/zero"), f"image: '/dev/zero' {REFUSED}"),
    Case("dev-stdin", path_input("/dev/stdin"), f"image: '/dev/stdin' {REFUSED}"),
    Case("etc-passwd", path_input("/etc/passwd"), f"image: '/etc/passwd' {REFUSED}"),
    Case("empty-string", path_input(""), REFUSED),
    Case("file-url", path_input("file:///etc/hosts"), REFUSED),
    Case("relative", path_input("photo.png"), REFUSED),
    Case("outside-downloads", _outside, REFUSED),
    Case("symlink", _symlink, REFUSED),
    Case("folder", _folder, REFUSED),
    Case("fifo", _fifo, REFUSED),
    Case("not-runtime-named", _badly_named, REFUSED),
    Case("images-dev-zero", path_input("/dev/zero", "images"), f"images[0]: '/dev/zero' {REFUSED}"),
    Case(
        "cameras-passwd", path_input("/etc/passwd", "cameras"), f"cameras: '/etc/passwd' {REFUSED}"
    ),
    Case(
        "input-too-large",
        up("big.png", PNG),
        "an input file may have at most",
        limits={"max_input_bytes": 100},
    ),
    # Images: by content, within the header's bounds.
    Case("empty-file", up("empty.png", b""), 'image "empty.png": the file is empty (0 bytes)'),
    Case(
        "text-as-png",
        up("notes.png", b"hello world, not a picture\n" * 4),
        f'image "notes.png": {NEITHER}',
    ),
    Case("eps", up("page.eps", hostile.EPS), NEITHER),
    Case("eps-named-jpg", up("page.jpg", hostile.EPS), f'image "page.jpg": {NEITHER}'),
    Case("psd", up("layers.psd", hostile.PSD), NEITHER),
    Case("fits", up("sky.fits", hostile.FITS), NEITHER),
    Case("svg", up("vector.svg", hostile.SVG), NEITHER),
    Case(
        "png-144mp",
        up("huge.png", hostile.png_claiming(12000, 12000)),
        'image "huge.png": 12000x12000 = 144.0 MP; a PNG image may have at most 100 MP',
    ),
    Case(
        "png-4g-side",
        up("wide.png", hostile.png_claiming(2**31 - 1, 1)),
        'image "wide.png": larger than the 179 MP any image may have',
    ),
    Case(
        "jpeg-180mp",
        up("huge.jpg", hostile.jpeg_claiming(15000, 12000)),
        'image "huge.jpg": larger than the 179 MP any image may have',
    ),
    Case(
        "bmp-huge",
        up("huge.bmp", hostile.bmp_claiming(20000, 20000)),
        'image "huge.bmp": larger than the 179 MP any image may have',
    ),
    Case("png-truncated", up("cut.png", hostile.truncated(PNG)), 'image "cut.png"'),
    Case("png-scrambled", up("crc.png", hostile.corrupt_png_data(PNG)), 'image "crc.png"'),
    Case("jpeg-truncated", up("cut.jpg", hostile.truncated(JPEG, 0.3)), 'image "cut.jpg"'),
    Case(
        "png-magic-garbage",
        up("junk.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200),
        'cannot decode PNG image image "junk.png"',
    ),
    Case(
        "heic-garbage",
        up("junk.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100),
        'image "junk.heic"',
    ),
    Case(
        "float-tiff-range",
        up("float.tif", hostile.float_tiff(np.full((8, 8), 1000.0))),
        "values in [0, 1], got range [1000, 1000]",
    ),
    Case(
        "float-tiff-nan",
        up("nan.tif", hostile.float_tiff(np.full((8, 8), np.nan))),
        "NaN or infinite",
    ),
    Case(
        "int32-tiff-range",
        up("wide.tif", hostile.int32_tiff(np.full((8, 8), 70000))),
        "32-bit integer greyscale with values in [70000, 70000]",
    ),
    Case(
        "extra-is-zip",
        up_with(PNG, images=("more.zip", hostile.zip_of({"a.png": PNG}))),
        f'images[0] "more.zip" is {NOT_IMAGE}',
    ),
    Case(
        "extra-is-text",
        up_with(PNG, images=("more.png", b"plain text")),
        f'images[0] "more.png" is {NOT_IMAGE}',
    ),
    Case(
        "too-many-views",
        up_with(PNG, images=("b.png", PNG)),
        "a request takes at most 1 views",
        limits={"max_views": 1},
    ),
    # Zips: directory first, then member by member.
    Case(
        "zip-dotdot",
        up("a.zip", hostile.zip_of({"../../escape.png": PNG})),
        'member "../../escape.png": a member path that leaves',
    ),
    Case(
        "zip-absolute",
        up("a.zip", hostile.zip_of({"/abs/x.png": PNG})),
        "a member path that leaves",
    ),
    Case(
        "zip-encrypted",
        up("a.zip", hostile.zip_with_flags({"a.png": PNG}, 0x1)),
        'image "a.zip" member "a.png": encrypted zips are not supported',
    ),
    Case(
        "zip-bad-crc",
        up("a.zip", hostile.zip_with_bad_crc({"a.png": PNG})),
        'member "a.png": the member is corrupt',
    ),
    Case(
        "zip-aes-method",
        up("a.zip", hostile.zip_with_method({"a.png": PNG}, 99)),
        'member "a.png": cannot be extracted',
    ),
    Case(
        "zip-ratio-bomb",
        up("bomb.zip", hostile.zip_of({"bomb.png": b"\x00" * (8 << 20)})),
        'member "bomb.png": compressed',
    ),
    Case(
        "zip-member-not-image",
        up("a.zip", hostile.zip_of({"bomb.png": os.urandom(4096)}, 0)),
        f'member "bomb.png": {NOT_IMAGE}',
    ),
    Case("zip-member-eps", up("a.zip", hostile.zip_of({"a.png": hostile.EPS})), NOT_IMAGE),
    Case(
        "zip-member-zip",
        up("a.zip", hostile.zip_of({"inner.png": hostile.zip_of({"a.png": PNG})})),
        NOT_IMAGE,
    ),
    Case(
        "zip-member-huge-header",
        up("a.zip", hostile.zip_of({"big.png": hostile.png_claiming(12000, 12000)})),
        'member "big.png": 12000x12000',
    ),
    Case(
        # Past Pillow's own bomb limit (179 MP): refused as a single image is, not Pillow's
        # DecompressionBombError escaping.
        "zip-member-bomb-header",
        up("a.zip", hostile.zip_of({"big.png": hostile.png_claiming(20000, 20000)})),
        'member "big.png": larger than the 179 MP any image may have',
    ),
    Case(
        "zip-member-empty",
        up("a.zip", hostile.zip_of({"a.png": b""})),
        'member "a.png": the member is empty',
    ),
    Case(
        "zip-member-too-big",
        up("a.zip", hostile.zip_of({"a.png": PNG}, 0)),
        "a member may have at most",
        limits={"zip_max_member_bytes": 100},
    ),
    Case(
        "zip-total-too-big",
        up("a.zip", hostile.zip_of({"a.png": PNG, "b.png": PNG}, 0)),
        "the zip's images expand to",
        limits={"zip_max_total_bytes": len(PNG) + 1},
    ),
    Case(
        "zip-too-many-entries",
        up("a.zip", hostile.zip_of({f"n{i}.txt": b"x" for i in range(30)})),
        "the zip has 30 entries; at most 20",
        limits={"zip_max_entries": 20},
    ),
    Case(
        "zip-no-images",
        up("a.zip", hostile.zip_of({"readme.txt": b"hi"})),
        "the zip holds no images",
    ),
    Case(
        "zip-too-many-images",
        up("a.zip", hostile.zip_of({"a.png": PNG, "b.png": PNG})),
        "the zip holds 2 images; a request takes at most 1 views",
        limits={"max_views": 1},
    ),
    Case(
        "zip-truncated",
        up("a.zip", hostile.truncated(hostile.zip_of({"a.png": PNG, "b.png": PNG}), 0.6)),
        "not a readable zip file",
    ),
    # Videos: a few containers, no playlists, bounded decoding.
    Case("hls-playlist", up("list.m3u8", hostile.HLS), NEITHER),
    Case("hls-named-mp4", up("clip.mp4", hostile.HLS), f'image "clip.mp4": {NEITHER}'),
    Case("ffconcat", up("list.txt", hostile.FFCONCAT), NEITHER),
    Case("sdp", up("stream.sdp", hostile.SDP), NEITHER),
    Case(
        "mp4-garbage",
        up("clip.mp4", b"\x00\x00\x00\x20ftypisom" + os.urandom(2000)),
        'image "clip.mp4": not a readable video',
    ),
    Case(
        "mkv-garbage",
        up("clip.mkv", b"\x1a\x45\xdf\xa3" + os.urandom(2000)),
        "not a readable video",
    ),
    # Cameras: bounded, sane numbers.
    Case(
        "fx-1e300",
        up_with(
            PNG,
            cameras=(
                "cams.json",
                hostile.cameras(intrinsics=hostile.k_matrix(1e300), extrinsics=[POSE]),
            ),
        ),
        'cameras "cams.json": intrinsics[0]: fx = 1e+300 pixels is outside [0.64, 6400]',
    ),
    Case(
        "fx-tiny",
        up_with(
            PNG,
            cameras=(
                "cams.json",
                hostile.cameras(intrinsics=hostile.k_matrix(1e-9), extrinsics=[POSE]),
            ),
        ),
        "fx = 1e-09 pixels is outside",
    ),
    Case(
        "cx-far",
        up_with(
            PNG,
            cameras=(
                "cams.json",
                hostile.cameras(intrinsics=hostile.k_matrix(cx=1e6), extrinsics=[POSE]),
            ),
        ),
        "cx = 1e+06 pixels is outside [-64, 128]",
    ),
    Case(
        "nan-json",
        up_with(PNG, cameras=("cams.json", b'{"intrinsics": [[NaN, 0, 1], [0, 1, 1], [0, 0, 1]]}')),
        "NaN or infinite",
    ),
    Case(
        "nested-json",
        up_with(PNG, cameras=("cams.json", hostile.nested_json(100_000))),
        'cameras "cams.json": the JSON is nested too deeply',
    ),
    Case(
        "empty-json",
        up_with(PNG, cameras=("cams.json", b"")),
        'cameras "cams.json": the file is empty',
    ),
    Case(
        "not-json",
        up_with(PNG, cameras=("cams.json", b"\x89PNG not json")),
        "not a readable JSON file",
    ),
    Case("json-list", up_with(PNG, cameras=("cams.json", b"[1, 2, 3]")), "expected a JSON object"),
    Case(
        "json-too-big",
        up_with(PNG, cameras=("cams.json", b" " * (8 * 1024**2 + 1))),
        "a camera file may have at most",
    ),
    Case(
        "count-mismatch",
        up_with(
            PNG, cameras=("cams.json", hostile.cameras(intrinsics=[K, K, K], extrinsics=[POSE] * 3))
        ),
        "3 intrinsics for 1 views",
    ),
    Case(
        "translation-1e300",
        up_with(
            PNG,
            cameras=(
                "cams.json",
                hostile.cameras(
                    intrinsics=K, extrinsics=[[[1, 0, 0, 1e300], [0, 1, 0, 0], [0, 0, 1, 0]]]
                ),
            ),
        ),
        "translations beyond",
    ),
    Case(
        "not-rotation",
        up_with(
            PNG,
            cameras=(
                "cams.json",
                hostile.cameras(intrinsics=K, extrinsics=[(2 * np.eye(4)).tolist()]),
            ),
        ),
        "last row of 4x4 extrinsics",
    ),
    # Memory: a request the worker cannot hold is refused with what would fit.
    Case(
        "memory-budget",
        up_with(PNG, images=("b.png", PNG)),
        "needs about",
        values={"process_resolution": 1008},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request_is_refused_cleanly(
    server: Any,
    uploads: Uploads,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: Case,
) -> None:
    if case.name == "memory-budget":
        # Two 64x48 views at 1008 px need about 0.2 GiB by the estimate; 0.05 GiB is given.
        monkeypatch.setenv("DA3COG_MEMORY_BUDGET_GB", "0.05")
    files = case.files(uploads, tmp_path)
    values = RequestValues(**{**SMALL_REQUEST, **case.values, **files})
    if case.limits:
        monkeypatch.setattr(server, "limits", replace(server.limits, **case.limits))
        server.files.max_input_bytes = server.limits.max_input_bytes
    loads_before = len(server.cache.resident)
    started = time.monotonic()
    try:
        with pytest.raises(RequestError) as refused:
            server.handle(values, progress=lambda _: None)
    finally:
        server.files.max_input_bytes = Limits().max_input_bytes
    message = str(refused.value)
    assert case.message in message, message
    # Named in the user's terms: never our copies, nor the runtime's temporary names for
    # uploads (a path the user typed is echoed as typed).
    assert "da3cog-request-" not in message and str(server.tmp_root) not in message
    if REFUSED not in message:
        assert str(uploads.folder) not in message and "tmp" not in message.split(":")[0]
    assert "Traceback" not in message and len(message) < 600
    assert time.monotonic() - started < 30
    assert len(server.cache.resident) == loads_before
    assert list(server.tmp_root.iterdir()) == []
    # The request's own uploads are gone (the runtime leaves them behind).
    assert not [
        p
        for p in uploads.folder.iterdir()
        if p.is_file()
        and p.name.startswith("tmp")
        and not p.is_symlink()
        and p.stat().st_nlink
        and p in files.values()
    ]


def test_the_server_still_answers_after_hostile_requests(server: Any, uploads: Uploads) -> None:
    files = server.handle(
        RequestValues(image=uploads.add("photo.png", PNG), **SMALL_REQUEST),
        progress=lambda _: None,
    )
    assert files[0].name == "manifest.json" and all(path.is_file() for path in files)


def test_a_view_larger_than_the_limit_is_read_downscaled(
    server: Any, uploads: Uploads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JPEG over max_view_pixels is decoded at a DCT scale and resized to fit; outputs at
    input resolution have the reduced size, given intrinsics follow, the manifest says so."""
    import json

    monkeypatch.setattr(server, "limits", replace(server.limits, max_view_pixels=64 * 48))
    big = hostile.jpeg(hostile.picture(480, 640, seed=3))
    cameras = hostile.cameras(intrinsics=hostile.k_matrix(600.0, 320.0, 240.0), extrinsics=[POSE])
    values = RequestValues(
        image=uploads.add("big.jpg", big),
        cameras=uploads.add("cams.json", cameras),
        **{**SMALL_REQUEST, "export_format": "npz"},
    )
    files = server.handle(values, progress=lambda _: None)
    manifest = json.loads(files[0].read_text())
    (detail,) = manifest["input"]["details"]
    assert detail["input_size"] == [640, 480] and detail["size"] == [64, 48]
    assert detail["downscaled"] is True and detail["source"] == 'image "big.jpg"'
    assert any("read downscaled" in note for note in manifest["notes"])
    (npz_path,) = [p for p in files if p.suffix == ".npz"]
    arrays = np.load(npz_path)
    depth = next(arrays[key] for key in arrays.files if "depth" in key)
    assert depth.shape[-2:] == (48, 64)
    intrinsics = next(arrays[key] for key in arrays.files if "intrinsics" in key)
    assert np.allclose(intrinsics.reshape(-1, 3, 3)[0], hostile.k_matrix(60.0, 32.0, 24.0))


# --------------------------------------------------------------------------------------------
# Property-based fuzzing: whatever the bytes, only RequestError leaves the intake
# --------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SIGNATURES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"PK\x03\x04",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"II*\x00",
    b"BM",
    b"\x00\x00\x00\x18ftypheic",
    b"\x00\x00\x00\x20ftypisom",
    b"\x1a\x45\xdf\xa3",
    b"GIF89a",
]


def _gather(path: Path, folder: Path) -> None:
    from da3cog.serve.media import gather_views

    gather_views(
        path, (), folder, video_fps=1.0, max_frames=2, limits=Limits(), progress=lambda _: None
    )


@FUZZ
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=2048))
def test_fuzz_any_bytes_as_the_image_input(tmp_path: Path, prefix: bytes, body: bytes) -> None:
    target = tmp_path / secrets.token_hex(4)
    target.mkdir()
    (target / "input").write_bytes(prefix + body)
    try:
        _gather(target / "input", target / "views")
    except RequestError:
        pass
    # Whatever happened, nothing was written outside the request's folder.
    assert {p.name for p in target.iterdir()} <= {"input", "views"}


@FUZZ
@given(
    members=st.dictionaries(
        st.text(alphabet="ab./\\_-.", min_size=1, max_size=12).map(lambda s: s + ".png"),
        st.one_of(st.binary(max_size=256), st.just(PNG), st.just(hostile.EPS)),
        max_size=4,
    ),
    cut=st.floats(0.3, 1.0),
)
def test_fuzz_zip_archives(tmp_path: Path, members: dict[str, bytes], cut: float) -> None:
    target = tmp_path / secrets.token_hex(4)
    target.mkdir()
    data = hostile.zip_of(members)
    (target / "input.zip").write_bytes(hostile.truncated(data, cut) if cut < 1 else data)
    try:
        _gather(target / "input.zip", target / "views")
    except RequestError:
        pass
    # Whatever happened, nothing was written outside the request's folder.
    assert {p.name for p in target.iterdir()} <= {"input.zip", "views"}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["intrinsics", "extrinsics", "views", "K", "world_to_camera", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=30,
)


@FUZZ
@given(document=JSON_VALUES, views=st.integers(1, 3))
def test_fuzz_cameras_json(tmp_path: Path, document: object, views: int) -> None:
    import json

    from da3cog.serve.request import read_cameras

    path = tmp_path / f"{secrets.token_hex(4)}.json"
    path.write_text(json.dumps(document))
    try:
        cameras = read_cameras(path, views)
    except RequestError:
        return
    assert cameras.intrinsics is not None or cameras.extrinsics is not None
