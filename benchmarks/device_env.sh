# Sourced by the run_h100*.sh device scripts, from the repository root: installs the
# reference's wheel from a carried .whl/ into /tmp/site, sets import paths and $OUT
# (the device tool's folder that comes back; /tmp/out elsewhere).
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
