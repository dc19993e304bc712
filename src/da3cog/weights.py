"""Find, build and strictly load DA3 checkpoints.

A checkpoint is a folder in the official Hub layout: ``config.json`` (``{"model_name":
"da3-large"}``) and ``model.safetensors`` with keys ``model.<module path>``; nested checkpoints
hold two sub-networks, ``model.da3.*`` (any-view) and ``model.da3_metric.*`` (metric). The
network is built on the meta device and the safetensors tensors are assigned straight into it,
so no memory is spent on a random initialisation. Loading is strict: every missing or
unexpected key is an error, except the short allowlist below.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from da3cog.model.dual_dpt import DualDPTHead
from da3cog.model.network import Network, build_network
from da3cog.model.presets import ALIASES, PRESETS, ModelPreset, get_preset, short_name

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KEY_PREFIX = "model."
CACHE_ENV = "DA3COG_CACHE_DIR"

# Keys the official files legitimately lack, each tied to the key that carries its tensor.
# The ray head shares one LayerNorm across its four levels; safetensors stores a shared tensor
# under a single name (level 0), so levels 1-3 are tied to it rather than left at their init.
# Relative to a DualDPT head; :func:`tied_keys` places them under every such head of a network
# (``head.`` for an any-view network, ``da3.head.`` inside a nested one).
_TIED_IN_DUAL_DPT: dict[str, str] = {
    f"scratch.output_conv2_aux.{level}.2.{name}": f"scratch.output_conv2_aux.0.2.{name}"
    for level in (1, 2, 3)
    for name in ("weight", "bias")
}
TIED_KEYS: dict[str, str] = {f"head.{k}": f"head.{v}" for k, v in _TIED_IN_DUAL_DPT.items()}
"""The allowlist for a single any-view network."""


def tied_keys(network: nn.Module) -> dict[str, str]:
    """The allowlist for ``network``: the tied levels of each of its DualDPT heads."""
    heads = [name for name, module in network.named_modules() if isinstance(module, DualDPTHead)]
    return {f"{head}.{k}": f"{head}.{v}" for head in heads for k, v in _TIED_IN_DUAL_DPT.items()}


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, downloaded or loaded."""


@dataclass(frozen=True)
class LoadedModel:
    """A ready network with where it came from.

    Attributes:
        network: the network, in eval mode without gradients.
        preset: the architecture its ``config.json`` names.
        model_id: what predictions report as their model: the Hub id for a preset, alias or
            Hub id, the folder for a local checkpoint, unless the loader was told otherwise.
        source: the local checkpoint folder the weights were read from.
        revision: the Hub commit of ``source`` when it is a huggingface_hub snapshot, else
            None.
    """

    network: Network
    preset: ModelPreset
    model_id: str
    source: Path
    revision: str | None = None


# The version of an official Hub repo: its name's ``-<major>.<minor>`` suffix (DA3-GIANT-1.1);
# the repos without one are the first release.
_VERSION_SUFFIX = re.compile(r"-(\d+\.\d+)$")
FIRST_VERSION = "1.0"
VERSION_SEPARATOR = "@"
"""Between a preset and a version in a model spec: ``giant@1.0``."""
# A Hub snapshot folder's name is the commit it holds.
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def hub_versions(preset: str) -> dict[str, str]:
    """``{version: Hub id}`` of a preset's (or alias's) official checkpoints, newest first:
    ``hub_versions("giant") == {"1.1": "depth-anything/DA3-GIANT-1.1", "1.0":
    "depth-anything/DA3-GIANT"}``. The newest is the default (upstream deprecates the
    releases a newer one replaces). ValueError for an unknown preset."""
    versions: dict[str, str] = {}
    for repo in get_preset(preset).hub_repos:
        match = _VERSION_SUFFIX.search(repo)
        versions[match.group(1) if match else FIRST_VERSION] = repo
    return dict(sorted(versions.items(), key=lambda item: _version_key(item[0]), reverse=True))


def hub_repo(preset: str, version: str | None = None) -> str:
    """The Hub id of a preset's (or alias's) official checkpoint: the newest release (what a
    bare preset name loads) or the given ``version`` (``hub_repo("giant", "1.0") ==
    "depth-anything/DA3-GIANT"``; see :func:`hub_versions`). ValueError names the versions
    there are."""
    versions = hub_versions(preset)
    name = get_preset(preset).name
    if not versions:
        raise ValueError(f"{name} has no official Hub checkpoint")
    if version is None:
        return next(iter(versions.values()))
    if version not in versions:
        known = ", ".join(f"{v} ({repo})" for v, repo in versions.items())
        raise ValueError(f"{name} has no Hub version {version!r}; its versions: {known}")
    return versions[version]


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """``"giant@1.0"`` -> ``("giant", "1.0")``; ``"giant"`` -> ``("giant", None)``."""
    name, separator, version = spec.partition(VERSION_SEPARATOR)
    return name, (version if separator else None)


