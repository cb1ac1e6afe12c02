#!/usr/bin/env bash
# Device call: Hopper-kernel GPU tests with tracebacks, the Mosaic launch/stage
# tuning, then the bounded-layer benchmark (prefill after the projection hoist).
# Usage (device tool, carry [".whl"]):  bash benchmarks/run_h100_call3.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -k hopper \
    --tb=short -rA tests/test_diff_flash.py > "$OUT/hopper_tests_gpu.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|assert" "$OUT/hopper_tests_gpu.log" | head -30
timeout 100 python3 benchmarks/tune_mosaic.py --out "$OUT/tune_mosaic_h100.json" 2>&1 \
    | grep -v "^W\|Warning" | tail -4
timeout 290 python3 benchmarks/bench_layer.py --out "$OUT/layer_h100.json" 2>&1 \
    | grep -v "^W\|Warning" > "$OUT/bench.log"
python3 - "$OUT/layer_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["shapes"]:
    print(e["shape"], {k: round(v, 2) for k, v in e["ratios"].items()})
PY
