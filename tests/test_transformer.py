"""The 2-D RoPE against an independent formula, and its tables shared across one forward."""

from __future__ import annotations

import math

import pytest
import torch

from da3cog.model import transformer
from da3cog.model.transformer import RopePositions, RotaryEmbedding2D
from da3cog.pipeline import DepthAnything3


def rotate_pairs(channels: torch.Tensor, positions: torch.Tensor, frequency: float) -> torch.Tensor:
    """Channel ``i`` and ``i + half`` of ``channels (N, 2*half)`` rotated as a complex number by
    ``position * frequency ** (-2i / (2*half))``, one token at a time (float64)."""
    half = channels.shape[-1] // 2
    out = torch.empty_like(channels)
    for token, position in enumerate(positions.tolist()):
        for i in range(half):
            angle = position * frequency ** (-2 * i / (2 * half))
            x, y = channels[token, i].item(), channels[token, i + half].item()
            out[token, i] = x * math.cos(angle) - y * math.sin(angle)
            out[token, i + half] = x * math.sin(angle) + y * math.cos(angle)
    return out


def test_rope_rotates_rows_then_columns() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 2, 5, 16, generator=generator, dtype=torch.float64)
    positions = torch.randint(0, 9, (1, 5, 2), generator=generator)
    rotated = RotaryEmbedding2D(100.0)(tokens, RopePositions(positions))
    for head in range(2):
        rows, cols = tokens[0, head, :, :8], tokens[0, head, :, 8:]
        expected = torch.cat(
            (
                rotate_pairs(rows, positions[0, :, 0], 100.0),
                rotate_pairs(cols, positions[0, :, 1], 100.0),
            ),
            dim=-1,
        )
        # The angles are float32 (as upstream's): about 1e-7 rad of rounding at these positions.
        torch.testing.assert_close(rotated[0, head], expected, rtol=0, atol=2e-6)


def test_rope_tables_are_computed_once_per_forward(
    small_model: DepthAnything3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every RoPE block of a forward reuses one table set per position grid (local, global)."""
    created: list[RopePositions] = []
    original_init = RopePositions.__init__

    def recording_init(self: RopePositions, positions: torch.Tensor) -> None:
        original_init(self, positions)
        created.append(self)

    monkeypatch.setattr(transformer.RopePositions, "__init__", recording_init)
    network = small_model.network
    with torch.inference_mode():
        network(torch.randn(1, 2, 3, 56, 70))
    assert len(created) == 2  # the local and the global grid
    assert all(len(positions._tables) == 1 for positions in created)
