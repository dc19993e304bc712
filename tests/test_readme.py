"""The README's first commands, run as a newcomer would.

The first code block's first line installs and runs the main job; its CLI part runs here on
the bundled sample photos, with ``--model small`` resolved through a Hugging Face cache that
holds a random-weight DA3-SMALL checkpoint in the Hub's own layout (offline), so the command
is run exactly as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0" * 40


def first_commands() -> list[str]:
    """The command lines of the README's first code block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "the README has no bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def hub_cache_with(repo_id: str, checkpoint: Path, cache: Path) -> None:
    """``cache`` as huggingface_hub lays out a downloaded ``repo_id`` at revision main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_the_readme_opens_with_an_install_and_run_line_and_the_test_line() -> None:
    commands = first_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install torch==2.13.0 -e . && da3cog predict")
    assert commands[1] == "bash scripts/test.sh"


def test_the_first_command_runs_on_the_bundled_samples(
    tmp_path: Path, small_checkpoint: Path
) -> None:
    cli = first_commands()[0].split(" && ", 1)[1]
    argv = shlex.split(cli)
    assert argv[0] == "da3cog" and "--sample" in argv
    cache = tmp_path / "hf-cache"
    hub_cache_with("depth-anything/DA3-SMALL", small_checkpoint, cache)
    env = {
        **os.environ,
        "DA3COG_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "OMP_NUM_THREADS": "2",
    }
    executable = Path(sys.executable).parent / "da3cog"
    assert executable.is_file(), "the da3cog entry point is not installed"
    result = subprocess.run(
        [str(executable), *argv[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / argv[argv.index("--out") + 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {
        "id": "depth-anything/DA3-SMALL",
        "revision": COMMIT,
        "preset": "da3-small",
        "precision": "fp32",
    }
    assert [view["name"] for view in manifest["views"]] == ["rocket", "coffee"]
    for name in ("rocket", "coffee"):
        assert (out / f"depth_{['rocket', 'coffee'].index(name):04d}_{name}.npy").is_file()


@pytest.mark.parametrize("name", ["rocket.jpg", "coffee.jpg"])
def test_the_sample_photos_ship_with_the_package(name: str) -> None:
    from da3cog.io.images import read_image_header
    from da3cog.samples import sample_paths

    paths = {path.name: path for path in sample_paths()}
    header = read_image_header(paths[name])
    assert header.format == "JPEG" and max(header.width, header.height) == 480
