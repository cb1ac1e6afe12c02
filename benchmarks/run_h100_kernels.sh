#!/usr/bin/env bash
# One device-tool call for the Pallas kernels: the GPU kernel tests (Hopper and
# portable kernels at real sizes, decode sizes), then the differential-attention
# and decode-attention benchmarks.
# Usage (device tool, carry [".whl"] holding the coda-gqa-l wheel):  bash benchmarks/run_h100_kernels.sh
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rA \
    tests/test_diff_flash.py tests/test_decode_attention.py > "$OUT/kernel_tests_gpu.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/kernel_tests_gpu.log" | tail -20
timeout 240 python3 benchmarks/bench_diff_attention.py --out "$OUT/diff_attention_h100.json" \
    2>&1 | grep -v "^W\|Warning" > "$OUT/diff_attention.log"
python3 - "$OUT/diff_attention_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["lengths"]:
    print(e["L"], {k: round(v["tflops"]) for k, v in e["forward"].items()},
          {k: round(v["tflops"]) for k, v in e["forward_backward"].items()}, e["ratios"],
          e.get("errors", ""))
PY
timeout 120 python3 benchmarks/bench_decode_attention.py --out "$OUT/decode_attention_h100.json" \
    2>&1 | grep -v "^W\|Warning" | tail -12
