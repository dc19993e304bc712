"""Reference-view selection: which view's camera anchors DA3's multi-view reasoning.

From three views on (and only without pose conditioning), the network moves one view to the
front before the first cross-view block; its camera token becomes the reference token.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

ReferenceStrategy = Literal["saddle_balanced", "saddle_sim_range", "first", "middle"]
REFERENCE_STRATEGIES: tuple[str, ...] = get_args(ReferenceStrategy)

# Fewer views than this keep their order.
MIN_VIEWS_FOR_SELECTION = 3


def check_strategy(strategy: str) -> None:
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(
            f"unknown reference-view strategy {strategy!r}; "
            f"choose one of {', '.join(REFERENCE_STRATEGIES)}"
        )


def _min_max_normalize(metric: torch.Tensor) -> torch.Tensor:
    low = metric.min(dim=1, keepdim=True).values
    high = metric.max(dim=1, keepdim=True).values
    return (metric - low) / (high - low + 1e-8)


def select_reference_view(class_tokens: torch.Tensor, strategy: ReferenceStrategy) -> torch.Tensor:
    """Index ``(B,)`` of the reference view from per-view class tokens ``(B, S, C)``.

    ``saddle_balanced`` picks the view whose mean similarity to the others, token norm and
    token variance are each closest to the middle of their range across views;
    ``saddle_sim_range`` the view with the widest spread of similarities to the others.
    """
    check_strategy(strategy)
    batch, views, _ = class_tokens.shape
    device = class_tokens.device
    if views <= 1 or strategy == "first":
        return torch.zeros(batch, dtype=torch.long, device=device)
    if strategy == "middle":
        return torch.full((batch,), views // 2, dtype=torch.long, device=device)

    unit = class_tokens / class_tokens.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(1, 2)
    similarity = similarity - torch.eye(views, device=device).unsqueeze(0)
    if strategy == "saddle_sim_range":
        spread = similarity.max(dim=-1).values - similarity.min(dim=-1).values
        return spread.argmax(dim=1)
    mean_similarity = similarity.sum(dim=-1) / (views - 1)
    balance = (
        (_min_max_normalize(mean_similarity) - 0.5).abs()
        + (_min_max_normalize(class_tokens.norm(dim=-1)) - 0.5).abs()
        + (_min_max_normalize(unit.var(dim=-1)) - 0.5).abs()
    )
    return balance.argmin(dim=1)


def reference_first_order(reference: torch.Tensor, views: int) -> torch.Tensor:
    """``(B, S)`` gather indices that move view ``reference[b]`` to the front and keep the
    others in their order."""
    positions = torch.arange(views, device=reference.device).unsqueeze(0)
    shifted = torch.where(
        (positions > 0) & (positions <= reference[:, None]), positions - 1, positions
    )
    shifted[:, 0] = reference
    return shifted


def gather_views(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Reorder the view axis of ``x (B, S, ...)`` by ``order (B, S)``."""
    batch = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[batch, order]


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation undoing ``order``."""
    inverse = torch.empty_like(order)
    inverse.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return inverse
