"""The heads' tail helper: the same result as one batched call for every group size, images
kept paired; and the networks give the same outputs whatever number of views their head tails
run on at once (the GPU batches them, the CPU runs them one at a time)."""

from __future__ import annotations

import pytest
import torch
from small_zoo import NESTED_SMALL
from torch import nn

from da3cog.model.dpt_blocks import views_at_a_time
from da3cog.model.network import build_network


@pytest.mark.parametrize("views", [1, 2, 3, 5])
def test_views_at_a_time_matches_the_batched_call(views: int) -> None:
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
            views_at_a_time(tail, views, features, images),
            tail(features, images),
            rtol=0,
            atol=1e-5,
        )


def test_views_at_a_time_keeps_the_images_paired() -> None:
    first, second = torch.arange(5.0)[:, None], 10 * torch.arange(5.0)[:, None]
    assert views_at_a_time(torch.add, 2, first, second).flatten().tolist() == [0, 11, 22, 33, 44]


@pytest.mark.parametrize(("sizes", "views"), [((2, 3), 1), ((3, 4), 2)])
def test_views_at_a_time_refuses_batches_of_different_sizes(sizes: tuple, views: int) -> None:
    # (3, 4) in groups of 2 split into as many groups: only the sizes tell them apart.
    with pytest.raises(ValueError, match="different sizes"):
        views_at_a_time(torch.add, views, torch.zeros(sizes[0], 1), torch.zeros(sizes[1], 1))


def test_views_at_a_time_refuses_empty_groups() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        views_at_a_time(torch.neg, 0, torch.zeros(2, 1))


def test_network_outputs_do_not_depend_on_how_many_head_tails_run_at_once() -> None:
    """Nested stand-in (any-view DualDPT + Gaussian head + the metric branch's DPT head), 10
    views: more than one head chunk of 8, and tails one at a time, 3 at a time (groups that
    do not divide the chunk) and all 10 at once (one head pass over every view)."""
    torch.manual_seed(0)
    network = build_network(NESTED_SMALL).eval()
    images = torch.randn(1, 10, 3, 42, 56, generator=torch.Generator().manual_seed(1))

    def run(head_views: int):
        with torch.inference_mode():
            return network(
                images,
                infer_gaussians=True,
                generator=torch.Generator().manual_seed(2),
                head_views=head_views,
            )

    reference = run(1)
    for head_views in (3, 10):
        output = run(head_views)
        for name in ("depth", "depth_conf", "extrinsics", "intrinsics", "rays", "ray_conf"):
            torch.testing.assert_close(
                getattr(output, name), getattr(reference, name), rtol=1e-5, atol=1e-6
            )
        torch.testing.assert_close(
            output.gaussians.means, reference.gaussians.means, rtol=1e-5, atol=1e-6
        )


def test_network_refuses_no_head_views() -> None:
    network = build_network(NESTED_SMALL).eval()
    with pytest.raises(ValueError, match="head_views"):
        network(torch.zeros(1, 1, 3, 28, 28), head_views=0)
