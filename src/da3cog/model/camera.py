"""Camera encoder (poses in -> camera tokens) and camera decoder (camera token -> pose).

Both speak DA3's 9-number pose encoding: camera-to-world translation (3), camera-to-world
rotation as a scalar-last quaternion (4), vertical and horizontal field of view in radians (2).
"""

from __future__ import annotations

import torch
from torch import nn

from da3cog.geometry import (
    field_of_view_intrinsics,
    invert_rigid,
    matrix_to_quaternion,
    quaternion_to_matrix,
)
from da3cog.model.transformer import Block, Mlp

POSE_ENCODING_DIM = 9


def encode_pose(
    extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_hw: tuple[int, int]
) -> torch.Tensor:
    """World-to-camera ``(B, S, 4, 4)`` + intrinsics ``(B, S, 3, 3)`` (pixels of an image of
    ``image_hw``) -> pose encodings ``(B, S, 9)``."""
    camera_to_world = invert_rigid(extrinsics)
    height, width = image_hw
    fov_y = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_x = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat(
        [
            camera_to_world[..., :3, 3],
            matrix_to_quaternion(camera_to_world[..., :3, :3]),
            fov_y[..., None],
            fov_x[..., None],
        ],
        dim=-1,
    ).float()


def decode_pose(
    encoding: torch.Tensor, image_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose encodings ``(B, S, 9)`` -> world-to-camera ``(B, S, 3, 4)`` and intrinsics
    ``(B, S, 3, 3)`` in pixels of an image of ``image_hw`` (principal point at the centre)."""
    camera_to_world = torch.cat(
        [quaternion_to_matrix(encoding[..., 3:7]), encoding[..., :3, None]], dim=-1
    )
    intrinsics = field_of_view_intrinsics(*image_hw, fov_y=encoding[..., 7], fov_x=encoding[..., 8])
    return invert_rigid(camera_to_world), intrinsics


class CameraEncoder(nn.Module):
    """Known cameras -> one token per view that replaces the learned camera token."""

    def __init__(self, dim: int, depth: int = 4, num_heads: int = 16) -> None:
        super().__init__()
        self.pose_branch = Mlp(POSE_ENCODING_DIM, dim // 2, dim)
        self.token_norm = nn.LayerNorm(dim)
        self.trunk = nn.Sequential(
            *(Block(dim, num_heads, norm_eps=1e-5, layer_scale=0.01) for _ in range(depth))
        )
        self.trunk_norm = nn.LayerNorm(dim)

    def forward(
        self, extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_hw: tuple[int, int]
    ) -> torch.Tensor:
        """World-to-camera ``(B, S, 4, 4)`` and intrinsics ``(B, S, 3, 3)`` -> ``(B, S, dim)``."""
        tokens = self.token_norm(self.pose_branch(encode_pose(extrinsics, intrinsics, image_hw)))
        return self.trunk_norm(self.trunk(tokens))


class CameraDecoder(nn.Module):
    """Camera token -> pose encoding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU()
        )
        self.fc_t = nn.Linear(dim, 3)
        self.fc_qvec = nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, camera_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, S, dim)`` -> ``(B, S, 9)``."""
        hidden = self.backbone(camera_tokens).float()
        return torch.cat([self.fc_t(hidden), self.fc_qvec(hidden), self.fc_fov(hidden)], dim=-1)
