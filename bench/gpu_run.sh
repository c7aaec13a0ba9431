#!/usr/bin/env bash
# One prepared run of the GPU benchmark for a lent GPU machine: installs
# nothing beyond `make install`, starts Postgres and Redis as `make services`
# does, and prints the engine table for ViT-B and ViT-H (batch 1-16, fp32
# and bf16, compile off and on), SAM 2 large (batch 1-16, fp32 and bf16), SAM 3
# at facebook/sam3's sizes (batch 1/4/8, fp32 and bf16, peak memory) and
# the end-to-end rows of a `segq worker` draining 200 one-item jobs and one
# 200-item job.
#
#   bash bench/gpu_run.sh            # everything (about 10 minutes on an H100)
#   QUICK=1 bash bench/gpu_run.sh    # ViT-B, compile off, 50 items: a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
make install services >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run() { .venv/bin/python bench/engine_throughput.py --device cuda "$@"; }
if [[ -n "${QUICK:-}" ]]; then
  run --model vit_b --batches 1,4,8,16 --precisions fp32,bf16 --compile off --rounds 3 --items 50
  exit 0
fi
run --model vit_b --batches 1,4,8,16 --precisions fp32,bf16 --compile off,on --rounds 5 --items 200
run --model vit_h --batches 1,4,8,16 --precisions fp32,bf16 --compile off,on --rounds 3 --items 0
.venv/bin/python bench/engine_sam2.py --device cuda --model sam2_hiera_large --batches 1 4 8 16 --repeat 3
.venv/bin/python bench/engine_sam3.py --device cuda --batches 1 4 8 --repeat 3
