#!/usr/bin/env bash
# A bench environment in which upstream's own pipeline runs: depth_anything_3.api.DepthAnything3
# with its input processor (torchvision), its exporters (trimesh, matplotlib, imageio, moviepy)
# and its pose alignment (evo), beside da3cog, so that bench/bench_e2e.py times both in one
# interpreter on the same torch. The test environment cannot import upstream's api: its
# torchvision does not load beside the CPU build of torch 2.13.0 that the tests use.
#
#   bash bench/upstream_env.sh [VENV]    (default bench/.cache/venv-upstream)
#
# torch 2.14.1 + torchvision 0.29.1: the pair that installs together here (a CUDA build on
# x86_64, which runs on the CPU too). Left out of upstream's requirement list: xformers (an
# optional fast path of its SwiGLU; without it upstream uses its own PyTorch code, the code the
# checkpoints were converted for), gradio/fastapi/uvicorn (its web app), open3d (not imported
# by the inference path). pycolmap only because its exporters' package imports it. OpenCV is
# the headless build of the same library.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-bench/.cache/venv-upstream}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$py" -m pip install -q -e . scikit-image pytest  # pytest: the benches reuse test helpers
"$py" -m pip install -q einops omegaconf addict "evo==1.38.1" huggingface-hub imageio \
  "moviepy==1.0.3" opencv-python-headless pillow-heif plyfile trimesh matplotlib typer tqdm \
  safetensors requests pycolmap==4.2.1
"$py" -m pip install -q --no-deps depth-anything-3==0.1.1
"$py" -c "import depth_anything_3.api, da3cog, torchvision; print('upstream env ready:', torchvision.__version__)"
