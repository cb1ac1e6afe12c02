#!/usr/bin/env bash
# Device call 2 of 2: the bounded-layer benchmark against the reference
# (bench_layer.py) and the GPU kernel breakdown of one prefill (profile_prefill.py).
# Usage (device tool, carry [".whl"]):  bash benchmarks/run_h100_layer.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 330 python3 benchmarks/bench_layer.py --out "$OUT/layer_h100.json" 2>&1 \
    | grep -v "^W\|Warning" > "$OUT/bench.log"
python3 - "$OUT/layer_h100.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["shapes"]:
    print(e["shape"], {k: round(v, 2) for k, v in e["ratios"].items()},
          {k: round(v) for k, v in e["ours"].items()},
          {k: round(v) for k, v in e["ours_cudnn_attention"].items()},
          {k: round(v, 4) for k, v in e["fidelity_rel_l2_error"].items()})
PY
tail -3 "$OUT/bench.log"
for block in 1024 256; do
  mkdir -p "$OUT/profile_$block"
  timeout 90 python3 benchmarks/profile_prefill.py --out "$OUT/profile_$block" --block $block \
      2>&1 | grep -E '"(D|wall_ms_per_call|gpu_busy_ms_per_call|kernels_per_call)"|diff_flash|sdpa'
  rm -rf "$OUT/profile_$block"/trace_*
done
