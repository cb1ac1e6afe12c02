#!/usr/bin/env bash
# Where does the query prefill's CUDA_ERROR_ILLEGAL_ADDRESS at >= 192 rows come from?
# (docs/results.md, "On the GPU, 256 query rows fault".) bank_options_gpu.py's shipped
# bank (2 layers, random weights, a 1,000-token document, then a question) at ROWS rows
# under compute-sanitizer's memcheck, which names the faulting kernel; XLA's optimised
# HLO and buffer assignment of the prefill programs are kept to map the kernel (a fusion
# name, or a library's) to its ops and buffer sizes.
#   bash benchmarks/investigations/fault_sanitize_gpu.sh [ROWS] [SECONDS]
# Out ($OUT): fault_sanitizer.txt (memcheck's report), fault_hlo.tar.gz (the dump).
source benchmarks/device_env.sh
rows=${1:-192}
limit=${2:-240}
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
            | head -1)
echo "compute-sanitizer: ${sanitizer:-none}"
dump=/tmp/fault_dump; rm -rf "$dump"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# No autotuning (each tried kernel would run under memcheck too); no command buffers,
# so that each kernel is launched, and reported, on its own.
export XLA_FLAGS="--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer= \
--xla_dump_to=$dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*prefill.*"
run=(python3 benchmarks/investigations/bank_options_gpu.py summary 0 sinks 4)
start=$(date +%s)
if [[ -n "$sanitizer" ]]; then
  ROWS=$rows DOC=1000 timeout "$limit" "$sanitizer" --tool memcheck --print-limit 4 \
      --show-backtrace device "${run[@]}" > "$OUT/fault_sanitizer.txt" 2>&1
else
  ROWS=$rows DOC=1000 CUDA_LAUNCH_BLOCKING=1 timeout "$limit" "${run[@]}" \
      > "$OUT/fault_sanitizer.txt" 2>&1
fi
echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/fault_sanitizer.txt"
grep -v "^W0000\|^I0000" "$OUT/fault_sanitizer.txt" | grep -i -B2 -A12 "invalid\|error\|exit" \
    | head -80
(cd "$dump" 2>/dev/null && tar czf "$OUT/fault_hlo.tar.gz" \
    $(ls | grep -i "after_optimizations\|buffer-assignment" | grep -i prefill) 2>/dev/null)
ls -la "$OUT"
