#!/usr/bin/env bash
# Device call: prefill tokens/s with the block loop unrolled or not, with and without
# XLA command buffers over while loops (benchmarks/prefill_variants.py).
# Usage (device tool):  bash benchmarks/run_h100_unroll.sh
source benchmarks/device_env.sh
timeout 200 python3 benchmarks/prefill_variants.py default --unroll True 1 \
    --configs 1024x4 256x16 2>&1 | grep "tok/s"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" \
    timeout 200 python3 benchmarks/prefill_variants.py command_buffers --unroll True 1 \
    --configs 1024x4 256x16 2>&1 | grep "tok/s\|rror" | head -12
