#!/usr/bin/env bash
# Device call: prefill at block 256 with 4 or 16 blocks per compiled call, with and
# without XLA command buffers over while loops (CUDA graphs for the block loop).
# Usage (device tool):  bash benchmarks/run_h100_prefill_variants.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 70 python3 benchmarks/prefill_variants.py default --unroll 1 \
    --configs 256x4 256x16 2>&1 | grep "tok/s"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    timeout 70 python3 benchmarks/prefill_variants.py command_buffer_while --unroll 1 \
    --configs 256x4 256x16 2>&1 | grep "tok/s\|rror" | head -8
