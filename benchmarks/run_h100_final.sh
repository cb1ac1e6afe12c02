#!/usr/bin/env bash
# One device call: the Hopper-kernel GPU tests (forward, and the opt-in backward),
# the differential-attention benchmark (Hopper forward and backward, portable
# kernel, cuDNN, the reference) and the bounded-layer benchmark. At 5919f65 it
# produced diff_attention_h100.json, hopper_tests_gpu.log and layer_h100_v4.json.
# Usage (device tool, carry [".whl"] holding the coda-gqa-l wheel):  bash benchmarks/run_h100_final.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -k hopper \
    --tb=short -rA tests/test_diff_flash.py > "$OUT/hopper_tests_gpu.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" "$OUT/hopper_tests_gpu.log" | head -12
timeout 200 python3 benchmarks/bench_diff_attention.py --skip ours_portable --out "$OUT/diff_attention_h100.json" \
    2>&1 | grep -v "^W\|Warning" > "$OUT/diff_attention.log"
python3 - "$OUT/diff_attention_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["lengths"]:
    print(e["L"], {k: round(v["tflops"]) for k, v in e["forward"].items()},
          {k: round(v["tflops"]) for k, v in e["forward_backward"].items()},
          {k: {n: round(x, 2) for n, x in v.items()} for k, v in e.get("ratios", {}).items()},
          e.get("errors", ""))
PY
timeout 170 python3 benchmarks/bench_layer.py --out "$OUT/layer_h100.json" 2>&1 \
    | grep -v "^W\|Warning" > "$OUT/bench.log"
python3 - "$OUT/layer_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["shapes"]:
    print(e["shape"], {k: round(v, 2) for k, v in e["ratios"].items()},
          {k: round(v) for k, v in e["ours"].items()})
PY
