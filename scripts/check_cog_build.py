"""Rehearse the GPU image's Python build without Docker: does gsplat compile, and stay compiled?

cog turns cog.yaml into a Dockerfile whose steps are, in order: ``environment`` as ENV lines,
``pip install -r`` of ``build.python_requirements``, then each ``build.run`` command (the ENV
lines stay in the image, so requests see the same environment). This script replays those
steps on this machine, which needs the CUDA toolkit (nvcc of cog.yaml's ``build.cuda``) but
no GPU, as a ``docker build`` has none:

1. a virtual environment of ``build.python_version`` with ``requirements-cog.txt`` installed
   from PyPI (the CUDA build of torch: several GB, downloaded once into the work folder);
2. every ``build.run`` command, with cog.yaml's environment (absolute paths in it are moved
   under the work folder's ``rootfs/``);
3. a fresh process with the same environment, as the first request would be, that loads
   gsplat's kernels: it must not compile anything again (every object file unchanged);
4. the GPU architectures the kernels were compiled for (nvcc's flags in ``build.ninja``).

What it cannot show without a GPU: that the kernels run. Usage (the compile took 22 min on
2 cores; ``--skip-build`` reuses it):

    python scripts/check_cog_build.py [--workdir .cache/cog-build-check] [--python python3.12]
        [--skip-build]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock_cog_requirements import PYPI, find_python, venv_pip

ROOT = Path(__file__).resolve().parent.parent
LOAD_KERNELS = (
    "import time; started = time.perf_counter()\n"
    "from gsplat.cuda._backend import _C\n"
    "assert _C is not None, 'gsplat kernels did not load'\n"
    "print(f'loaded {_C.__file__} in {time.perf_counter() - started:.1f} s')\n"
)


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run, echoing the command; return seconds taken. Raises CalledProcessError."""
    print("+", " ".join(command)[:300], flush=True)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - started


def nvcc_release(nvcc: str) -> str:
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", output)
    if match is None:
        raise SystemExit(f"cannot read the CUDA release from `{nvcc} --version`")
    return match.group(1)


def image_environment(entries: list[str], rootfs: Path) -> dict[str, str]:
    """cog.yaml's ``environment``, absolute paths moved under ``rootfs``."""
    variables = {}
    for entry in entries:
        name, value = entry.split("=", 1)
        variables[name] = str(rootfs / value.lstrip("/")) if value.startswith("/") else value
    return variables


def object_files(folder: Path) -> dict[str, int]:
    """Compiled files of the extension build folder and their modification times (ns)."""
    return {
        path.name: path.stat().st_mtime_ns
        for path in folder.rglob("*")
        if path.suffix in (".o", ".so")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "cog-build-check")
    parser.add_argument("--python", help="interpreter of cog.yaml's build.python_version")
    parser.add_argument(
        "--skip-build",
        action="store_true",
        help="keep an earlier run's compiled kernels; check only the load and the flags",
    )
    args = parser.parse_args()

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    build = config["build"]
    # As in the CUDA base images: the toolkit in /usr/local/cuda, its bin first on PATH (which
    # is how torch finds the headers; a bare nvcc wrapper elsewhere on PATH would not do).
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = str(cuda_home / "bin" / "nvcc")
    if not Path(nvcc).is_file():
        raise SystemExit(f"no {nvcc}: this check needs the CUDA toolkit (no GPU); set CUDA_HOME")
    release = nvcc_release(nvcc)
    if release != build["cuda"]:
        raise SystemExit(f"nvcc is CUDA {release}, cog.yaml asks for {build['cuda']}")

    workdir = args.workdir.resolve()
    venv = workdir / f"venv-py{build['python_version']}"
    fresh = not (venv / "bin" / "python").exists()
    python = (args.python or find_python(build["python_version"])) if fresh else None
    pip = venv_pip(venv, python)
    requirements = ROOT / build["python_requirements"]
    install_seconds = run(
        [
            *pip,
            "install",
            "-q",
            "--index-url",
            PYPI,
            "-r",
            str(requirements),
            f"cog=={build['sdk_version']}",
        ]
    )

    rootfs = workdir / "rootfs"
    variables = image_environment(config.get("environment") or [], rootfs)
    path = f"{venv / 'bin'}:{cuda_home / 'bin'}:{os.environ['PATH']}"
    env = {**os.environ, **variables, "PATH": path}
    extensions = Path(env["TORCH_EXTENSIONS_DIR"])
    build_seconds = []
    if not args.skip_build:
        if extensions.exists():
            shutil.rmtree(extensions)  # a clean build, as in a fresh image
        for step in build.get("run") or []:
            command = step["command"] if isinstance(step, dict) else step
            build_seconds.append(run(["bash", "-c", command], env=env))

    compiled = object_files(extensions)
    if not any(name.endswith(".so") for name in compiled):
        raise SystemExit(f"the build steps left no compiled extension in {extensions}")
    load_seconds = run([str(venv / "bin" / "python"), "-c", LOAD_KERNELS], env=env)
    recompiled = sorted(
        name for name, mtime in object_files(extensions).items() if compiled.get(name) != mtime
    )
    if recompiled:
        raise SystemExit(f"the first request would compile again: {recompiled}")

    library = next(extensions.rglob("*.so"))
    # The nvcc flags every object was compiled with (the load above changed none of them).
    ninja = next(extensions.rglob("build.ninja")).read_text()
    cubins = sorted(set(re.findall(r"-gencode=arch=compute_\d+a?,code=(sm_\d+a?)", ninja)))
    ptx = sorted(set(re.findall(r"-gencode=arch=compute_\d+a?,code=(compute_\d+a?)", ninja)))
    print(
        "\ncog build rehearsal passed:\n"
        f"  torch and requirements installed in {install_seconds:.0f} s\n"
        f"  build.run steps: {', '.join(f'{s:.0f} s' for s in build_seconds) or 'skipped'}\n"
        f"  {library.name}: {library.stat().st_size / 2**20:.1f} MiB, compiled for "
        f"{', '.join(cubins)}; PTX for {', '.join(ptx) or 'none'}\n"
        f"  a fresh process loaded the kernels in {load_seconds:.1f} s without recompiling\n"
        "  not checked here: that the kernels run (no GPU)"
    )


if __name__ == "__main__":
    main()
