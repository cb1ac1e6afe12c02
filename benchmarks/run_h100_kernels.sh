#!/usr/bin/env bash
# One device-tool call for the Pallas kernels: the kernel tests through the Triton
# lowering (the CPU matrix plus real sizes), then the differential-attention benchmark.
# Usage (device tool, carry [".whl"] holding the coda-gqa-l wheel):  bash benchmarks/run_h100_kernels.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
JAX_PLATFORMS=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/test_diff_flash.py 2>&1 | tail -15
timeout 280 python3 benchmarks/bench_diff_attention.py --out "$OUT/diff_attention_h100.json" \
    2>&1 | grep -v "^W\|Warning" > "$OUT/diff_attention.log"
python3 - "$OUT/diff_attention_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["lengths"]:
    print(e["L"], {k: round(v["tflops"]) for k, v in e["forward"].items()},
          {k: round(v, 2) for k, v in e["ratios"].items()})
PY
