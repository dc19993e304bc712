#!/usr/bin/env bash
# The GPU rows of bench/README.md on the device machine, in parts of under 10 minutes each
# (a session's 15 minutes hold one, and the start of a second). Here, once:
#   bash bench/gpu_wheels.sh
# then, through the device tool, with carry [".whl"] and timeout_s 590:
#   bash bench/gpu_run.sh throughput     # 32 views bf16, small/base/large/giant (and the
#                                        # head-tails lever); cold start
#   bash bench/gpu_run.sh request        # the served default: giant, 1/4/8 views, exports
#   bash bench/gpu_run.sh views          # memory model on
#                                        # CUDA, many views of giant at 504 px up to 2000
#   bash bench/gpu_run.sh levers         # torch.compile + CUDA graphs, small and giant
# MODELS / COLD_MODELS narrow the throughput part (e.g. MODELS=small COLD_MODELS=nested, to
# rerun what a shorter session left). Starting the machine took about 30 s of the 15 minutes
# on 2026-12-04, and each part used close to its 590 s: one part a session, two at most.
# Each part writes its logs to $OUT (bench/.cache/gpu without one) as it goes, so a part cut
# short still returns what it measured. DA3COG_GPU_SMOKE=1 runs the same plumbing on a CPU
# at toy sizes (small only), to check the script before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: bench/gpu_run.sh throughput|request|views|levers}"
out="${OUT:-bench/.cache/gpu}"
mkdir -p "$out" bench/.cache
python="${PYTHON:-python3}"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/da3cog-site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/da3cog-site:$PWD/bench/offline_stubs"
export PYTHONUNBUFFERED=1
if [ "${DA3COG_GPU_SMOKE:-0}" = 1 ]; then
  device=cpu models="small" giant=small views=2 res=140 repeats=1 cold_models="small"
  few="4 8" many="8 16" many_res=140 chunk=4 memory_models="small"
else
  device=cuda models="${MODELS:-small base large giant}" giant=giant views=32 res=504 repeats=5
  cold_models="${COLD_MODELS:-giant nested}" few="8 32 128" many="128 512 2000" many_res=504
  chunk=120
  memory_models="giant nested small"
fi
{
  date -u
  git log -1 --format='commit %h %s' 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$out/machine.txt"

worst=0
step() {  # step NAME SECONDS COMMAND...: one bench, its log in $out/NAME.log
  local name=$1 limit=$2 status
  shift 2
  echo "== $name (at most ${limit}s): $*" | tee "$out/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
  status=${PIPESTATUS[0]}
  echo "== $name: exit $status" | tee -a "$out/$name.log"
  if [ "$status" -gt "$worst" ]; then worst=$status; fi
}

case "$part" in
  throughput)
    # shellcheck disable=SC2086
    step throughput 380 "$python" bench/bench_cpu.py --device "$device" --models $models \
      --views "$views" --repeats "$repeats" --measure latency --res "$res" --lever-heads
    # One run per side after a warm-up: on the H200 (2026-12-04) two did not fit beside
    # writing nested's 6.4 GB checkpoint.
    # shellcheck disable=SC2086
    step cold 195 "$python" bench/bench_cpu.py --device "$device" --models $cold_models \
      --measure cold --cold-runs 1 --res "$res"
    ;;
  request)
    # The e2e bench's checkpoint is bench_cpu's (both seed 0): reuse it if part 1 wrote it.
    for name in small base large giant; do
      if [ -d "bench/.cache/da3-$name-seed0" ] && [ ! -e "bench/.cache/da3-$name-random" ]; then
        ln -s "da3-$name-seed0" "bench/.cache/da3-$name-random"
      fi
    done
    step request 540 "$python" bench/bench_e2e.py --device "$device" --models "$giant" \
      --views 1 4 8 --repeats "$repeats" --res "$res" --skip-rss \
      --sides "ours bf16" upstream "ours fp32" "upstream fp32"
    ;;
  levers)
    # torch.compile on the backbone with CUDA graphs (reduce-overhead), small then giant: the
    # levers left for the 1.5x throughput target (one model a step: a cut step keeps the other).
    step compile-small 200 "$python" bench/bench_cpu.py --device "$device" --models small \
      --views "$views" --repeats "$repeats" --measure latency --res "$res" \
      --lever-compile reduce-overhead
    step compile-giant 360 "$python" bench/bench_cpu.py --device "$device" --models "$giant" \
      --views "$views" --repeats "$repeats" --measure latency --res "$res" \
      --lever-compile reduce-overhead
    ;;
  views)
    # Every view's head tails at once: what the pipeline runs on a GPU when they fit.
    # shellcheck disable=SC2086
    step memory 120 "$python" bench/memory_model.py --device "$device" --models $memory_models \
      --quick --all-tails
    # Chunks of 120 sharing 60, upstream streaming's default; one pass only where it can end.
    # shellcheck disable=SC2086
    step views-one-pass 120 "$python" bench/bench_views.py --device "$device" --model "$giant" \
      --res "$many_res" --views $few --chunk "$chunk" --paths one-pass
    # shellcheck disable=SC2086
    step views-chunked 330 "$python" bench/bench_views.py --device "$device" --model "$giant" \
      --res "$many_res" --views $many --chunk "$chunk" --paths chunked
    ;;
  *)
    echo "unknown part $part: throughput, request, views or levers" >&2
    exit 2
    ;;
esac
# The worst step's status: the part failed if any step did (each step still ran).
exit "$worst"
