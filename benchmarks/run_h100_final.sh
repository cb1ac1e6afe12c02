#!/usr/bin/env bash
# Device call 1 of 2: the Hopper-kernel GPU tests (forward with and without key
# masks, the Hopper and portable backward) and the differential-attention benchmark
# (Hopper kernels, cuDNN, the reference; the slow portable forward is skipped).
# Call 2 is run_h100_layer.sh. Usage (device tool, carry [".whl"] holding the
# coda-gqa-l wheel):  bash benchmarks/run_h100_final.sh
source benchmarks/device_env.sh
JAX_PLATFORMS=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -k "not gradients and not decode" \
    --tb=short -rA tests/test_diff_flash.py tests/test_decode_attention.py \
    > "$OUT/hopper_tests_gpu.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/hopper_tests_gpu.log" | head -30
grep -E "^E  " "$OUT/hopper_tests_gpu.log" | head -30
timeout 260 python3 benchmarks/bench_diff_attention.py --skip ours_portable --out "$OUT/diff_attention_h100.json" \
    2>&1 | grep -v "^W\|Warning" > "$OUT/diff_attention.log"
python3 - "$OUT/diff_attention_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["lengths"]:
    print(e["L"], {k: round(v["tflops"]) for k, v in e["forward"].items()},
          {k: round(v["tflops"]) for k, v in e["forward_backward"].items()},
          {k: {n: round(x, 2) for n, x in v.items()} for k, v in e.get("ratios", {}).items()},
          e.get("errors", ""))
PY