def revision_of(folder: Path) -> str | None:
    """The Hub commit a checkpoint folder holds, when it is a huggingface_hub snapshot
    (``.../snapshots/<commit>/``); None for any other folder."""
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and _SNAPSHOT.match(resolved.name):
        return resolved.name
    return None


def default_cache_dir() -> Path | None:
    """``$DA3COG_CACHE_DIR`` if set (else huggingface_hub's own cache)."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else None


def _hub_id(source: str | os.PathLike[str]) -> str | None:
    """The Hub id ``source`` names (a preset or alias: its default repo), None for an existing
    folder; CheckpointError when it is neither. A folder that happens to be named like a
    preset (``small/`` in the working directory) is the folder only when it holds a
    checkpoint's config."""
    name, version = split_model_spec(str(source))
    key = ALIASES.get(name.lower(), name.lower())
    folder = Path(source).expanduser()
    if folder.is_dir() and (
        (folder / CONFIG_NAME).is_file() or key not in PRESETS or not PRESETS[key].hub_repos
    ):
        return None
    if key in PRESETS and PRESETS[key].hub_repos:
        try:
            return hub_repo(key, version)
        except ValueError as error:
            raise CheckpointError(f"{source!r}: {error}") from error
    if version is None and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError:
            pass
        else:
            return name
    raise CheckpointError(
        f"{source!r} is neither a checkpoint folder, a preset "
        f"({', '.join(short_name(name) for name in PRESETS)}, optionally with a version: "
        "giant@1.0) nor a Hub id like 'depth-anything/DA3-BASE'"
    )


def absolute_model(source: str) -> str:
    """``source`` with a checkpoint folder by its absolute path (a worker in another process
    or on another machine resolves a relative one against its own working directory); presets
    and Hub ids as given."""
    try:
        local = _hub_id(source) is None
    except CheckpointError:
        return source
    return str(Path(source).expanduser().absolute()) if local else source


