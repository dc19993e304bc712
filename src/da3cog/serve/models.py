"""Where the server's checkpoints come from, and which ones stay on the GPU.

Weights: ``$DA3COG_WEIGHTS_DIR/<spec>/`` (``config.json`` + ``model.safetensors``, e.g.
``da3-giant/`` for the newest release, ``da3-giant@1.0/`` for the first) when that folder
exists, which needs no network; otherwise the official Hub repo, downloaded with
huggingface_hub (hf-xet) into ``$DA3COG_CACHE_DIR`` (or the Hugging Face cache).

Models: loaded on first use and kept. On a GPU, loading or bringing back a model first moves
the least recently used others to CPU memory until the free GPU memory holds the new one plus
a working reserve (``$DA3COG_GPU_RESERVE_GB``, default 8), so any sequence of requests fits
while the common case keeps everything resident.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from da3cog import memory
from da3cog.model.presets import get_preset
from da3cog.pipeline import DepthAnything3, InferenceOptions
from da3cog.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    LoadedModel,
    default_cache_dir,
    hub_repo,
    load_model,
    read_preset,
    resolve_checkpoint,
    safetensors_elements,
    split_model_spec,
)

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "DA3COG_WEIGHTS_DIR"
GPU_RESERVE_ENV = "DA3COG_GPU_RESERVE_GB"
DEFAULT_GPU_RESERVE_GB = 8.0


def weights_dir() -> Path | None:
    """``$DA3COG_WEIGHTS_DIR`` if set."""
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value).expanduser() if value else None


# Presets an override folder may hold in another's place (stand-in -> the preset it stands in
# for). Empty in production: each folder must hold its own model. The cog server's tests
# register their small random-weight stand-ins here (tests/cog_standin.py).
STAND_INS: dict[str, str] = {}


def checkpoint_folder(spec: str) -> Path:
    """A local checkpoint folder for a model spec (``da3-giant``: the newest release,
    ``da3-giant@1.0``: that one): the override folder of that name if it exists, else a Hub
    download. CheckpointError names the repo and the override folder to use offline."""
    repo = hub_repo(*split_model_spec(spec))
    override_root = weights_dir()
    if override_root is not None:
        folder = override_root / spec
        if folder.is_dir():
            missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder} lacks {', '.join(missing)}")
            # The folder stands in for the Hub repo under that repo's name: it must hold that
            # model (mono weights in the metric folder would load, strictly, and be wrong).
            expected, found = get_preset(split_model_spec(spec)[0]).name, read_preset(folder).name
            if expected not in (found, STAND_INS.get(found)):
                raise CheckpointError(
                    f"{folder} holds a {found} checkpoint (by its {CONFIG_NAME}), not {expected}"
                )
            return folder
    try:
        return resolve_checkpoint(repo, default_cache_dir())
    except CheckpointError as error:
        where = (
            f"{override_root / spec}" if override_root is not None else f"${WEIGHTS_DIR_ENV}/{spec}"
        )
        raise CheckpointError(
            f"could not load {spec} from the Hugging Face Hub repo {repo} "
            f"({error}). To run without network, put its {CONFIG_NAME} and {WEIGHTS_NAME} in "
            f"{where} (set {WEIGHTS_DIR_ENV})."
        ) from error


def load_preset(spec: str, device: torch.device) -> LoadedModel:
    """Resolve and strictly load a model spec (see :func:`checkpoint_folder`) onto
    ``device``; it reports its Hub id as its model id, also when the override folder stands
    in for the Hub repo."""
    repo = hub_repo(*split_model_spec(spec))
    return load_model(checkpoint_folder(spec), device=device, model_id=repo)


def warm_up(model: DepthAnything3) -> float:
    """One small two-view request so the first real one pays no kernel selection or
    allocator growth; returns the seconds it took."""
    started = time.perf_counter()
    generator = np.random.default_rng(0)
    views = [generator.integers(0, 255, (140, 186, 3), dtype=np.uint8) for _ in range(2)]
    model.predict(views, options=InferenceOptions(process_res=140), progress=lambda _: None)
    return time.perf_counter() - started


class ModelCache:
    """Loaded models by preset, at most what fits on the GPU resident, the rest in CPU memory.

    Args:
        device: where models run.
        loader: ``loader(preset, device) -> LoadedModel`` (:func:`load_preset`).
        free_bytes: free memory on ``device`` (None: unbounded, as on the CPU).
        reserve_bytes: memory kept free beside the weights for activations.
        offload_device: where evicted models wait.
        needed_bytes: ``needed_bytes(preset)``: device memory a preset's weights take before
            it is loaded (default: its safetensors file, else an estimate).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        loader: Callable[[str, torch.device], LoadedModel] = load_preset,
        free_bytes: Callable[[], int] | None = None,
        reserve_bytes: int = 0,
        offload_device: torch.device | None = None,
        needed_bytes: Callable[[str], int] | None = None,
    ) -> None:
        self.device = device
        self.loader = loader
        self.free_bytes = free_bytes
        self.reserve_bytes = reserve_bytes
        self.offload_device = offload_device or torch.device("cpu")
        self.needed_bytes = needed_bytes or _checkpoint_bytes
        # Most recently used last.
        self._resident: OrderedDict[str, DepthAnything3] = OrderedDict()
        self._offloaded: dict[str, DepthAnything3] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device) -> ModelCache:
        """GPU: bounded by free memory with the configured reserve; CPU: unbounded."""
        if device.type != "cuda":
            return cls(device)
        reserve = float(os.environ.get(GPU_RESERVE_ENV, DEFAULT_GPU_RESERVE_GB))
        return cls(
            device,
            free_bytes=lambda: memory.available_device_bytes(device) or 0,
            reserve_bytes=int(reserve * 1024**3),
        )

    @property
    def resident(self) -> list[str]:
        """Presets on the device, least recently used first."""
        return list(self._resident)

    @property
    def offloaded(self) -> list[str]:
        return sorted(self._offloaded)

    def get(self, preset: str, progress: Callable[[str], None] | None = None) -> DepthAnything3:
        """The model for ``preset`` on the device, loading it on first use."""
        report = progress or (lambda message: logger.info("%s", message))
        with self._lock:
            if preset in self._resident:
                self._resident.move_to_end(preset)
                return self._resident[preset]
            if preset in self._offloaded:
                model = self._offloaded.pop(preset)
                self._make_room(_weight_bytes(model), keep=preset, report=report)
                report(f"moving {preset} back to {self.device}")
                model = DepthAnything3(model.loaded, self.device)
            else:
                self._make_room(self.needed_bytes(preset), keep=preset, report=report)
                report(f"loading {preset}")
                started = time.perf_counter()
                model = DepthAnything3(self.loader(preset, self.device), self.device)
                report(f"loaded {preset} in {time.perf_counter() - started:.1f}s")
            self._resident[preset] = model
            return model

    def load_cost(self, preset: str) -> tuple[int, int]:
        """Bytes ``get(preset)`` would newly take, ``(host, device)``: none when the model is
        on the device already; on the CPU its weights; on a GPU its weights on the device
        less the models :meth:`_make_room` would move to the host for them (which the host
        then holds). Read before a request loads its model, so that its memory check counts
        the weights it does not own."""
        with self._lock:
            if preset in self._resident:
                return 0, 0
            if preset in self._offloaded:
                needed = _weight_bytes(self._offloaded[preset])
            else:
                needed = self.needed_bytes(preset)
            if self.device.type != "cuda":
                return (0 if preset in self._offloaded else needed), 0
            moved = sum(_weight_bytes(self._resident[victim]) for victim in self._victims(needed))
            return moved, max(needed - moved, 0)

    def _victims(self, needed: int) -> list[str]:
        """The resident models, least recently used first, to offload until ``needed`` +
        reserve bytes are free."""
        if self.free_bytes is None:
            return []
        free, victims = self.free_bytes(), []
        for name, model in self._resident.items():
            if free >= needed + self.reserve_bytes:
                break
            victims.append(name)
            free += _weight_bytes(model)
        return victims

    def _make_room(self, needed: int, keep: str, report: Callable[[str], None]) -> None:
        """Offload least recently used models until ``needed`` + reserve bytes are free."""
        if self.free_bytes is None:
            return
        while self._resident and self.free_bytes() < needed + self.reserve_bytes:
            victim, model = self._resident.popitem(last=False)
            report(f"moving {victim} to {self.offload_device} to make room for {keep}")
            self._offloaded[victim] = DepthAnything3(model.loaded, self.offload_device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _weight_bytes(model: DepthAnything3) -> int:
    return sum(p.numel() * p.element_size() for p in model.network.parameters())


def _checkpoint_bytes(preset: str) -> int:
    """Size of the weights once loaded (float32) before loading them: counted from the
    safetensors header when the file is local already (its own dtype may be smaller), else
    from the preset's parameter count."""
    override_root = weights_dir()
    if override_root is not None:
        weights = override_root / preset / WEIGHTS_NAME
        if weights.is_file():
            try:
                return 4 * safetensors_elements(weights)
            except (OSError, ValueError):
                return 4 * weights.stat().st_size  # unreadable header: the load will say why
    return _ESTIMATED_PARAMETERS.get(split_model_spec(preset)[0], 2_000_000_000) * 4


# Parameter counts the code builds (README, tests/test_presets.py), for the memory check.
_ESTIMATED_PARAMETERS: dict[str, int] = {
    "da3-small": 34_300_000,
    "da3-base": 135_400_000,
    "da3-large": 410_900_000,
    "da3-giant": 1_360_000_000,
    "da3mono-large": 334_200_000,
    "da3metric-large": 334_200_000,
    "da3nested-giant-large": 1_690_000_000,
}
