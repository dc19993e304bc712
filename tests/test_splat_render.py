"""The pure-torch splat renderer (:mod:`da3cog.export.splat_render`) against closed-form images
of single Gaussians, its compositing rules, and the ``gaussians_video`` export end to end; on a
machine with CUDA and gsplat, against gsplat itself."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_scene import add_gaussians, make_prediction, require

from da3cog.export import export_all
from da3cog.export.manifest import manifest_schema
from da3cog.export.splat_render import SH_C0, SH_C1, render_view, sh_colors, torch_rasterizer
from da3cog.export.video import default_rasterizer, gsplat_available, gsplat_problem

WIDTH, HEIGHT, FOCAL = 64, 48, 60.0
K = np.array([[FOCAL, 0.0, 32.0], [0.0, FOCAL * 1.1, 24.0], [0.0, 0.0, 1.0]])


def quaternion(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return np.array([math.cos(angle / 2), *(math.sin(angle / 2) * axis)])


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula (independent of the renderer's quaternion conversion)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def analytic_image(
    camera_point: np.ndarray,
    camera_covariance: np.ndarray,
    opacity: float,
    color: np.ndarray,
    background: np.ndarray,
) -> np.ndarray:
    """The closed-form splat: the 2D Gaussian of the perspective projection linearised at the
    centre (mean ``f x / z + c``, covariance ``J S J^T`` + 0.3 px^2) at pixel centres (+0.5),
    alpha clamped at 0.99 and dropped under 1/255, over the background."""
    x, y, z = camera_point
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    jacobian = np.array([[fx / z, 0, -fx * x / z**2], [0, fy / z, -fy * y / z**2]])
    covariance = jacobian @ camera_covariance @ jacobian.T + 0.3 * np.eye(2)
    mean = np.array([fx * x / z + cx, fy * y / z + cy])
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    d = np.stack([cols - mean[0], rows - mean[1]], axis=-1)
    mahalanobis = np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(covariance), d)
    alpha = np.minimum(0.99, opacity * np.exp(-0.5 * mahalanobis))
    alpha = np.where(alpha >= 1 / 255, alpha, 0.0)[..., None]
    return alpha * color + (1 - alpha) * background


def render_one(
    mean: np.ndarray,
    quat: np.ndarray,
    scale: np.ndarray,
    opacity: float,
    dc: np.ndarray,
    viewmat: np.ndarray,
    background: np.ndarray,
) -> np.ndarray:
    harmonics = np.zeros((1, 3, 9))
    harmonics[0, :, 0] = dc
    image = render_view(
        *(
            torch.tensor(np.asarray(a), dtype=torch.float32)
            for a in ([mean], [quat], [scale], [opacity], harmonics, viewmat, K)
        ),
        WIDTH,
        HEIGHT,
        background=torch.tensor(background, dtype=torch.float32),
    )
    assert image.shape == (HEIGHT, WIDTH, 3)
    return image.numpy().astype(np.float64)


# A camera turned and moved, so that the world-to-camera convention is part of the test.
TURN = rotation(np.array([0.2, 1.0, -0.3]), 0.4)
VIEWMAT = np.eye(4)
VIEWMAT[:3, :3], VIEWMAT[:3, 3] = TURN, [0.1, -0.2, 0.5]


def world_point(camera_point: np.ndarray) -> np.ndarray:
    return TURN.T @ (np.asarray(camera_point) - VIEWMAT[:3, 3])


@pytest.mark.parametrize(
    "camera_point", [np.array([0.0, 0.0, 3.0]), np.array([0.7, -0.45, 2.5])], ids=["centre", "off"]
)
def test_isotropic_gaussian_matches_the_closed_form(camera_point: np.ndarray) -> None:
    scale, opacity, dc = 0.08, 0.8, np.array([0.9, -0.3, 0.2])
    background = np.array([0.1, 0.2, 0.3])
    image = render_one(
        world_point(camera_point),
        quaternion(np.array([1.0, 2.0, 3.0]), 0.7),  # isotropic: any rotation
        np.full(3, scale),
        opacity,
        dc,
        VIEWMAT,
        background,
    )
    color = SH_C0 * dc + 0.5
    expected = analytic_image(camera_point, scale**2 * np.eye(3), opacity, color, background)
    np.testing.assert_allclose(image, expected, atol=2e-5)
    if camera_point[0] == 0:
        # At the centre J S J^T is (f s / z)^2 I: the image is the plain closed-form Gaussian.
        sigma2 = (K[0, 0] * scale / 3.0) ** 2 + 0.3
        row = image[HEIGHT // 2 - 1, :, 0]  # pixel centres y = 23.5: 0.5 px from the mean
        x = np.arange(WIDTH) + 0.5 - 32.0
        sy2 = (K[1, 1] * scale / 3.0) ** 2 + 0.3
        alpha = np.minimum(0.99, opacity * np.exp(-0.5 * (x**2 / sigma2 + 0.25 / sy2)))
        alpha = np.where(alpha >= 1 / 255, alpha, 0)
        np.testing.assert_allclose(row, alpha * color[0] + (1 - alpha) * background[0], atol=2e-5)
        assert image[:, :, 0].argmax() in {
            (HEIGHT // 2 - r) * WIDTH + WIDTH // 2 - c for r in (0, 1) for c in (0, 1)
        }


@pytest.mark.parametrize(
    "camera_point", [np.array([0.0, 0.0, 2.0]), np.array([-0.5, 0.3, 2.2])], ids=["centre", "off"]
)
def test_anisotropic_gaussian_matches_the_closed_form(camera_point: np.ndarray) -> None:
    axis, angle = np.array([0.3, -0.5, 1.0]), 0.9
    scales = np.array([0.12, 0.03, 0.06])
    background = np.zeros(3)
    image = render_one(
        world_point(camera_point),
        quaternion(axis, angle),
        scales,
        0.95,
        np.array([1.0, 1.0, 1.0]),
        VIEWMAT,
        background,
    )
    world_rotation = rotation(axis, angle)
    covariance = TURN @ world_rotation @ np.diag(scales**2) @ world_rotation.T @ TURN.T
    color = np.full(3, SH_C0 + 0.5)
    expected = analytic_image(camera_point, covariance, 0.95, color, background)
    np.testing.assert_allclose(image, expected, atol=2e-5)
    assert image.max() > 0.5  # the splat is well inside the picture


def test_a_near_opaque_gaussian_hides_a_far_one() -> None:
    # The far one first in the arrays: the renderer must sort by depth.
    means = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 2.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    scales = torch.full((2, 3), 1.0)
    opacities = torch.ones(2)
    harmonics = torch.full((2, 3, 1), -0.5 / SH_C0)  # colour C0 dc + 0.5 = 0
    harmonics[0, 2, 0] = 0.5 / SH_C0  # far: blue (0, 0, 1)
    harmonics[1, 0, 0] = 0.5 / SH_C0  # near: red (1, 0, 0)
    image = render_view(
        means, quats, scales, opacities, harmonics, torch.eye(4), torch.tensor(K).float(), 64, 48
    )
    centre = image[24, 32]
    # Red at alpha 0.99 (the clamp), then blue through the remaining 1%; the centre pixel's
    # centre (32.5, 24.5) is half a pixel from both means.
    alpha_near = min(0.99, math.exp(-0.5 * (0.25 / (30**2 + 0.3) + 0.25 / (33**2 + 0.3))))
    alpha_far = min(0.99, math.exp(-0.5 * (0.25 / (12**2 + 0.3) + 0.25 / (13.2**2 + 0.3))))
    expected = torch.tensor([alpha_near, 0.0, (1 - alpha_near) * alpha_far])
    torch.testing.assert_close(centre, expected, atol=1e-5, rtol=0)
    assert centre[0] > 0.98 and centre[2] < 0.01
    # Swapping the array order changes nothing.
    swapped = render_view(
        means.flip(0),
        quats,
        scales,
        opacities,
        harmonics.flip(0),
        torch.eye(4),
        torch.tensor(K).float(),
        64,
        48,
    )
    torch.testing.assert_close(swapped, image)


def test_sh_colours_follow_the_3dgs_basis() -> None:
    harmonics = torch.zeros(2, 3, 9)
    harmonics[:, :, 0] = torch.tensor([[1.0, -1.0, -3.0], [0.2, 0.0, 0.4]])
    direction = torch.nn.functional.normalize(torch.tensor([[0.3, -0.4, 0.8]] * 2), dim=-1)
    # Degree 0: C0 dc + 0.5, clamped at 0 from below (the third channel).
    zero = sh_colors(harmonics, direction, 0)
    expected = (SH_C0 * harmonics[:, :, 0] + 0.5).clamp_min(0)
    torch.testing.assert_close(zero, expected)
    assert zero[0, 2] == 0
    # Degree 1: - C1 y h1 + C1 z h2 - C1 x h3 on top, view dependent.
    harmonics[1, 0, 1:4] = torch.tensor([0.5, 0.25, -0.5])
    x, y, z = direction[1].tolist()
    one = sh_colors(harmonics, direction, 1)
    red = SH_C0 * 0.2 + SH_C1 * (-y * 0.5 + z * 0.25 + x * 0.5) + 0.5
    assert one[1, 0].item() == pytest.approx(red, abs=1e-6)
    # The renderer evaluates them for the direction from the camera centre (here a splat
    # covering the image, opacity ~1, seen along +z from the origin: x = y = 0, z = 1).
    colour = render_view(
        torch.tensor([[0.0, 0.0, 2.0]]),
        torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        torch.full((1, 3), 5.0),
        torch.ones(1),
        harmonics[1:],
        torch.eye(4),
        torch.tensor(K).float(),
        64,
        48,
    )[24, 32]
    assert colour[0].item() == pytest.approx(0.99 * (SH_C0 * 0.2 + SH_C1 * 0.25 + 0.5), abs=1e-4)


def test_background_shows_where_nothing_is() -> None:
    background = torch.tensor([0.25, 0.5, 0.75])
    means = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, 0.001], [50.0, 0.0, 1.0]])  # all unseen
    images = torch_rasterizer(
        means,
        torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3),
        torch.full((3, 3), 0.01),
        torch.ones(3),
        torch.ones(3, 3, 9),
        torch.eye(4)[None].repeat(2, 1, 1),
        torch.tensor(K).float()[None].repeat(2, 1, 1),
        64,
        48,
        background=background,
    )
    assert images.shape == (2, 48, 64, 3)
    torch.testing.assert_close(images, background.expand(2, 48, 64, 3))


def test_gaussians_video_export(tmp_path: Path) -> None:
    av = require("av")
    jsonschema = require("jsonschema")
    prediction = add_gaussians(make_prediction(views=2, size=(18, 24), names=["a", "b"]))
    manifest = export_all(
        prediction, tmp_path / "out", ["gaussians_video"], video_frames=6, gaussian_keep_nearest=1
    )
    jsonschema.Draft202012Validator(manifest_schema()).validate(manifest.document)
    (entry,) = manifest.by_role("gaussian_video")
    assert entry.path == tmp_path / "out" / "gaussians_flythrough.mp4"
    details = entry.details
    expected_renderer = "gsplat" if gsplat_available() else "torch"
    assert details["renderer"] == expected_renderer
    assert details["frames"] == 7  # 6 along the one segment, plus the last camera
    assert details["size"] == {"height": 18, "width": 24}
    with av.open(str(entry.path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 7 and frames[0].shape == (18, 24, 3)
    assert max(frame.max() for frame in frames) > 0  # something was rendered
    row = json.loads(manifest.path.read_text())["files"][0]
    assert row["role"] == "gaussian_video" and row["renderer"] == expected_renderer
    # Never part of "all" (slow on a CPU); asked for by name only.
    everything = export_all(prediction, tmp_path / "all", ["all"], max_points=100)
    assert not everything.by_role("gaussian_video")


def test_gaussians_video_of_one_view_orbits(tmp_path: Path) -> None:
    av = require("av")
    prediction = add_gaussians(make_prediction(views=1, size=(16, 20), names=["a"]))
    manifest = export_all(prediction, tmp_path / "out", ["gaussians_video"], video_frames=5)
    (entry,) = manifest.by_role("gaussian_video")
    assert entry.details["frames"] == 5
    with av.open(str(entry.path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_gaussians_video_without_pyav_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    prediction = add_gaussians(make_prediction(views=2, size=(16, 20), names=["a", "b"]))
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(ImportError, match="pip install av"):
        export_all(prediction, tmp_path / "out", ["gaussians_video"], video_frames=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gaussians_video_needs_gaussians(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no 3D Gaussians"):
        export_all(make_prediction(views=2, size=(16, 20)), tmp_path / "out", ["gaussians_video"])


def gsplat_reference_render(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    harmonics: torch.Tensor,
    viewmat: torch.Tensor,
    ks: torch.Tensor,
    width: int,
    height: int,
) -> torch.Tensor:
    """gsplat 1.5.3's own PyTorch reference of its rasteriser, on the CPU: its projection
    (covariance, EWA Jacobian clamp, eps2d = 0.3, radii, near plane), its tile intersection
    and depth sort and its spherical harmonics (``gsplat.cuda._torch_impl``; gsplat's test
    suite checks these against its CUDA kernels). Only the per-pixel compositing is written
    here, as gsplat's kernel does it (its torch version needs a CUDA call to list
    intersections): per tile, Gaussians front to back, alpha = min(0.999, o exp(-sigma)),
    skipped when sigma < 0 or alpha < 1/255, stopping before the Gaussian that would take the
    transmittance to 1e-4 or below; black background. Returns ``(H, W, 3)``."""
    impl = require("gsplat.cuda._torch_impl")
    tile = 16
    covariances, _ = impl._quat_scale_to_covar_preci(quats, scales, True, False, triu=False)
    radii, means2d, depths, conics, _ = impl._fully_fused_projection(
        means, covariances, viewmat[None], ks[None], width, height, eps2d=0.3
    )
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    _, isect_ids, flatten_ids = impl._isect_tiles(means2d, radii, depths, tile, tiles_x, tiles_y)
    offsets = impl._isect_offset_encode(isect_ids, 1, tiles_x, tiles_y).flatten().tolist()
    offsets.append(len(flatten_ids))
    directions = means[None] - torch.inverse(viewmat)[None, None, :3, 3][0]
    colors = impl._spherical_harmonics(2, directions, harmonics.transpose(1, 2)[None])
    colors = torch.clamp_min(colors + 0.5, 0.0)[0]
    means2d, conics = means2d[0], conics[0]
    image = torch.zeros(height, width, 3)
    for index in range(tiles_x * tiles_y):
        ids = flatten_ids[offsets[index] : offsets[index + 1]]
        row, col = divmod(index, tiles_x)
        ys = torch.arange(row * tile, min((row + 1) * tile, height))
        xs = torch.arange(col * tile, min((col + 1) * tile, width))
        if len(ids) == 0:
            continue
        py, px = (grid.flatten() for grid in torch.meshgrid(ys, xs, indexing="ij"))
        delta = torch.stack([px, py], dim=-1).float()[:, None, :] + 0.5 - means2d[ids][None]
        conic = conics[ids][None]
        sigma = 0.5 * (conic[..., 0] * delta[..., 0] ** 2 + conic[..., 2] * delta[..., 1] ** 2)
        sigma = sigma + conic[..., 1] * delta[..., 0] * delta[..., 1]
        alpha = torch.clamp_max(opacities[ids][None] * torch.exp(-sigma), 0.999)
        alpha = torch.where((sigma < 0) | (alpha < 1 / 255), torch.zeros_like(alpha), alpha)
        after = torch.cumprod(1 - alpha, dim=1)
        before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=1)
        image[py, px] = (alpha * before * (after > 1e-4)) @ colors[ids]
    return image


def random_scene(count: int = 300) -> dict[str, torch.Tensor]:
    """A seeded cloud of Gaussians about 3 units in front of the identity camera."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(count, 3, generator=generator) * torch.tensor([0.6, 0.4, 0.5])
    means[:, 2] += 3.0
    return {
        "means": means,
        "quats": torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1),
        "scales": torch.rand(count, 3, generator=generator) * 0.08 + 0.01,
        "opacities": torch.rand(count, generator=generator) * 0.9 + 0.05,
        "harmonics": torch.randn(count, 3, 9, generator=generator) * 0.4,
    }


