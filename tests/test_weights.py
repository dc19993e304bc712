"""da3cog.weights and da3cog.model.presets: strict checkpoint loading, tied tensors, checkpoint
resolution (offline), preset lookup and parameter counts against upstream."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from da3cog.model.network import build_network
from da3cog.model.presets import ALIASES, PRESETS, get_preset
from da3cog.weights import (
    CONFIG_NAME,
    TIED_KEYS,
    WEIGHTS_NAME,
    CheckpointError,
    LoadedModel,
    assign_weights,
    hub_repo,
    hub_versions,
    load_model,
    read_preset,
    resolve_checkpoint,
    tied_keys,
)

TIED_ORIGIN = "head.scratch.output_conv2_aux.0.2.weight"
TIED_LEVELS = [f"head.scratch.output_conv2_aux.{level}.2.weight" for level in (1, 2, 3)]
# A key that every preset has, used to corrupt checkpoints.
SOME_KEY = "backbone.pretrained.blocks.3.attn.qkv.weight"


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.fixture(scope="module")
def checkpoint_tensors(small_checkpoint: Path) -> dict[str, torch.Tensor]:
    return file_tensors(small_checkpoint)


@pytest.fixture(scope="module")
def loaded(small_checkpoint: Path) -> LoadedModel:
    return load_model(small_checkpoint, device="cpu")


# --------------------------------------------------------------------------------------------
# Loading a good checkpoint
# --------------------------------------------------------------------------------------------


def test_load_model_reports_preset_and_source(loaded: LoadedModel, small_checkpoint: Path) -> None:
    assert loaded.preset is PRESETS["da3-small"]
    assert loaded.source == small_checkpoint
    assert loaded.model_id == str(small_checkpoint)
    assert not loaded.network.training
    assert not any(p.requires_grad for p in loaded.network.parameters())
    assert all(p.device.type == "cpu" for p in loaded.network.parameters())


def test_every_parameter_equals_the_safetensors_tensor(
    loaded: LoadedModel, checkpoint_tensors: dict[str, torch.Tensor]
) -> None:
    state = loaded.network.state_dict()
    assert SOME_KEY in state
    assert all(key.startswith("model.") for key in checkpoint_tensors)
    provided = {key.removeprefix("model."): value for key, value in checkpoint_tensors.items()}
    assert set(provided) == set(state) - set(TIED_KEYS)
    for key, tensor in state.items():
        expected = provided[TIED_KEYS.get(key, key)]
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, expected), key


def test_the_shared_ray_head_layernorm_is_one_tensor(
    loaded: LoadedModel, checkpoint_tensors: dict[str, torch.Tensor]
) -> None:
    state = loaded.network.state_dict()
    origin = state[TIED_ORIGIN]
    assert torch.equal(origin, checkpoint_tensors["model." + TIED_ORIGIN])
    # The random init of the oracle makes the tied tensor distinguishable from a default init.
    assert not torch.equal(origin, torch.ones_like(origin))
    for key in TIED_LEVELS:
        assert state[key].data_ptr() == origin.data_ptr(), key
        assert torch.equal(state[key], checkpoint_tensors["model." + TIED_ORIGIN]), key
        bias = key.replace(".weight", ".bias")
        assert state[bias].data_ptr() == state[TIED_ORIGIN.replace(".weight", ".bias")].data_ptr()


def test_load_model_casts_to_the_requested_dtype(
    small_checkpoint: Path, checkpoint_tensors: dict[str, torch.Tensor]
) -> None:
    half = load_model(small_checkpoint, dtype=torch.bfloat16)
    state = half.network.state_dict()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    assert torch.equal(state[SOME_KEY], checkpoint_tensors["model." + SOME_KEY].to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Strict loading of corrupted checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture
def rewrite_checkpoint(
    small_checkpoint: Path, checkpoint_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> Iterator[Callable[[dict[str, torch.Tensor]], Path]]:
    """Write a copy of the small checkpoint with a modified tensor dict; removes it after."""
    folder = tmp_path / "checkpoint"

    def write(tensors: dict[str, torch.Tensor]) -> Path:
        folder.mkdir()
        shutil.copy(small_checkpoint / CONFIG_NAME, folder / CONFIG_NAME)
        save_file(tensors, str(folder / WEIGHTS_NAME))
        return folder

    yield write
    shutil.rmtree(folder, ignore_errors=True)


def renamed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = dict(tensors)
    changed["model.backbone.pretrained.blocks.3.attn.qkv.weights"] = changed.pop(
        "model." + SOME_KEY
    )
    return changed


def removed(key: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in tensors.items() if k != "model." + key}

    return change


def extra(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "model.head.scratch.extra_layer.weight": torch.zeros(3)}


def wrong_shape(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    original = tensors["model." + SOME_KEY]
    return {**tensors, "model." + SOME_KEY: torch.zeros(original.shape[0], original.shape[1] + 1)}


def unprefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = dict(tensors)
    changed[SOME_KEY] = changed.pop("model." + SOME_KEY)
    return changed


@pytest.mark.parametrize(
    ("corrupt", "names"),
    [
        (renamed, ["missing keys", SOME_KEY, "unexpected keys", SOME_KEY + "s"]),
        (removed(SOME_KEY), ["missing keys", SOME_KEY]),
        (extra, ["unexpected keys", "head.scratch.extra_layer.weight"]),
        (wrong_shape, ["shape mismatches", SOME_KEY, "(1152, 385)", "(1152, 384)"]),
        (removed(TIED_ORIGIN), ["missing keys", TIED_ORIGIN]),
        (unprefixed, ["unexpected key", repr(SOME_KEY)]),
    ],
    ids=["renamed", "removed", "extra", "wrong-shape", "tied-origin-removed", "no-prefix"],
)
def test_strict_loading_names_the_offending_key(
    rewrite_checkpoint: Callable[[dict[str, torch.Tensor]], Path],
    checkpoint_tensors: dict[str, torch.Tensor],
    corrupt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    names: list[str],
) -> None:
    folder = rewrite_checkpoint(corrupt(checkpoint_tensors))
    with pytest.raises(CheckpointError) as raised:
        load_model(folder)
    message = str(raised.value)
    for name in names:
        assert name in message


def test_strict_loading_does_not_list_the_tied_levels_as_missing(
    rewrite_checkpoint: Callable[[dict[str, torch.Tensor]], Path],
    checkpoint_tensors: dict[str, torch.Tensor],
) -> None:
    folder = rewrite_checkpoint(removed(SOME_KEY)(checkpoint_tensors))
    with pytest.raises(CheckpointError) as raised:
        load_model(folder)
    assert not any(key in str(raised.value) for key in TIED_KEYS)


def write_config(folder: Path, small_checkpoint: Path, config: object) -> Path:
    folder.mkdir()
    (folder / WEIGHTS_NAME).symlink_to(small_checkpoint / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "da3-small"}, "has no 'model_name' entry"),
        ({"model_name": 3}, "has no 'model_name' entry"),
        (["da3-small"], "has no 'model_name' entry"),
        ({"model_name": "da3-tiny"}, "unknown model 'da3-tiny'"),
    ],
    ids=["no-model-name", "non-string", "not-an-object", "unknown-model-name"],
)
def test_bad_config_json_is_a_checkpoint_error(
    tmp_path: Path, small_checkpoint: Path, config: object, message: str
) -> None:
    folder = write_config(tmp_path / "checkpoint", small_checkpoint, config)
    with pytest.raises(CheckpointError, match=message) as raised:
        load_model(folder)
    assert str(folder / CONFIG_NAME) in str(raised.value)


def test_unparsable_config_json_is_a_checkpoint_error(
    tmp_path: Path, small_checkpoint: Path
) -> None:
    folder = write_config(tmp_path / "checkpoint", small_checkpoint, {})
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(folder)


def test_a_checkpoint_of_another_preset_is_rejected(tmp_path: Path, small_checkpoint: Path) -> None:
    folder = write_config(tmp_path / "checkpoint", small_checkpoint, {"model_name": "da3-base"})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(folder)


@pytest.mark.parametrize(
    ("model_name", "names"),
    [
        ("da3nested-giant-large", ["missing keys", "da3.backbone.", "da3_metric.head.scratch."]),
        ("da3metric-large", ["unexpected keys", "head.scratch.output_conv1_aux"]),
    ],
)
def test_a_small_checkpoint_named_as_another_family_is_rejected(
    tmp_path: Path, small_checkpoint: Path, model_name: str, names: list[str]
) -> None:
    folder = write_config(tmp_path / "checkpoint", small_checkpoint, {"model_name": model_name})
    with pytest.raises(CheckpointError) as raised:
        load_model(folder)
    for name in names:
        assert name in str(raised.value)


@pytest.mark.parametrize(
    "model_name", ["da3mono-large", "da3metric-large", "da3nested-giant-large"]
)
def test_official_config_json_names_the_new_presets(
    tmp_path: Path, small_checkpoint: Path, model_name: str
) -> None:
    folder = write_config(tmp_path / "checkpoint", small_checkpoint, {"model_name": model_name})
    assert read_preset(folder) is PRESETS[model_name]


# --------------------------------------------------------------------------------------------
# The nested layout: two sub-networks, model.da3.* and model.da3_metric.*
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested_folder(small_zoo_checkpoint: Callable[[str], tuple[Path, torch.nn.Module]]) -> Path:
    folder, _ = small_zoo_checkpoint("nested-small")
    return folder


def test_nested_checkpoint_loads_both_sub_networks_strictly(nested_folder: Path) -> None:
    from small_zoo import NESTED_SMALL, load_small

    tensors = file_tensors(nested_folder)
    assert {key.split(".")[1] for key in tensors} == {"da3", "da3_metric"}
    network = load_small(nested_folder, NESTED_SMALL)
    tied = tied_keys(network)
    assert tied == {f"da3.{key}": f"da3.{origin}" for key, origin in TIED_KEYS.items()}
    state = network.state_dict()
    provided = {key.removeprefix("model."): value for key, value in tensors.items()}
    assert set(provided) == set(state) - set(tied)
    for key, tensor in state.items():
        assert torch.equal(tensor, provided[tied.get(key, key)]), key
    origin = state["da3." + TIED_ORIGIN]
    for key in TIED_LEVELS:
        assert state["da3." + key].data_ptr() == origin.data_ptr()


@pytest.mark.parametrize(
    ("corrupt", "names"),
    [
        (
            removed("da3_metric.head.scratch.sky_output_conv2.2.bias"),
            ["missing keys", "da3_metric.head.scratch.sky_output_conv2.2.bias"],
        ),
        (removed("da3." + TIED_ORIGIN), ["missing keys", "da3." + TIED_ORIGIN]),
        (
            lambda t: {**t, "model.da3_metric.cam_dec.fc_t.weight": torch.zeros(3, 3)},
            ["unexpected keys", "da3_metric.cam_dec.fc_t.weight"],
        ),
        (
            lambda t: {k.replace("model.da3_metric.", "model.metric."): v for k, v in t.items()},
            ["missing keys", "da3_metric.backbone.", "unexpected keys", "metric.backbone."],
        ),
    ],
    ids=["metric-key-removed", "tied-origin-removed", "extra", "renamed-branch"],
)
def test_nested_strict_loading_names_the_offending_key(
    nested_folder: Path,
    corrupt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    names: list[str],
) -> None:
    from small_zoo import NESTED_SMALL

    state = {
        key.removeprefix("model."): value
        for key, value in corrupt(file_tensors(nested_folder)).items()
    }
    with torch.device("meta"):
        network = build_network(NESTED_SMALL)
    with pytest.raises(CheckpointError) as raised:
        assign_weights(network, state)
    for name in names:
        assert name in str(raised.value)


def test_single_view_networks_tie_nothing() -> None:
    with torch.device("meta"):
        assert tied_keys(build_network(PRESETS["da3metric-large"])) == {}
        assert tied_keys(build_network(PRESETS["da3-small"])) == TIED_KEYS


@pytest.mark.parametrize("missing", [WEIGHTS_NAME, CONFIG_NAME])
def test_folder_lacking_a_file_is_a_checkpoint_error_naming_it(
    tmp_path: Path, small_checkpoint: Path, missing: str
) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    present = CONFIG_NAME if missing == WEIGHTS_NAME else WEIGHTS_NAME
    (folder / present).symlink_to(small_checkpoint / present)
    with pytest.raises(CheckpointError, match=missing) as raised:
        load_model(folder)
    assert str(folder) in str(raised.value)
    with pytest.raises(CheckpointError, match=missing):
        resolve_checkpoint(folder)


# --------------------------------------------------------------------------------------------
# Resolving sources
# --------------------------------------------------------------------------------------------


def test_resolve_checkpoint_returns_a_local_folder_as_is(small_checkpoint: Path) -> None:
    assert resolve_checkpoint(small_checkpoint) == small_checkpoint
    assert resolve_checkpoint(str(small_checkpoint)) == small_checkpoint


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hub access switched off (the env var and the constant huggingface_hub read at import)
    and an empty cache folder."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("DA3COG_CACHE_DIR", raising=False)
    return cache


@pytest.mark.parametrize("source", ["depth-anything/DA3-SMALL", "small", "DA3-Small"])
def test_hub_source_while_offline_explains_how_to_pass_a_folder(
    offline_hub: Path, source: str
) -> None:
    with pytest.raises(CheckpointError) as raised:
        resolve_checkpoint(source, cache_dir=offline_hub)
    message = str(raised.value)
    assert "depth-anything/DA3-SMALL" in message
    assert "pass the folder" in message
    assert "config.json and model.safetensors" in message
    assert not any(offline_hub.iterdir())


def test_cache_dir_defaults_to_the_environment_variable(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import da3cog.weights

    monkeypatch.setenv("DA3COG_CACHE_DIR", str(offline_hub))
    seen: list[Path | None] = []

    def fake_snapshot_download(
        repo_id: str, allow_patterns: list[str], cache_dir: Path | None
    ) -> str:
        seen.append(cache_dir)
        raise OSError("no network in this test")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match="could not fetch depth-anything/DA3-BASE"):
        da3cog.weights.resolve_checkpoint("base")
    assert seen == [offline_hub]


@pytest.mark.parametrize("repo", ["depth-anything/DA3-LARGE-1.1", "depth-anything/DA3-GIANT-1.1"])
def test_official_hub_ids_with_a_dot_are_treated_as_hub_ids(offline_hub: Path, repo: str) -> None:
    with pytest.raises(CheckpointError, match=f"could not fetch {repo}"):
        resolve_checkpoint(repo, cache_dir=offline_hub)


# Upstream's README (model cards): the -1.1 checkpoints replace these three, which stay
# available but deprecated; the other presets have a single release.
NEWEST = {
    "da3-giant": "depth-anything/DA3-GIANT-1.1",
    "da3-large": "depth-anything/DA3-LARGE-1.1",
    "da3nested-giant-large": "depth-anything/DA3NESTED-GIANT-LARGE-1.1",
    "da3-base": "depth-anything/DA3-BASE",
    "da3-small": "depth-anything/DA3-SMALL",
    "da3mono-large": "depth-anything/DA3MONO-LARGE",
    "da3metric-large": "depth-anything/DA3METRIC-LARGE",
}


def test_every_release_loads_through_the_same_configs_as_upstream() -> None:
    """Upstream's 1.1 release (commit a71fc79, "update model") added no config and changed
    no network code: its loader reads every checkpoint, 1.0 or 1.1, through the same seven
    configs (``model_name`` in config.json), which are our presets."""
    from depth_anything_3.registry import MODEL_REGISTRY

    assert set(MODEL_REGISTRY) == set(PRESETS)
    for name in PRESETS:
        assert set(hub_versions(name)) <= {"1.0", "1.1"}


def test_hub_repo_defaults_to_the_newest_release() -> None:
    assert hub_repo("giant") == "depth-anything/DA3-GIANT-1.1"
    assert hub_repo("da3-giant", "1.0") == "depth-anything/DA3-GIANT"
    assert hub_repo("Giant", "1.1") == "depth-anything/DA3-GIANT-1.1"
    assert hub_repo("large", "1.0") == "depth-anything/DA3-LARGE"
    assert hub_repo("nested", "1.0") == "depth-anything/DA3NESTED-GIANT-LARGE"
    assert hub_versions("small") == {"1.0": "depth-anything/DA3-SMALL"}
    assert list(hub_versions("giant")) == ["1.1", "1.0"]
    assert {name: hub_repo(name) for name in PRESETS} == NEWEST
    for name, preset in PRESETS.items():
        # The default is what a bare preset name loads: the newest version.
        assert hub_repo(name) == next(iter(hub_versions(name).values()))
        assert sorted(hub_versions(name).values()) == sorted(preset.hub_repos)
    with pytest.raises(ValueError, match=r"no Hub version '1.1'; its versions: 1.0 \(depth-any"):
        hub_repo("small", "1.1")
    with pytest.raises(ValueError, match="unknown model 'da3-huge'"):
        hub_repo("da3-huge")


def test_load_model_records_the_hub_id_it_resolved(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch, small_checkpoint: Path
) -> None:
    """A preset, alias or Hub id (any version) reports its Hub id; a folder reports itself
    unless told which checkpoint it is a copy of. The Hub is faked by the small checkpoint."""
    fetched: list[str] = []

    def fake_snapshot_download(
        repo_id: str, allow_patterns: list[str], cache_dir: Path | None
    ) -> str:
        fetched.append(repo_id)
        return str(small_checkpoint)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    for source in ("small", "DA3-Small", "depth-anything/DA3-SMALL", "small@1.0"):
        loaded = load_model(source, cache_dir=offline_hub)
        assert loaded.model_id == "depth-anything/DA3-SMALL"
        assert loaded.source == small_checkpoint and loaded.preset is PRESETS["da3-small"]
        assert loaded.revision is None
    expected = ["depth-anything/DA3-SMALL"] * 4
    for source, repo in [
        ("giant", "depth-anything/DA3-GIANT-1.1"),
        ("giant@1.0", "depth-anything/DA3-GIANT"),
        ("Large@1.1", "depth-anything/DA3-LARGE-1.1"),
        ("nested@1.0", "depth-anything/DA3NESTED-GIANT-LARGE"),
        (hub_repo("giant", "1.0"), "depth-anything/DA3-GIANT"),
    ]:
        assert load_model(source, cache_dir=offline_hub).model_id == repo
        expected.append(repo)
    assert fetched == expected
    assert load_model(small_checkpoint).model_id == str(small_checkpoint)
    named = load_model(small_checkpoint, model_id=hub_repo("small"))
    assert named.model_id == "depth-anything/DA3-SMALL" and len(fetched) == len(expected)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("small@1.1", r"'small@1.1': da3-small has no Hub version '1.1'; its versions: 1.0"),
        ("giant@2", r"its versions: 1.1 \(depth-anything/DA3-GIANT-1.1\), 1.0"),
        ("depth-anything/DA3-BASE@1.0", "neither a checkpoint folder"),
    ],
)
def test_unknown_versions_are_refused_with_the_known_ones(
    offline_hub: Path, source: str, message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(source, cache_dir=offline_hub)


def test_a_hub_snapshot_folder_reports_its_commit(
    tmp_path: Path, small_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's cache keeps a repo as ``snapshots/<commit>/``: the loaded model and
    its predictions name that commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--depth-anything--DA3-SMALL" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(small_checkpoint / name)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **_: str(snapshot))
    loaded = load_model("small", cache_dir=tmp_path)
    assert (loaded.model_id, loaded.revision) == ("depth-anything/DA3-SMALL", commit)
    assert load_model(small_checkpoint).revision is None


@pytest.mark.parametrize(
    "source", ["not a model", "da3-tiny", "a/b/c", "weights.safetensors", "/no/such/folder/x"]
)
def test_nonsense_sources_are_checkpoint_errors(offline_hub: Path, source: str) -> None:
    with pytest.raises(CheckpointError, match="neither a checkpoint folder") as raised:
        resolve_checkpoint(source, cache_dir=offline_hub)
    assert repr(source) in str(raised.value)
    for alias in ALIASES:
        assert alias in str(raised.value)
    assert "da3nested-giant-large" not in str(raised.value), "messages use the short names"


# --------------------------------------------------------------------------------------------
# Presets and parameter counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_get_preset_accepts_names_and_aliases_case_insensitively(alias: str, name: str) -> None:
    assert get_preset(alias) is PRESETS[name]
    assert get_preset(name) is PRESETS[name]
    assert get_preset(name.upper()) is PRESETS[name]
    assert get_preset(alias.title()) is PRESETS[name]


def test_get_preset_unknown_name_lists_the_known_presets() -> None:
    with pytest.raises(ValueError, match="unknown model 'da3-huge'") as raised:
        get_preset("da3-huge")
    # The short names users type (README, --help), not the internal preset names.
    assert "known models: small, base, large, giant, mono, metric, nested" in str(raised.value)


def test_every_preset_names_its_official_hub_repo() -> None:
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert f"depth-anything/{name.upper()}" in preset.hub_repos


def unique_parameter_count(module: torch.nn.Module) -> int:
    # named_parameters() yields a shared parameter once.
    return sum(parameter.numel() for parameter in module.parameters())


def meta_parameter_count(name: str) -> int:
    with torch.device("meta"):
        network = build_network(get_preset(name))
    assert all(p.is_meta for p in network.parameters())
    return unique_parameter_count(network)


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("da3-small", 34.3),
        ("da3-base", 135.4),
        ("da3-large", 410.9),
        ("da3-giant", 1355.7),
        ("da3mono-large", 334.2),
        ("da3metric-large", 334.2),
        ("da3nested-giant-large", 1689.8),
    ],
)
def test_parameter_counts_built_on_the_meta_device(name: str, millions: float) -> None:
    """Measured from upstream: small 34.3M, base 135.4M, large 410.9M, giant 1.36B, mono and
    metric large 334,171,394, nested giant-large 1,689,845,519."""
    assert round(meta_parameter_count(name) / 1e5) / 10 == millions


@pytest.mark.parametrize("name", ["da3-small", "da3-base"])
def test_parameter_counts_equal_upstream(name: str) -> None:
    from oracle import build_upstream

    upstream = build_upstream(name)
    assert meta_parameter_count(name) == unique_parameter_count(upstream)


@pytest.mark.parametrize(
    ("name", "count"),
    [("da3metric-large", 334_171_394), ("da3nested-giant-large", 1_689_845_519)],
)
def test_parameter_counts_of_the_new_families_equal_upstream(name: str, count: int) -> None:
    """Upstream's counts (counted on its networks, too large to build in CI)."""
    assert meta_parameter_count(name) == count


