#!/usr/bin/env bash
# Wheels the GPU benchmarks need on the device machine, which has Python 3.12, PyTorch,
# torchvision, scikit-image, scipy... but no network (see /work/.library/device): upstream
# (depth-anything-3, no deps) and the few of its imports that image lacks, 1.5 MB in all.
# Upstream's colmap and video exporters import pycolmap (38 MB) and moviepy + imageio-ffmpeg
# (68 MB): too large to carry, never called by the benchmarks (GLB requests), so
# bench/offline_stubs/ stands in for them at import.
#
#   bash bench/gpu_wheels.sh        # writes .whl/ (git-ignored), then: bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
rm -rf .whl
mkdir -p .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  depth-anything-3==0.1.1 omegaconf==2.4.0 addict==2.4.0 evo==1.38.1 plyfile==1.1.5 \
  trimesh==5.2.0
ls -l .whl
du -sh .whl
