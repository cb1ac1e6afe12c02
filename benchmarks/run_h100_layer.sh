#!/usr/bin/env bash
# Device call 2 of 2: the bounded-layer benchmark against the reference
# (bench_layer.py), then the GPU gradient and decode tests.
# Usage (device tool, carry [".whl"]):  bash benchmarks/run_h100_layer.sh
source benchmarks/device_env.sh
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
JAX_PLATFORMS=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu \
    -k "gradients or decode" --tb=short -rA tests/test_diff_flash.py tests/test_decode_attention.py \
    > "$OUT/gpu_tests_gradients.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|^E  " "$OUT/gpu_tests_gradients.log" | head -30
