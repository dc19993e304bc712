"""The Gaussian adapter: per-pixel raw GS-head outputs + depth + cameras -> 3D Gaussians in the
world frame of the given cameras.

Reproduces the official adapter (``gs_adapter.py``, giant config: SH degree 2, predicted
spherical harmonics rather than colours, predicted depth and xy offsets, scales in
``[1e-5, 30]``) number for number, including its conventions the GS head was trained with:

* a Gaussian's centre lies at distance ``depth + offset`` along its pixel's (unit) ray, so the
  depth is used as a ray length here, not as the z coordinate it is elsewhere;
* the rotation channels are read as ``(x, y, z, w)``, reordered to ``(w, x, y, z)`` and then
  converted with a scalar-last routine, rotated to the world, and written back scalar-last;
  official renderers (gsplat, 3DGS PLY ``rot_0..3``) then read these four numbers as
  ``(w, x, y, z)``. We keep the numbers, so that what a renderer shows is what upstream shows;
* spherical harmonics are rotated to the world in e3nn's real basis after a fixed change of
  axes (see :func:`harmonic_rotations`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from da3cog.geometry import (
    as_homogeneous,
    invert_rigid,
    matrix_to_quaternion,
    quaternion_to_matrix,
)

SH_DEGREE = 2
SH_COEFFICIENTS = (SH_DEGREE + 1) ** 2
SCALE_MIN = 1e-5
SCALE_MAX = 30.0
# Gaussian scales are in units of (depth x pixel footprint): 0.1 x (1/fx + 1/fy) per unit depth.
_SCALE_PER_PIXEL = 0.1
_QUATERNION_EPS = 1e-8
# Layout of the 37 raw channels: xy offset in pixels (2), scales (3), rotation (4), SH (3 x 9,
# colour-major), depth offset (1).
_OFFSET_XY = slice(0, 2)
_SCALES = slice(2, 5)
_ROTATION = slice(5, 9)
_HARMONICS = slice(9, 9 + 3 * SH_COEFFICIENTS)
_DEPTH_OFFSET = 9 + 3 * SH_COEFFICIENTS
RAW_CHANNELS = _DEPTH_OFFSET + 1

# Degree-l coefficients are damped by 0.1 * 0.25**l, so the DC term dominates as trained.
_SH_MASK = torch.tensor(
    [
        0.1 * 0.25**degree if degree else 1.0
        for degree in range(SH_DEGREE + 1)
        for _ in range(2 * degree + 1)
    ]
)

# The official adapter rotates SH with e3nn's Wigner matrices D(alpha, -beta, gamma) of the Euler
# angles of P^-1 R P (P: its "yzx -> xyz" axis permutation). Negating the middle angle of e3nn's
# Y-X-Y convention conjugates by diag(1, -1, 1); together that is e3nn's representation of
# Q R Q^T with this fixed Q = diag(1, -1, 1) P^T, which we evaluate in closed form.
_AXES = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def _degree_two_basis() -> torch.Tensor:
    """e3nn's real degree-2 harmonics as quadratic forms ``Y_m(v) = v^T B_m v``: ``(5, 3, 3)``
    symmetric, traceless, mutually orthogonal and of equal Frobenius norm."""
    half15, root5 = math.sqrt(15) / 2, math.sqrt(5)
    basis = torch.zeros(5, 3, 3, dtype=torch.float64)
    basis[0, 0, 2] = basis[0, 2, 0] = half15  # sqrt(15) x z
    basis[1, 0, 1] = basis[1, 1, 0] = half15  # sqrt(15) x y
    basis[2] = root5 * torch.diag(torch.tensor([-0.5, 1.0, -0.5], dtype=torch.float64))
    basis[3, 1, 2] = basis[3, 2, 1] = half15  # sqrt(15) y z
    basis[4] = half15 * torch.diag(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    return basis


_DEGREE_TWO = _degree_two_basis()


@dataclass(frozen=True)
class GaussianParameters:
    """What the GS head predicts for ``B`` scenes of ``S`` views of ``H x W`` pixels, and the
    depth the Gaussians sit on.

    Attributes:
        raw: ``(B, S, H, W, 37)`` camera-space raw parameters (layout in this module).
        opacities: ``(B, S, H, W)`` in (0, 1) (upstream's pdf-to-opacity map is the identity at
            its default exponent).
        depth: ``(B, S, H, W)`` depth in the unit of the cameras the Gaussians will be placed
            with (before any sky filling).
        unit_scale: ``(B,)`` factor from the network's own depth unit to ``depth``'s unit; the
            predicted depth offsets are multiplied by it, so a rescaled scene stays one scene.
    """

    raw: torch.Tensor
    opacities: torch.Tensor
    depth: torch.Tensor
    unit_scale: torch.Tensor

    def rescaled(self, factor: torch.Tensor) -> GaussianParameters:
        """The same Gaussians in a unit ``factor`` ``(B,)`` times smaller (depth x factor)."""
        return GaussianParameters(
            raw=self.raw,
            opacities=self.opacities,
            depth=self.depth * factor[:, None, None, None],
            unit_scale=self.unit_scale * factor,
        )


@dataclass(frozen=True)
class Gaussians:
    """3D Gaussians, one per pixel, in the world frame and unit of the cameras they were built
    with; per-view layout ``(B, S, H, W, ...)``.

    Attributes:
        means: ``(..., 3)`` centres.
        scales: ``(..., 3)`` standard deviations along the Gaussian's axes (not log).
        rotations: ``(..., 4)`` unit quaternions in the order 3DGS renderers read them,
            ``(w, x, y, z)`` (see the module docstring).
        harmonics: ``(..., 3, 9)`` RGB spherical-harmonic coefficients, degree 2, in the world
            frame (3DGS ordering and basis).
        opacities: ``(...)`` in (0, 1).
    """

    means: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    harmonics: torch.Tensor
    opacities: torch.Tensor


def harmonic_rotations(rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Degree-1 ``(..., 3, 3)`` and degree-2 ``(..., 5, 5)`` SH rotation matrices for rotations
    ``(..., 3, 3)``, as the official adapter computes them (in float64 internally).

    With ``R' = Q R Q^T`` (the module's fixed axis change), degree 1 is ``R'`` itself (e3nn's
    degree-1 basis is ``(x, y, z)``) and degree 2 follows from ``Y(R' v) = D Y(v)`` for the
    quadratic forms ``B_m``: ``D_mn = <R'^T B_m R', B_n> / |B_n|^2``.
    """
    axes = _AXES.to(device=rotation.device, dtype=torch.float64)
    turned = axes @ rotation.double() @ axes.T
    basis = _DEGREE_TWO.to(rotation.device)
    norm = (basis[0] * basis[0]).sum()
    degree_two = torch.einsum("...ji,mjk,...kl,nil->...mn", turned, basis, turned, basis) / norm
    return turned.to(rotation.dtype), degree_two.to(rotation.dtype)


