"""Transformer building blocks shared by the backbone and the camera encoder.

Submodule names (``attn.qkv``, ``ls1.gamma``, ``mlp.fc1`` / ``mlp.w12`` ...) are the official
checkpoints' key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from da3cog.model.presets import FeedForward

# (cos_rows, sin_rows, cos_cols, sin_cols)
RopeTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class RopePositions:
    """Integer ``(row, col)`` token positions ``(B, N, 2)`` of one forward pass, with the
    cos/sin tables that all of that pass's RoPE blocks share: computed on first use for each
    (frequency, head width, dtype) instead of twice (q and k) in every block."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self._tables: dict[tuple[float, int, torch.dtype], RopeTables] = {}

    def tables(self, frequency: float, dim: int, dtype: torch.dtype) -> RopeTables:
        """``(cos_rows, sin_rows, cos_cols, sin_cols)``, each ``(B, 1, N, dim)`` in ``dtype``,
        for rotating ``dim`` channels by the rows and ``dim`` by the columns."""
        key = (frequency, dim, dtype)
        if key not in self._tables:
            exponents = torch.arange(0, dim, 2, device=self.positions.device).float() / dim
            inverse_frequency = 1.0 / (frequency**exponents)
            rows, cols = (
                self._cos_sin(self.positions[..., axis], inverse_frequency, dtype)
                for axis in (0, 1)
            )
            self._tables[key] = (*rows, *cols)
        return self._tables[key]

    @staticmethod
    def _cos_sin(
        positions: torch.Tensor, inverse_frequency: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(inverse_frequency.dtype)[..., None] * inverse_frequency
        angles = torch.cat((angles, angles), dim=-1).to(dtype)
        return angles.cos()[:, None], angles.sin()[:, None]


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding: the first half of each head's channels rotates with the
    token's row, the second half with its column.

    Tokens ``(B, heads, N, head_dim)``; positions a :class:`RopePositions` of ``(B, N, 2)``.
    """

    def __init__(self, frequency: float) -> None:
        super().__init__()
        self.frequency = frequency

    @staticmethod
    def _rotate_1d(tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = tokens.shape[-1] // 2
        first, second = tokens[..., :half], tokens[..., half:]
        return tokens * cos + torch.cat((-second, first), dim=-1) * sin

    def forward(self, tokens: torch.Tensor, positions: RopePositions) -> torch.Tensor:
        rows, cols = tokens.chunk(2, dim=-1)
        cos_rows, sin_rows, cos_cols, sin_cols = positions.tables(
            self.frequency, rows.shape[-1], tokens.dtype
        )
        return torch.cat(
            (self._rotate_1d(rows, cos_rows, sin_rows), self._rotate_1d(cols, cos_cols, sin_cols)),
            dim=-1,
        )


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-LayerNorm and 2-D RoPE."""

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding2D | None
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm: nn.Module = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)
        self.rope = rope

    def forward(self, x: torch.Tensor, positions: RopePositions | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and positions is not None:
            q = self.rope(q, positions)
            k = self.rope(k, positions)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Two-layer GELU perceptron."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (DINOv2 giant); the hidden width is 2/3 of the MLP width rounded up
    to a multiple of 8, as in DINOv2's fused SwiGLU."""

    def __init__(self, dim: int, mlp_hidden: int) -> None:
        super().__init__()
        hidden = (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        feed_forward: FeedForward = "mlp",
        norm_eps: float = 1e-6,
        layer_scale: float = 1.0,
        qk_norm: bool = False,
        rope: RotaryEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp: nn.Module = (
            SwiGLU(dim, hidden) if feed_forward == "swiglu" else Mlp(dim, hidden, dim)
        )
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, x: torch.Tensor, positions: RopePositions | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), positions))
        return x + self.ls2(self.mlp(self.norm2(x)))
