#!/usr/bin/env bash
# Short device call: the Hopper GPU tests (forward and the opt-in backward), then the
# differential-attention benchmark at the given lengths only if they pass.
# Usage (device tool, carry [".whl"]):  bash benchmarks/run_h100_check.sh 8192
source benchmarks/device_env.sh
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -k hopper \
    --tb=short -rA tests/test_diff_flash.py > "$OUT/hopper_tests_gpu.log" 2>&1
tests_rc=$?
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/hopper_tests_gpu.log" | head -14
if [ $tests_rc -eq 0 ]; then
  timeout 200 python3 benchmarks/bench_diff_attention.py --skip ours_portable \
      --lengths "$@" --out "$OUT/diff_attention_h100.json" 2>&1 | grep -v "^W\|Warning" \
      > "$OUT/diff_attention.log"
  python3 - "$OUT/diff_attention_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["lengths"]:
    print(e["L"], {k: round(v["tflops"]) for k, v in e["forward"].items()},
          {k: round(v["tflops"]) for k, v in e["forward_backward"].items()},
          e.get("errors", ""))
PY
else
  grep -B5 -A40 "Error\|error:" "$OUT/hopper_tests_gpu.log" | head -150
fi