def rotate_harmonics(harmonics: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate SH coefficients ``(..., 3, 9)`` by rotations broadcastable to ``(..., 3, 3)``."""
    degree_one, degree_two = harmonic_rotations(rotation)
    return torch.cat(
        [
            harmonics[..., :1],
            torch.einsum("...ij,...cj->...ci", degree_one, harmonics[..., 1:4]),
            torch.einsum("...ij,...cj->...ci", degree_two, harmonics[..., 4:9]),
        ],
        dim=-1,
    )


# Pixels the adapter works on at once: its per-pixel temporaries (about 400 bytes a pixel,
# da3cog.memory counts them) for all views of a scene would outweigh the Gaussians themselves
# (152 bytes a pixel). Two views of 504x378; on a GPU a few more kernel launches.
ADAPTER_PIXELS = 1 << 19


def build_gaussians(
    parameters: GaussianParameters, extrinsics: torch.Tensor, intrinsics: torch.Tensor
) -> Gaussians:
    """World-space Gaussians from GS-head outputs and cameras, built a few views at a time
    (at most ``ADAPTER_PIXELS`` pixels, at least one view) into the output tensors, so the
    adapter's temporaries are bounded whatever the number of views.

    Args:
        parameters: raw outputs, opacities and depth, ``(B, S, H, W, ...)``.
        extrinsics: ``(B, S, 3|4, 4)`` world-to-camera (OpenCV axes) in ``parameters.depth``'s
            unit; the Gaussians come out in this world frame.
        intrinsics: ``(B, S, 3, 3)`` in pixels of the ``H x W`` image.
    """
    batch, views, height, width, channels = parameters.raw.shape
    if channels != RAW_CHANNELS:
        raise ValueError(f"expected {RAW_CHANNELS} raw Gaussian channels, got {channels}")
    step = max(1, ADAPTER_PIXELS // (batch * height * width))
    if step >= views:
        return _build_gaussians(parameters, extrinsics, intrinsics)

    def views_from(start: int) -> Gaussians:
        part = slice(start, start + step)
        return _build_gaussians(
            GaussianParameters(
                raw=parameters.raw[:, part],
                opacities=parameters.opacities[:, part],
                depth=parameters.depth[:, part],
                unit_scale=parameters.unit_scale,
            ),
            extrinsics[:, part],
            intrinsics[:, part],
        )

    first = views_from(0)
    names = [field.name for field in fields(Gaussians)]
    built = Gaussians(
        **{
            name: getattr(first, name).new_empty((batch, views, *getattr(first, name).shape[2:]))
            for name in names
        }
    )
    for start in range(0, views, step):
        piece = first if start == 0 else views_from(start)
        for name in names:
            getattr(built, name)[:, start : start + step] = getattr(piece, name)
    return built


def _build_gaussians(
    parameters: GaussianParameters, extrinsics: torch.Tensor, intrinsics: torch.Tensor
) -> Gaussians:
    """:func:`build_gaussians` of all the views at once."""
    raw = parameters.raw.float()
    batch, views, height, width, _ = raw.shape
    camera_to_world = invert_rigid(as_homogeneous(extrinsics.float()))
    rotation = camera_to_world[..., :3, :3]
    centre = camera_to_world[..., :3, 3]
    intrinsics = intrinsics.float()

    def per_view(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None, None]

    unit_scale = parameters.unit_scale.float()[:, None, None, None]
    depth = parameters.depth.float() + unit_scale * raw[..., _DEPTH_OFFSET]

    # Pixel centres (+0.5 convention) moved by the predicted offsets, unprojected to unit rays.
    device = raw.device
    offsets = raw[..., _OFFSET_XY]
    cols = torch.arange(width, device=device, dtype=raw.dtype) + 0.5
    rows = torch.arange(height, device=device, dtype=raw.dtype) + 0.5
    u = cols[None, None, None, :] + offsets[..., 0]
    v = rows[None, None, :, None] + offsets[..., 1]
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    inverse_k = torch.linalg.inv(intrinsics)
    rays = torch.einsum("bsij,bshwj->bshwi", inverse_k, pixels)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    world_rays = torch.einsum("bsij,bshwj->bshwi", rotation, rays)
    means = per_view(centre) + world_rays * depth[..., None]

    footprint = _SCALE_PER_PIXEL * (
        inverse_k[..., :2, :2] @ torch.ones(2, 1, device=device, dtype=raw.dtype)
    ).sum(dim=(-2, -1))
    scales = SCALE_MIN + (SCALE_MAX - SCALE_MIN) * torch.sigmoid(raw[..., _SCALES])
    scales = scales * depth[..., None] * per_view(footprint)[..., None]

    quaternion = raw[..., _ROTATION]
    quaternion = quaternion / (quaternion.norm(dim=-1, keepdim=True) + _QUATERNION_EPS)
    local = quaternion_to_matrix(quaternion[..., [3, 0, 1, 2]])
    rotations = matrix_to_quaternion(per_view(rotation) @ local)

    harmonics = raw[..., _HARMONICS].reshape(batch, views, height, width, 3, SH_COEFFICIENTS)
    harmonics = harmonics * _SH_MASK.to(device=device, dtype=raw.dtype)
    harmonics = rotate_harmonics(harmonics, per_view(rotation))

    return Gaussians(
        means=means,
        scales=scales,
        rotations=rotations,
        harmonics=harmonics,
        opacities=parameters.opacities.float(),
    )
