#!/usr/bin/env bash
# Device call: GPU kernel breakdown of one bounded-layer prefill (benchmarks/profile_prefill.py).
# Usage (device tool):  bash benchmarks/run_h100_profile.sh
source benchmarks/device_env.sh
for cfg in "1024 cudnn" "1024 pallas" "256 cudnn"; do set -- $cfg
  mkdir -p $OUT/p_$1_$2
  timeout 120 python3 benchmarks/profile_prefill.py --out $OUT/p_$1_$2 --block $1 --implementation $2 --chunks-per-call $((4096/$1)) 2>&1 | grep -v "^W\|Warning" | head -80
  rm -rf $OUT/p_$1_$2/trace_*
done