def test_parameter_count_of_giant_rounds_to_1_36_billion() -> None:
    assert round(meta_parameter_count("da3-giant") / 1e7) / 100 == 1.36


# --------------------------------------------------------------------------------------------
# What a broken or misnamed checkpoint says
# --------------------------------------------------------------------------------------------


def test_a_folder_named_like_a_preset_without_a_checkpoint_is_not_taken_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hub: Path
) -> None:
    """An unrelated folder ``small/`` in the working directory does not hide the preset
    (before, ``--model small`` failed with "checkpoint folder small lacks config.json")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small").mkdir()
    with pytest.raises(CheckpointError, match="could not fetch depth-anything/DA3-SMALL"):
        resolve_checkpoint("small", cache_dir=offline_hub)


@pytest.mark.parametrize(
    ("weights", "config", "message"),
    [
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", None, "is not a readable safetensors file"),
        (b"not safetensors at all", None, "is not a readable safetensors file"),
        (None, b'{"model_name": "da3-small\xff"}', "unreadable"),
    ],
    ids=["truncated", "not-safetensors", "config-not-utf8"],
)
def test_unreadable_files_are_checkpoint_errors_naming_them(
    tmp_path: Path,
    small_checkpoint: Path,
    weights: bytes | None,
    config: bytes | None,
    message: str,
) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes(
        weights if weights is not None else (small_checkpoint / WEIGHTS_NAME).read_bytes()
    )
    (folder / CONFIG_NAME).write_bytes(config or b'{"model_name": "da3-small"}')
    with pytest.raises(CheckpointError, match=message) as raised:
        load_model(folder)
    assert str(folder) in str(raised.value)


def test_a_mismatched_checkpoint_is_named_and_its_keys_counted(
    tmp_path: Path, small_checkpoint: Path
) -> None:
    """Small weights under a base config: the message names the file and the architecture the
    config asks for, and lists a few keys of each kind with how many (it was 31 KB)."""
    folder = write_config(tmp_path / "checkpoint", small_checkpoint, {"model_name": "da3-base"})
    with pytest.raises(CheckpointError) as raised:
        load_model(folder)
    message = str(raised.value)
    assert str(folder / WEIGHTS_NAME) in message and "a da3-base by its config.json" in message
    assert "shape mismatches (" in message and "; ..." in message
    assert len(message) < 3000, len(message)


def test_a_weight_stored_as_integers_is_refused_by_name(
    rewrite_checkpoint: Callable[[dict[str, torch.Tensor]], Path],
    checkpoint_tensors: dict[str, torch.Tensor],
) -> None:
    tensors = dict(checkpoint_tensors)
    tensors["model." + SOME_KEY] = tensors["model." + SOME_KEY].to(torch.int32)
    with pytest.raises(CheckpointError, match=f"not floating point \\(1\\): {SOME_KEY}"):
        load_model(rewrite_checkpoint(tensors))


@pytest.mark.parametrize("source", ["ckpts/", "foo/bar baz"])
def test_strings_that_are_no_hub_id_are_refused_without_asking_the_hub(
    offline_hub: Path, source: str
) -> None:
    from da3cog.weights import check_source

    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        check_source(source)


def test_a_missing_folder_shaped_like_a_hub_id_says_there_is_no_such_folder(
    offline_hub: Path,
) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint folder checkpoints/da3-small here"):
        resolve_checkpoint("checkpoints/da3-small", cache_dir=offline_hub)


def test_the_model_refuses_weights_it_cannot_run_and_devices_there_are_not(
    small_checkpoint: Path,
) -> None:
    """bf16 weights (load_model's dtype=) failed inside the heads; precision= is the way.
    A CUDA device on a machine without one failed inside the load."""
    from da3cog.pipeline import DepthAnything3

    with pytest.raises(ValueError, match=r"weights are torch.bfloat16.*precision="):
        DepthAnything3(load_model(small_checkpoint, dtype=torch.bfloat16), torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            DepthAnything3.from_pretrained(small_checkpoint, device="cuda")


def test_the_served_weight_estimate_counts_float32_of_half_stored_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint_tensors: dict[str, torch.Tensor]
) -> None:
    """Weights stored in bf16 load as float32: twice the file's size."""
    from da3cog.serve.models import _checkpoint_bytes

    folder = tmp_path / "da3-small"
    folder.mkdir()
    save_file(
        {k: v.to(torch.bfloat16) for k, v in checkpoint_tensors.items()}, folder / WEIGHTS_NAME
    )
    monkeypatch.setenv("DA3COG_WEIGHTS_DIR", str(tmp_path))
    elements = sum(t.numel() for t in checkpoint_tensors.values())
    assert _checkpoint_bytes("da3-small") == 4 * elements
    assert (folder / WEIGHTS_NAME).stat().st_size < 2.1 * elements