def look(yaw: float, translation: tuple[float, float, float]) -> torch.Tensor:
    viewmat = torch.eye(4)
    viewmat[:3, :3] = torch.tensor(rotation(np.array([0.0, 1.0, 0.0]), yaw), dtype=torch.float32)
    viewmat[:3, 3] = torch.tensor(translation)
    return viewmat


@pytest.mark.parametrize(
    ("viewmat", "principal_point", "behind_and_large"),
    [
        (torch.eye(4), (32.0, 24.0), False),
        (look(0.3, (0.2, -0.1, 0.4)), (20.0, 30.0), False),
        (look(-0.5, (-0.3, 0.2, 0.1)), (32.0, 24.0), True),
    ],
    ids=["identity", "rotated-off-centre", "behind-camera-and-large"],
)
def test_torch_renderer_agrees_with_gsplats_reference_math(
    viewmat: torch.Tensor, principal_point: tuple[float, float], behind_and_large: bool
) -> None:
    """Same scene through our renderer and gsplat's reference (CPU): the conventions the
    CUDA comparison below relies on, checked where there is no GPU."""
    scene = random_scene()
    means, quats, scales = scene["means"], scene["quats"], scene["scales"]
    opacities, harmonics = scene["opacities"], scene["harmonics"]
    if behind_and_large:
        means[:20, 2] = -means[:20, 2]
        scales[20:30] *= 8  # each covers many tiles
    ks = torch.tensor(K, dtype=torch.float32)
    ks[0, 2], ks[1, 2] = principal_point
    ours = render_view(
        means, quats, scales, opacities, harmonics, viewmat, ks, WIDTH, HEIGHT, max_alpha=0.999
    )
    theirs = gsplat_reference_render(
        means, quats, scales, opacities, harmonics, viewmat, ks, WIDTH, HEIGHT
    )
    assert theirs.max() > 0.5  # the scene is in view
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.fixture
def fresh_gsplat_check():
    """gsplat_problem() keeps its answer for the process: start and end with none kept."""
    gsplat_problem.cache_clear()
    yield
    gsplat_problem.cache_clear()


