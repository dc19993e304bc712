"""Two small photos shipped with the package, so a first run needs no files of one's own
(``da3cog predict --sample``).

* ``rocket.jpg``: a Falcon 9 on its launch pad, captured by SpaceX and released into the
  public domain (via scikit-image's sample data, ``skimage.data.rocket``).
* ``coffee.jpg``: a cup of coffee, CC0 by the photographer, Rachel Michetti (via
  scikit-image's sample data, ``skimage.data.coffee``).

Both are downscaled to 480 px on the longer side (JPEG, quality 88).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_NAMES: tuple[str, ...] = ("rocket.jpg", "coffee.jpg")


def sample_paths() -> list[Path]:
    """The bundled sample photos, as files on disk."""
    folder = resources.files(__package__)
    paths = [Path(str(folder / name)) for name in SAMPLE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the package's sample photos are missing: {', '.join(missing)}")
    return paths
