"""The heads' per-image tail helper: the same result as one batched call, images kept paired."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from da3cog.model.dpt_blocks import one_image_at_a_time


def test_one_image_at_a_time_matches_the_batched_call() -> None:
    generator = torch.Generator().manual_seed(0)
    convolution = nn.Conv2d(4, 3, 3, padding=1)
    features = torch.randn(3, 4, 20, 24, generator=generator)
    images = torch.randn(3, 3, 20, 24, generator=generator)

    def tail(feature: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(convolution(feature)) + image

    with torch.inference_mode():
        # Equal up to float rounding: the CPU backend may pick another convolution algorithm
        # for one image than for three.
        torch.testing.assert_close(
            one_image_at_a_time(tail, features, images), tail(features, images), rtol=0, atol=1e-5
        )


def test_one_image_at_a_time_refuses_batches_of_different_sizes() -> None:
    with pytest.raises(ValueError):
        one_image_at_a_time(torch.add, torch.zeros(2, 1), torch.zeros(3, 1))
