#!/usr/bin/env bash
# Every GPU job of the project (benchmarks, profilers, the GPU tests) on whichever GPU the
# device tool lends (H100, H200), as phases run in the order given (one call, one warm
# machine); results files are named after the GPU (device_env.sh sets $GPU_TAG):
#
#   bash benchmarks/run_on_gpu.sh PHASE [PHASE ...]     (carry [".whl"]: the coda-gqa-l wheel)
#
#   tests [PYTEST_K]  the `gpu` tests of the kernels (tests/kernels, and the layer against cuDNN),
#                     optionally only those matching -k PYTEST_K (e.g. "tests:gradients or decode")
#   layer-tests       the bounded layer's GPU parity tests (tests/layers/test_bounded_parity.py on CUDA)
#   diff              bench_diff_attention.py (the slow portable forward skipped)
#   decode[:PKG]      bench_decode_attention.py; with :PKG also benchmarks/baselines/PKG's
#                     decode kernel (an older pallas_kernels), in the same run
#   layer             bench_layer.py (fidelity figures in the same file); $LAYER_ARGS adds
#                     its options, e.g. LAYER_ARGS="--embed-dims 4096 --skip fidelity"
#   fidelity          bench_layer.py --fidelity-only
#   profile           investigations/profile_prefill.py at block 1024 (Pallas attention),
#                     with the HLO
#   variants[:PKG]    investigations/prefill_variants.py: the current layer, and with :PKG
#                     the same layer from benchmarks/baselines/PKG (an older coda_jax), in turns;
#                     $VARIANT_ARGS adds options (e.g. --compiler-options NAME=VALUE)
#   variants-graphs   the same, unrolled, under XLA command buffers (CUDA graphs)
#   host              investigations/host_profile.py: dispatch vs ready time of a prefill
#                     call and the host's Python profile; the timings again with cuDNN and
#                     XLA attention
#   tune              tune_mosaic.py: launch order of the Hopper forward against cuDNN
#   tune-decode       tune_decode.py: slots per tile and pipeline stages of the decode kernel
#
# A phase's full log and results land in $OUT; a short table is printed.
source benchmarks/device_env.sh
inv=benchmarks/investigations  # the profilers and one-off experiments
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
quiet() { grep -v "^W\|Warning"; }

summarise_diff() {
  python3 - "$1" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["lengths"]:
    print(e["L"], {k: round(v["tflops"]) for k, v in e["forward"].items()},
          {k: round(v["tflops"]) for k, v in e["forward_backward"].items()},
          {k: {n: (round(x, 3) if isinstance(x, float) else [round(min(x), 3), round(max(x), 3)])
               for n, x in v.items()} for k, v in e.get("ratios", {}).items()},
          e.get("errors", ""))
PY
}

summarise_layer() {
  python3 - "$1" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1]))["shapes"]:
    print(e["shape"], {k: round(v, 2) if isinstance(v, float) else [min(v), max(v)]
                       for k, v in e["ratios"].items()},
          {k: round(v) for k, v in e["ours"].items()},
          {k: round(v) for k, v in e.get("ours_cudnn_attention", {}).items()},
          {k: round(v, 4) for k, v in e.get("fidelity_rel_l2_error", {}).items()})
PY
}

for phase in "$@"; do
  echo "=== $phase ($(date +%T))"
  case "$phase" in
    tests|tests:*)
      filter=${phase#tests}; filter=${filter#:}
      log="$OUT/gpu_tests$(printf %s "${filter:+_$filter}" | tr -c 'A-Za-z0-9_' '_').log"
      JAX_PLATFORMS=cuda timeout 540 python3 -m pytest -q -p no:cacheprovider -m gpu \
          ${filter:+-k "$filter"} --tb=short -rA tests/kernels \
          tests/layers/test_attention_implementations.py > "$log" 2>&1
      grep -E "^(PASSED|FAILED|ERROR)|passed|failed|^E  " "$log" | head -40 ;;
    layer-tests)
      JAX_PLATFORMS=cuda timeout 400 python3 -m pytest -q -x -p no:cacheprovider \
          tests/layers/test_bounded_parity.py > "$OUT/gpu_layer_tests.log" 2>&1
      tail -3 "$OUT/gpu_layer_tests.log" ;;
    diff)
      timeout 300 python3 benchmarks/bench_diff_attention.py --skip ours_portable \
          --out "$OUT/diff_attention_${GPU_TAG}.json" 2>&1 | quiet > "$OUT/diff_attention.log"
      summarise_diff "$OUT/diff_attention_${GPU_TAG}.json" ;;
    decode|decode:*)  # decode:PACKAGE also times benchmarks/baselines/PACKAGE's kernel
      base=${phase#decode}; base=${base#:}
      timeout 180 python3 benchmarks/bench_decode_attention.py ${base:+--baseline baselines.$base} \
          --out "$OUT/decode_attention_${GPU_TAG}.json" 2>&1 | quiet | tail -12 ;;
    layer)
      timeout 420 python3 benchmarks/bench_layer.py ${LAYER_ARGS:-} --out "$OUT/layer_${GPU_TAG}.json" 2>&1 \
          | quiet > "$OUT/bench_layer.log"
      summarise_layer "$OUT/layer_${GPU_TAG}.json"; tail -3 "$OUT/bench_layer.log" ;;
    fidelity)
      timeout 120 python3 benchmarks/bench_layer.py --fidelity-only \
          --out "$OUT/layer_fidelity_${GPU_TAG}.json" 2>&1 | quiet | tail -25 ;;
    profile)
      for impl in pallas; do
        mkdir -p "$OUT/profile_$impl"
        timeout 150 python3 $inv/profile_prefill.py --out "$OUT/profile_$impl" \
            --block 1024 --implementation $impl --chunks-per-call 4 --hlo 2>&1 | quiet | head -80
        rm -rf "$OUT"/profile_$impl/trace_*
      done ;;
    variants|variants:*)  # variants:PACKAGE adds that copy of coda_jax (benchmarks/baselines/)
      base=${phase#variants}; base=${base#:}
      timeout ${VARIANT_TIMEOUT:-240} python3 $inv/prefill_variants.py default --unroll True \
          --configs 1024x4 256x16 ${base:+--baseline baselines.$base} ${VARIANT_ARGS:-} \
          --out "$OUT/prefill_variants.json" 2>&1 | grep "tok/s\|{\|failed" ;;
    variants-graphs)  # the unrolled prefill as CUDA graphs (XLA command buffers)
      for size in 5 1; do
        XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=$size" \
            timeout 150 python3 $inv/prefill_variants.py "graphs_min$size" --unroll True \
            --configs 1024x4 256x16 2>&1 | grep "tok/s\|rror" | head -6
      done ;;
    host)
      timeout 150 python3 $inv/host_profile.py 2>&1 | quiet > "$OUT/host_profile.log"
      grep -A24 "^D=" "$OUT/host_profile.log" | cut -c1-150
      for impl in cudnn xla; do
        timeout 100 python3 $inv/host_profile.py --no-profile --implementation $impl \
            2>&1 | grep "^D="
      done ;;
    tune)
      timeout 200 python3 benchmarks/tune_mosaic.py --out "$OUT/tune_mosaic_${GPU_TAG}.json" 2>&1 \
          | quiet | tail -5 ;;
    tune-decode)
      timeout 300 python3 benchmarks/tune_decode.py --out "$OUT/tune_decode_${GPU_TAG}.json" 2>&1 \
          | quiet | grep "best\|failed" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo "=== done ($(date +%T))"
