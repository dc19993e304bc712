"""The real ``predict.py`` Runner for the cog server tests, with two test-only additions.

* The ViT-S stand-ins of ``small_zoo`` (``small-gs``: da3-small with the giant's Gaussian
  head; ``metric-small``; ``nested-small``) are registered as presets, so Hub-layout folders
  that name them in their config.json load like the official checkpoints they stand in for
  (the tests put them at ``$DA3COG_WEIGHTS_DIR/da3-giant`` and so on).
* While the file named by ``$DA3COG_TEST_HOLD_FILE`` exists, every prediction waits before
  it starts (polling in short steps), so a test can hold a request open to check 409, then
  cancel it between two pipeline stages.

The cog server loads this file as ``tests/cog_standin.py:Runner``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from small_zoo import SMALL_ZOO  # noqa: E402

from da3cog.model.presets import PRESETS  # noqa: E402
from da3cog.pipeline import DepthAnything3  # noqa: E402
from da3cog.serve.models import STAND_INS  # noqa: E402

PRESETS.update(SMALL_ZOO)
# Each stands in for the official checkpoint whose override folder the tests put it in.
STAND_INS.update(
    {
        "small-gs": "da3-giant",
        "nested-small": "da3nested-giant-large",
        "metric-small": "da3metric-large",
    }
)

HOLD_ENV = "DA3COG_TEST_HOLD_FILE"
_predict = DepthAnything3.predict


def _held_predict(self, *args, **kwargs):
    """The pipeline's predict, after waiting while the hold file exists."""
    hold = os.environ.get(HOLD_ENV)
    deadline = time.monotonic() + 60
    while hold and Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _predict(self, *args, **kwargs)


DepthAnything3.predict = _held_predict  # type: ignore[method-assign]

_spec = importlib.util.spec_from_file_location("predict", ROOT / "predict.py")
_module = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["predict"] = _module
_spec.loader.exec_module(_module)  # type: ignore[union-attr]
Runner = _module.Runner
