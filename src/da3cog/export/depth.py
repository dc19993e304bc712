"""Depth and confidence maps as float32 ``.npy``, one file per view."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from da3cog.export.files import write_atomically
from da3cog.pipeline import Prediction


def export_depth_npy(prediction: Prediction, folder: Path) -> list[Path]:
    """Write ``depth_0000_<name>.npy`` and ``confidence_0000_<name>.npy`` per view."""
    written = []
    for index, view in enumerate(prediction.views):
        for kind, array in (("depth", view.depth), ("confidence", view.confidence)):
            path = folder / f"{kind}_{index:04d}_{view.name}.npy"

            def save(target: Path, array: np.ndarray = array) -> None:
                with target.open("wb") as handle:
                    np.save(handle, np.asarray(array, dtype=np.float32))

            written.append(write_atomically(path, save))
    return written
