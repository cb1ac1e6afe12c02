#!/usr/bin/env bash
# One device-tool call: GPU parity tests, the layer benchmark, prefill loop variants.
# Usage (device tool, carry [".whl"] holding the coda-gqa-l wheel):  bash benchmarks/run_h100.sh
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
JAX_PLATFORMS=cuda timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_bounded_parity.py 2>&1 | tail -3
timeout 300 python3 benchmarks/bench_layer.py --out "$OUT/layer_h100.json" 2>&1 \
    | grep -v "^W\|Warning" > "$OUT/bench.log"
python3 - "$OUT/layer_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["shapes"]:
    print(e["shape"], {k: round(v, 2) for k, v in e["ratios"].items()})
PY
timeout 200 python3 benchmarks/prefill_variants.py default 2>&1 | grep "tok/s"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    timeout 200 python3 benchmarks/prefill_variants.py command_buffer_while 2>&1 | grep "tok/s\|rror" | head -12
