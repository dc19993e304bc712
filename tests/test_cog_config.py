"""cog.yaml against cog's own config schema, and what it promises about the build."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from check_cog_build import image_environment as rehearsal_environment  # noqa: E402
from lock_cog_requirements import COG_SDK_PACKAGES, read_pins  # noqa: E402

# cog refuses these names in `environment` (replicate/cog pkg/config/env.go).
COG_RESERVED_ENVIRONMENT = re.compile(
    r"PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|PYTHONUNBUFFERED|LIBRARY_PATH|HF_ENDPOINT"
    r"|HF_HUB_ENABLE_HF_TRANSFER|(R8|REPLICATE|CUDA|NVIDIA|NV|PGET|KUBERNETES)_.*"
)
# cog's JSON schema for cog.yaml, kept in the shared folder beside the repository.
COG_CONFIG_SCHEMA = ROOT.parent / "shared" / "cog" / "config_schema_v1.0.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def requirements(config: dict) -> dict[str, str]:
    """The image's pins (``requirements-cog.txt``, the locked closure); fails on a non-pin."""
    return read_pins(ROOT / config["build"]["python_requirements"])


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


def test_the_lock_holds_every_top_level_pin(config: dict) -> None:
    """requirements-cog.txt is scripts/lock_cog_requirements.py's closure of
    requirements-cog.in: every top-level pin is in it at the same version, and cog's own SDK
    (installed by cog from build.sdk_version) is not."""
    top_level = read_pins(ROOT / "requirements-cog.in")
    locked = requirements(config)
    assert {name: locked.get(name) for name in top_level} == top_level
    assert not COG_SDK_PACKAGES & set(locked)
    # gsplat 1.5.3 imports these at run time (packaging without declaring it).
    assert {"ninja", "packaging", "jaxtyping", "rich"} <= set(locked)
    # torch's CUDA libraries are locked too (cog's own torch index rewrite does not apply to
    # a torch it does not know, so the image takes PyPI's CUDA 13.0 build).
    assert "nvidia-cudnn-cu13" in locked


def test_a_loose_requirement_fails_the_lock_reader(tmp_path: Path) -> None:
    loose = tmp_path / "requirements.txt"
    loose.write_text("torch==2.13.0\nnumpy>=2\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        read_pins(loose)


def image_environment(config: dict) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in config["environment"])


def test_environment_names_are_ones_cog_accepts(config: dict) -> None:
    for name in image_environment(config):
        assert not COG_RESERVED_ENVIRONMENT.fullmatch(name), f"cog refuses {name}"
    assert COG_RESERVED_ENVIRONMENT.fullmatch("CUDA_HOME")  # the pattern itself bites


def test_gsplat_kernels_are_built_at_build_time(config: dict) -> None:
    commands = [
        step["command"] if isinstance(step, dict) else step for step in config["build"]["run"]
    ]
    assert any("gsplat.cuda._backend" in command for command in commands)
    environment = image_environment(config)
    assert environment["TORCH_EXTENSIONS_DIR"] == "/opt/torch_extensions"
    # The architectures must be the same when building and when a request loads the kernels
    # (torch's JIT loader recompiles on changed nvcc flags), so they live in `environment`
    # (ENV lines: both) and no build step sets its own.
    architectures = environment["TORCH_CUDA_ARCH_LIST"].split(";")
    assert {"8.0", "8.6", "8.9"} <= set(architectures) and architectures[-1] == "9.0+PTX"
    assert not any("TORCH_CUDA_ARCH_LIST" in command for command in commands)


def test_the_build_rehearsal_uses_cogs_environment_under_its_own_root(
    config: dict, tmp_path: Path
) -> None:
    """scripts/check_cog_build.py replays cog.yaml's environment, absolute paths moved under
    its work folder (so a rehearsal never writes to /opt or /src)."""
    variables = rehearsal_environment(config["environment"], tmp_path)
    assert variables.keys() == image_environment(config).keys()
    assert variables["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "opt" / "torch_extensions")
    assert variables["TORCH_CUDA_ARCH_LIST"] == image_environment(config)["TORCH_CUDA_ARCH_LIST"]
