"""Shared fixtures: one small random-weight checkpoint per session, the model loaded from it, and
a few real photos."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import skimage.data
import torch

if TYPE_CHECKING:
    from da3cog.pipeline import DepthAnything3


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hub-layout ``da3-small`` checkpoint folder (config.json + model.safetensors) written by
    the upstream oracle with seeded random weights."""
    from oracle import save_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints") / "da3-small"
    save_checkpoint("da3-small", folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def small_model(small_checkpoint: Path) -> DepthAnything3:
    """The da3cog pipeline loaded from :func:`small_checkpoint` on the CPU."""
    from da3cog.pipeline import DepthAnything3

    return DepthAnything3.from_pretrained(small_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def small_zoo_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[Path, torch.nn.Module]]:
    """``small_zoo_checkpoint("nested-small")``: a Hub-layout folder of one of
    ``oracle.small_configs`` written by upstream with seeded random weights, and upstream's
    network; made once per session."""
    from oracle import save_checkpoint

    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in made:
            folder = tmp_path_factory.mktemp("small-zoo") / name
            made[name] = (folder, save_checkpoint(name, folder, seed=11).model.eval())
        return made[name]

    return get


@functools.cache
def _photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    image.flags.writeable = False
    return image


@pytest.fixture(scope="session")
def photo() -> Callable[[str], np.ndarray]:
    """``photo("astronaut")``: a read-only ``uint8`` image from scikit-image's bundled data."""
    return _photo