def fake_gsplat(monkeypatch: pytest.MonkeyPatch, backend: types.ModuleType | None) -> None:
    """CUDA 'visible' and a stand-in gsplat package whose kernel backend is ``backend``
    (None: the backend module is missing, so importing it fails)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("gsplat", "gsplat.cuda"):
        package = types.ModuleType(name)
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, name, package)
    if backend is None:
        monkeypatch.delitem(sys.modules, "gsplat.cuda._backend", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", backend)


def test_gsplat_problem_without_cuda(
    monkeypatch: pytest.MonkeyPatch, fresh_gsplat_check: None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gsplat_problem() == "gsplat needs a CUDA GPU and none is visible"
    name, _, device = default_rasterizer()
    assert (name, device) == ("torch", torch.device("cpu"))


def test_gsplat_problem_when_its_kernels_are_not_built(
    monkeypatch: pytest.MonkeyPatch, fresh_gsplat_check: None
) -> None:
    backend = types.ModuleType("gsplat.cuda._backend")
    backend._C = None  # what gsplat leaves when it finds no nvcc
    fake_gsplat(monkeypatch, backend)
    assert "kernels are not built" in gsplat_problem()
    assert not gsplat_available()
    assert default_rasterizer()[0] == "torch"


def test_gsplat_problem_when_its_kernels_fail_to_load(
    monkeypatch: pytest.MonkeyPatch, fresh_gsplat_check: None
) -> None:
    fake_gsplat(monkeypatch, None)
    assert gsplat_problem().startswith("gsplat's CUDA kernels failed to build or load: ")


def test_gsplat_is_used_when_its_kernels_load(
    monkeypatch: pytest.MonkeyPatch, fresh_gsplat_check: None
) -> None:
    backend = types.ModuleType("gsplat.cuda._backend")
    backend._C = object()
    fake_gsplat(monkeypatch, backend)
    assert gsplat_problem() is None
    name, _, device = default_rasterizer()
    assert (name, device) == ("gsplat", torch.device("cuda"))


@pytest.mark.skipif(
    not gsplat_available(),
    reason=f"compares with gsplat's CUDA rasteriser: {gsplat_problem()}",
)
def test_torch_renderer_agrees_with_gsplat() -> None:
    from gsplat import rasterization

    scene = random_scene()
    means, quats, scales = scene["means"], scene["quats"], scene["scales"]
    opacities, harmonics = scene["opacities"], scene["harmonics"]
    viewmat = torch.eye(4)
    ks = torch.tensor(K, dtype=torch.float32)
    ours = render_view(
        means, quats, scales, opacities, harmonics, viewmat, ks, WIDTH, HEIGHT, max_alpha=0.999
    )
    cuda = torch.device("cuda")
    theirs, _, _ = rasterization(
        means.to(cuda),
        quats.to(cuda),
        scales.to(cuda),
        opacities.to(cuda),
        harmonics.transpose(1, 2).contiguous().to(cuda),
        viewmat[None].to(cuda),
        ks[None].to(cuda),
        WIDTH,
        HEIGHT,
        sh_degree=2,
    )
    difference = (ours - theirs[0].cpu()).abs()
    assert difference.mean() < 2e-3 and difference.max() < 0.05, difference.max()
