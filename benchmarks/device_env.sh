# Sourced by run_on_gpu.sh, from the repository root: installs the
# reference's wheel from a carried .whl/ into /tmp/site, sets import paths and $OUT
# (the device tool's folder that comes back; /tmp/out elsewhere).
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Results files are named after the GPU they ran on (h100, h200).
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
          | grep -o 'H[0-9]\+' | tr 'H' 'h')
GPU_TAG=${GPU_TAG:-gpu}
