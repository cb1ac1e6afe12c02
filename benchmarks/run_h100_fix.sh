#!/usr/bin/env bash
# Device call: the masked Hopper forward's GPU tests (empty-bank prefixes, the layer
# shapes against cuDNN) and the bounded layer's fidelity figures.
# Usage (device tool, carry [".whl"]):  bash benchmarks/run_h100_fix.sh
source benchmarks/device_env.sh
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu \
    -k "empty_prefix or bounded_layer or no_key" --tb=short -rA tests/test_diff_flash.py \
    > "$OUT/gpu_tests_masked.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|^E  " "$OUT/gpu_tests_masked.log" | head -20
timeout 120 python3 benchmarks/bench_layer.py --fidelity-only --out "$OUT/layer_fidelity_h100.json" \
    2>&1 | grep -v "^W\|Warning" | tail -25
