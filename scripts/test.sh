#!/usr/bin/env bash
# Install the test dependencies (idempotent) and run the test suite.
# The oracle depth-anything-3==0.1.1 goes in with --no-deps: its network code needs only
# einops, omegaconf and addict (from the [test] extra); its full requirement list (xformers,
# torchvision, open3d, gradio...) is for its app. evo provides its pose alignment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# Independent readers for the exporter tests (tests/test_export_*.py), the Khronos glTF
# validator and PlayCanvas's splat-transform for the 3DGS PLY (Node.js, into the git-ignored
# .cache/npm); with DA3COG_REQUIRE_EXPORT_TOOLS=1 a missing one fails those tests instead of
# skipping them.
python -m pip install -q plyfile==1.1.5 trimesh==4.12.2 pycolmap==4.2.1 jsonschema==4.26.0
# gsplat's PyTorch reference of its rasteriser checks the splat renderer on the CPU; --no-deps
# and no import of gsplat.cuda._backend, so its CUDA kernels are never compiled here.
python -m pip install -q --no-deps gsplat==1.5.3 jaxtyping==0.3.11 wadler_lindig==0.1.8
# The Replicate model's tests run the real cog server (coglet) at the version cog.yaml pins;
# PyYAML reads cog.yaml for the config-schema test.
python -m pip install -q -e ".[cog]" pyyaml==6.0.4
# Ray Data for the batch backend's tests on a local cluster (the [batch] extra, pinned here).
python -m pip install -q -e ".[batch]" "ray[data]==2.60.0"
# The oracle last: every later pip install would check the environment and print an ERROR line
# for each requirement of its app that --no-deps left out (xformers, gradio...), though nothing
# here needs them.
python -m pip install -q --no-deps depth-anything-3==0.1.1 evo==1.38.1
# One npm command for both: a later --no-save install would prune the other package.
# splat-transform 2.7.1 is the newest release that supports Node 20 (3.x needs Node >= 22).
npm install --prefix .cache/npm --no-save --no-audit --no-fund --loglevel=error \
  gltf-validator@2.0.0-dev.3.10 @playcanvas/splat-transform@2.7.1
export DA3COG_REQUIRE_EXPORT_TOOLS=1
ruff check .
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