def resolve_checkpoint(source: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """A local checkpoint folder for ``source``: a folder path, a preset name or alias
    (``small``, ``da3-large``: its newest official Hub repo, see :func:`hub_repo`), a preset
    with a version (``giant@1.0``: that release), or a Hub id (``depth-anything/DA3-BASE``,
    ``depth-anything/DA3-GIANT-1.1``).
    """
    repo_id = _hub_id(source)
    if repo_id is None:
        path = Path(source).expanduser()
        _check_folder(path)
        return path
    try:
        return _download(repo_id, cache_dir if cache_dir is not None else default_cache_dir())
    except CheckpointError as error:
        if repo_id != str(source):
            raise
        # "checkpoints/da3-small" is a Hub id by its form, and may have meant a folder.
        raise CheckpointError(f"no checkpoint folder {source} here, and {error}") from error


def preset_of(source: str | os.PathLike[str]) -> ModelPreset | None:
    """The preset ``source`` loads, known without loading or downloading anything: a
    checkpoint folder's config, a preset or alias, an official Hub id; None for another Hub
    id (its config is read when it is downloaded). CheckpointError as :func:`resolve_checkpoint`
    for a source that names nothing."""
    repo_id = _hub_id(source)
    if repo_id is None:
        path = Path(source).expanduser()
        _check_folder(path)
        return read_preset(path)
    for preset in PRESETS.values():
        if repo_id in preset.hub_repos:
            return preset
    return None


def check_source(source: str | os.PathLike[str]) -> None:
    """CheckpointError now when ``source`` names no checkpoint folder (with its files), preset
    or Hub id; nothing is downloaded (a batch checks its model before starting workers)."""
    if _hub_id(source) is None:
        _check_folder(Path(source).expanduser())


def _check_folder(path: Path) -> None:
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint folder {path} lacks {', '.join(missing)}")


def _download(repo_id: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hint = (
        f"Download it elsewhere (e.g. `hf download {repo_id} --local-dir DIR`) and pass the "
        "folder (with config.json and model.safetensors) instead of the repo id."
    )
    try:
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], cache_dir=cache_dir
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise CheckpointError(
            f"could not fetch {repo_id} from the Hugging Face Hub ({type(error).__name__}: "
            f"{error}). {hint}"
        ) from error
    _check_folder(folder)
    return folder


def read_preset(folder: Path) -> ModelPreset:
    """The preset named by a checkpoint's config.json."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"unreadable {folder / CONFIG_NAME}: {error}") from error
    name = config.get("model_name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise CheckpointError(f"{folder / CONFIG_NAME} has no 'model_name' entry")
    try:
        return get_preset(name)
    except ValueError as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {error}") from error


# A safetensors header longer than this is not one of ours (DA3-GIANT's is about 150 KiB).
MAX_HEADER_BYTES = 64 << 20


def safetensors_elements(path: Path) -> int:
    """The number of tensor elements a safetensors file holds, from its header alone.
    ValueError when the header cannot be read."""
    with path.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a header of {length} bytes")
        header = json.loads(stream.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not an object")
    try:
        return sum(
            math.prod(entry["shape"])
            for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: a tensor entry without a shape ({error})") from error


def _read_state_dict(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for key in handle.keys():
                if not key.startswith(KEY_PREFIX):
                    raise CheckpointError(
                        f"{path}: unexpected key {key!r} (keys start with 'model.')"
                    )
                state[key[len(KEY_PREFIX) :]] = handle.get_tensor(key)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return state


# What a mismatch names of each kind (the rest is elided): a checkpoint of another size or
# family mismatches hundreds of keys. Missing and unexpected keys are named by module.
SHOWN_KEYS = 8
SHOWN_MODULES = 32


def _modules(keys: list[str]) -> list[str]:
    """``keys`` by the module they are in: ``module.* (n)`` for several, the key itself for
    one; modules of their first three names, or fewer when that makes too many to show."""
    for depth in (3, 2, 1):
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(".".join(key.split(".")[:depth]), []).append(key)
        if len(groups) <= SHOWN_MODULES:
            break
    return [
        members[0] if len(members) == 1 else f"{module}.* ({len(members)})"
        for module, members in groups.items()
    ]


def check_keys(
    expected: dict[str, torch.Tensor],
    provided: dict[str, torch.Tensor],
    tied: dict[str, str] = TIED_KEYS,
    what: str = "checkpoint",
) -> None:
    """Raise CheckpointError naming the missing, unexpected, mis-shaped or mistyped keys (the
    first :data:`SHOWN_KEYS` of each kind, and how many); keys in ``tied`` may be missing.
    ``what`` names the checkpoint (its file and the architecture its config asks for)."""
    missing = sorted(k for k in expected if k not in provided and k not in tied)
    unexpected = sorted(k for k in provided if k not in expected)
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(provided[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in provided and provided[k].shape != expected[k].shape
    )
    wrong_type = sorted(
        f"{k}: {provided[k].dtype}"
        for k in expected
        if k in provided and expected[k].is_floating_point() and not provided[k].is_floating_point()
    )
    problems = []
    for kind, keys, shown, limit, separator in (
        ("missing keys", missing, _modules(missing), SHOWN_MODULES, ", "),
        ("unexpected keys", unexpected, _modules(unexpected), SHOWN_MODULES, ", "),
        ("shape mismatches", wrong_shape, wrong_shape, SHOWN_KEYS, "; "),
        ("not floating point", wrong_type, wrong_type, SHOWN_KEYS, "; "),
    ):
        if keys:
            more = f"{separator}..." if len(shown) > limit else ""
            problems.append(f"{kind} ({len(keys)}): {separator.join(shown[:limit])}{more}")
    if problems:
        raise CheckpointError(f"{what} does not match the architecture: " + " | ".join(problems))


def assign_weights(
    network: nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    what: str = "checkpoint",
) -> None:
    """Strictly load ``state`` (keys without the ``model.`` prefix) into ``network`` (built on
    the meta device or not) by assignment, tying the allowlisted keys, cast to ``dtype``; the
    network ends in eval mode without gradients. ``what`` names the checkpoint in errors."""
    expected = network.state_dict()
    tied = tied_keys(network)
    check_keys(expected, state, tied, what)
    state = dict(state)
    for key, origin in tied.items():
        if key in expected and key not in state:
            state[key] = state[origin]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    network.load_state_dict(state, strict=True, assign=True)
    network.eval().requires_grad_(False)


def load_model(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    model_id: str | None = None,
) -> LoadedModel:
    """Resolve, build and strictly load a DA3 checkpoint onto ``device`` in ``dtype``.

    ``source`` is what :func:`resolve_checkpoint` takes. The result's ``model_id`` is
    ``model_id`` when given (e.g. the Hub id a local copy of an official checkpoint stands
    for), else the Hub id ``source`` resolves to (``"small"`` -> ``depth-anything/DA3-SMALL``,
    ``"giant"`` -> ``depth-anything/DA3-GIANT-1.1``, ``"giant@1.0"`` ->
    ``depth-anything/DA3-GIANT``), else the folder as given.

    On the CPU in the checkpoint's own dtype, the parameters are copy-on-write memory maps of
    ``model.safetensors`` (no copy at load; pages are read on first use). The file must then
    stay unchanged while the model lives: Hub cache blobs are immutable, but do not overwrite a
    local checkpoint in place under a running model.
    """
    started = time.perf_counter()
    device = torch.device(device)
    repo_id = _hub_id(source)
    folder = resolve_checkpoint(source, cache_dir)
    preset = read_preset(folder)
    with torch.device("meta"):
        network = build_network(preset)
    assign_weights(
        network,
        _read_state_dict(folder / WEIGHTS_NAME, device),
        dtype,
        f"{folder / WEIGHTS_NAME} (a {preset.name} by its {CONFIG_NAME})",
    )
    logger.info(
        "loaded %s (%s) from %s in %.2fs",
        preset.name,
        str(source),
        folder,
        time.perf_counter() - started,
    )
    if model_id is None:
        model_id = repo_id if repo_id is not None else str(source)
    return LoadedModel(
        network=network,
        preset=preset,
        model_id=model_id,
        source=folder,
        revision=revision_of(folder),
    )
