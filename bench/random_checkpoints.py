"""Random-weight Hub-layout checkpoints for the benchmarks, written once under
``bench/.cache/`` by the test oracle (``tests/oracle.save_checkpoint``, seed 0)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
MODEL_NAMES = {
    "small": "da3-small",
    "base": "da3-base",
    "large": "da3-large",
    "giant": "da3-giant",
    "nested": "da3nested-giant-large",
}


def checkpoint(preset: str) -> Path:
    """The folder of ``preset`` (``da3-small``...), written on first use."""
    folder = CACHE / f"{preset}-random"
    if not (folder / "model.safetensors").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from oracle import save_checkpoint

        save_checkpoint(preset, folder, 0)
    return folder
