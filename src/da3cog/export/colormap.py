"""Perceptual colormaps from small embedded look-up tables (no matplotlib).

Each table holds 33 RGB colours sampled evenly from matplotlib's colormap of the same name
(indices 0, 8, ..., 248, 255 of its 256 entries), interpolated linearly to 1024 levels: within a
few 8-bit steps of the full map.
"""

from __future__ import annotations

import functools

import numpy as np

_TABLES = {
    # Google's Turbo (Apache-2.0), via matplotlib.
    "turbo": (
        "30123b392a734040a24456c7466be34680f64294ff37a8fa28bceb1ccdd818ddc2"
        "1fe9af32f2984ef97d6dfe628bff4ba4fc3cb9f635cdec34dfdf37eecf3af8be39"
        "fdac34fe962bfb7e21f46617eb500edf3f08d02f05be2102a91601920b017a0403"
    ),
    # viridis (CC0), by van der Walt, Smith and Firing.
    "viridis": (
        "440154470d6048186a482374472d7b4537814240863e49893b528b375b8d33638d"
        "2f6b8e2c728e297a8e26828e23898e21918c1f988b1fa08822a78528ae8032b67a"
        "3fbc734ec36b5ec96270cf5784d44b98d83eaddc30c2df23d8e219ece51bfde725"
    ),
}
COLORMAPS: tuple[str, ...] = tuple(_TABLES)


_LEVELS = 1024


@functools.cache
def _table(name: str) -> np.ndarray:
    """The colormap interpolated to ``_LEVELS`` uint8 colours."""
    if name not in _TABLES:
        raise ValueError(f"unknown colormap {name!r}: choose one of {', '.join(COLORMAPS)}")
    table = np.frombuffer(bytes.fromhex(_TABLES[name]), dtype=np.uint8).reshape(-1, 3)
    positions = np.linspace(0.0, 1.0, len(table))
    levels = np.linspace(0.0, 1.0, _LEVELS)
    dense = np.stack([np.interp(levels, positions, table[:, c]) for c in range(3)], axis=-1)
    return np.round(dense).astype(np.uint8)


def apply_colormap(values: np.ndarray, name: str = "turbo") -> np.ndarray:
    """Colours for ``values`` in ``[0, 1]`` (clipped; NaN counts as 0): ``(..., 3)`` uint8."""
    table = _table(name)
    scaled = np.asarray(values, dtype=np.float32) * np.float32(_LEVELS - 1)
    if np.isnan(scaled).any():
        scaled = np.nan_to_num(scaled, nan=0.0)
    np.clip(scaled, 0.0, _LEVELS - 1, out=scaled)
    scaled += np.float32(0.5)  # round half up by truncation (all values are >= 0 here)
    return table.take(scaled.astype(np.intp), axis=0)
