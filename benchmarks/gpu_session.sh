#!/usr/bin/env bash
# The one prepared GPU check (at most 8 minutes: the limits below sum to 480 s; one H100/H200): the CUDA tests, the cost table of every method
# (MiT-B2 and ResNet-101 at fp16, MiT-B2 at bf16; 512 px, batch 8; plus fp32 for the speed switches), the optimiser kernels,
# the segmenter cost per switch (channels-last, compile, activation checkpointing) and the data loader.
# Writes benchmarks/results/*-cuda.{json,md} (or under $OUT) with the device named. Never a CI step.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#   DRY_RUN=1 bash benchmarks/gpu_session.sh  # print the commands only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-session.log"
: > "$LOG"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, keep going on failure, log everything
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  if [ -n "${DRY_RUN:-}" ]; then return 0; fi
  local start=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "   exit $? after $((SECONDS - start))s" | tee -a "$LOG"
}

step 10 device nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 90 cuda-tests "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider
step 150 cost-fp16 "$PY" -m benchmarks cost --device cuda --backbones mit_b2 resnet101 --sizes 512 --batch 8 \
  --amp fp16 --iters 10 --warmup 3 --no-isolate --out "$RESULTS/methods-cuda-fp16.json"
step 90 cost-bf16 "$PY" -m benchmarks cost --device cuda --backbones mit_b2 --sizes 512 --batch 8 \
  --amp bf16 --iters 10 --warmup 3 --no-isolate --out "$RESULTS/methods-cuda-bf16.json"
step 20 optimizer "$PY" -m benchmarks optimizer --device cuda --out "$RESULTS/optimizer-cuda.json"
step 70 switches "$PY" -m benchmarks models --device cuda --backbones mit_b2 resnet101 --sizes 512 --batch 8 \
  --attentions off --iters 10 --warmup 5 --options plain channels_last checkpoint compile \
  --out "$RESULTS/models-cuda.json"
step 50 dataloader "$PY" -m benchmarks dataloader --images 96 --workers 0,1,2,4,8 --out "$RESULTS/dataloader-cuda-host.json"
echo "done; log: $LOG" | tee -a "$LOG"
