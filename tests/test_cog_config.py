"""cog.yaml against cog's own config schema, and what it promises about the build."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# cog's JSON schema for cog.yaml, kept in the shared folder beside the repository.
COG_CONFIG_SCHEMA = ROOT.parent / "shared" / "cog" / "config_schema_v1.0.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def requirements(config: dict) -> dict[str, str]:
    lines = (ROOT / config["build"]["python_requirements"]).read_text().splitlines()
    pinned = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert match, f"not pinned: {line!r}"
        pinned[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pinned


def test_cog_yaml_validates_against_cogs_schema(config: dict) -> None:
    assert COG_CONFIG_SCHEMA.is_file(), f"cog's config schema is missing: {COG_CONFIG_SCHEMA}"
    schema = json.loads(COG_CONFIG_SCHEMA.read_text())
    jsonschema.validate(config, schema)


def test_a_schema_violation_is_caught() -> None:
    schema = json.loads(COG_CONFIG_SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"build": {"gpu": "yes", "python_version": "3.12"}}, schema)


def test_gpu_build_with_the_runner_and_pinned_requirements(config: dict) -> None:
    build = config["build"]
    assert build["gpu"] is True
    assert config["run"] == "predict.py:Runner"
    assert (ROOT / config["run"].split(":")[0]).is_file()
    pinned = requirements(config)
    assert "xformers" not in pinned and "depth-anything-3" not in pinned
    # torch 2.13.0's wheels are built against CUDA 13.0 and support Python 3.10-3.14.
    assert pinned["torch"] == "2.13.0" and build["cuda"] == "13.0"
    assert build["python_version"] in ("3.10", "3.11", "3.12", "3.13")
    # What the server needs beyond da3cog's own dependencies.
    assert {"av", "gsplat", "hf-xet", "huggingface-hub"} <= set(pinned)
    for name in ("cog", "coglet"):
        assert name not in pinned, "cog installs its own SDK (build.sdk_version)"


def test_versions_match_the_tested_ones(config: dict) -> None:
    """cog.yaml pins the SDK, pyproject's cog extra pins the same for the tests."""
    from importlib.metadata import version

    assert config["build"]["sdk_version"] == version("cog") == version("coglet")
    assert requirements(config)["av"] == version("av")


def test_gsplat_kernels_are_built_at_build_time(config: dict) -> None:
    commands = [
        step["command"] if isinstance(step, dict) else step for step in config["build"]["run"]
    ]
    assert any("gsplat.cuda._backend" in command for command in commands)
    assert "TORCH_EXTENSIONS_DIR=/opt/torch_extensions" in config["environment"]
