#!/usr/bin/env bash
# The retention study (benchmarks/retention_study.py) in one device call; the results
# JSON, the heat map PNG (where matplotlib is installed; plot_retention.py draws it
# here from the JSON otherwise), the log and the markdown tables land in $OUT, named
# after the model and the GPU (device_env.sh sets $GPU_TAG):
#
#   bash benchmarks/run_retention_study_gpu.sh MODEL_DIR CORPUS_DIR [--tag NAME] [STUDY OPTIONS]
#       a trained model checkpoint (tokenizer.json inside) and its corpus (heldout/,
#       tokenizer.json), both in the working tree or carried (carry: their paths;
#       64 MiB in all: the bf16 default model and a corpus's tokenizer and heldout/ fit)
#   bash benchmarks/run_retention_study_gpu.sh --random [--tag NAME] [STUDY OPTIONS]
#       timing only: a random-weight model of the default model's shape and bank and a
#       made-up corpus, built there first (random weights answer wrongly)
#
# --tag names the files (default: MODEL_DIR's name, or random); STUDY OPTIONS go to
# retention_study.py (e.g. --count 2, --lengths 1024,4096). The whole call stays
# under $RETENTION_LIMIT_S seconds (default 580, inside the device's 600 s per
# command): the study gets what is left after the inputs are built and is stopped
# there, having written nothing; too long a study is run in parts (other --lengths,
# --facts or --seed) and merged with benchmarks/retention_merge.py.
source benchmarks/device_env.sh
began=$(date +%s)
limit=${RETENTION_LIMIT_S:-580}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax, orbax.checkpoint, tokenizers, tqdm; print('jax', jax.__version__, \
jax.devices()[0].device_kind)" || { echo "missing packages (see KINDS.md)"; exit 1; }
if [[ "${1:-}" == "--random" ]]; then
  shift
  name=random
  python3 benchmarks/retention_fixture.py /tmp/retention_inputs --shape default \
      > "$OUT/retention_fixture.log" 2>&1 || { tail -20 "$OUT/retention_fixture.log"; exit 1; }
  echo "inputs built in $(( $(date +%s) - began )) s"
  model=/tmp/retention_inputs/model corpus=/tmp/retention_inputs/corpus
else
  if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL_DIR CORPUS_DIR [options] | $0 --random [options]" >&2; exit 2
  fi
  model=$1 corpus=$2; shift 2
  name=$(basename "$model")
fi
if [[ "${1:-}" == "--tag" ]]; then name=$2; shift 2; fi
results="$OUT/retention_${name}_${GPU_TAG}.json"
left=$(( limit - ($(date +%s) - began) ))
echo "study: up to $left s"
start=$(date +%s)
timeout "$left" python3 benchmarks/retention_study.py --model "$model" --corpus "$corpus" \
    --out "$results" --plot "${results%.json}.png" --no-progress "$@" \
    > "$OUT/retention_study_${name}.log" 2>&1
code=$?
echo "study: exit $code after $(( $(date +%s) - start )) s$( (( code == 124 )) && echo \
  ' (stopped at the time limit: nothing written; run fewer --lengths or a smaller --count)')"
grep -v "^W[0-9]\|Warning\|warn(" "$OUT/retention_study_${name}.log" | tail -45
if [[ -f "$results" ]]; then
  python3 benchmarks/plot_retention.py "$results" --table > "${results%.json}.md"
fi
exit $code
