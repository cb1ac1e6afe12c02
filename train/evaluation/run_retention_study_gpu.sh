#!/usr/bin/env bash
# The retention study (python -m train.evaluation retention) in one device call, run
# from the repository's root; the results JSON, the heat map PNG (where matplotlib is
# installed; python -m train.evaluation retention-plot draws it from the JSON
# elsewhere otherwise), the log and the markdown tables land in $OUT, named after the
# model and the GPU (benchmarks/device_env.sh sets $GPU_TAG):
#
#   bash train/evaluation/run_retention_study_gpu.sh MODEL_DIR CORPUS_DIR [--tag NAME] [OPTIONS]
#       a trained model checkpoint (tokenizer.json inside) and its corpus (heldout/,
#       tokenizer.json), both in the working tree or carried (carry: their paths;
#       64 MiB in all: the bf16 default model and a corpus's tokenizer and heldout/ fit)
#   bash train/evaluation/run_retention_study_gpu.sh --random [--tag NAME] [OPTIONS]
#       timing only: a random-weight model of the default model's shape and bank and a
#       made-up corpus, built there first (random weights answer wrongly)
#
# --tag names the files (default: MODEL_DIR's name, or random); OPTIONS go to the
# study (e.g. --count 2, --lengths 1024,4096). The whole call stays under
# $RETENTION_LIMIT_S seconds (default 580, inside the device's 600 s per command): the
# study gets what is left after the inputs are built and is stopped there, having
# written nothing; too long a study is run in parts (other --lengths, --facts or
# --seed) and merged with python -m train.evaluation retention-merge. Exit codes: the
# study's (0 done, 1 usage, 2 a path not found, 3 refused or failed), 124 stopped at
# the time limit.
source benchmarks/device_env.sh
began=$(date +%s)
limit=${RETENTION_LIMIT_S:-580}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax, orbax.checkpoint, tokenizers, tqdm; print('jax', jax.__version__, \
jax.devices()[0].device_kind)" || { echo "missing packages (see KINDS.md)"; exit 1; }
if [[ "${1:-}" == "--random" ]]; then
  shift
  name=random
  python3 -m train.evaluation retention-fixture /tmp/retention_inputs --shape default \
      > "$OUT/retention_fixture.log" 2>&1 || { tail -20 "$OUT/retention_fixture.log"; exit 1; }
  echo "inputs built in $(( $(date +%s) - began )) s"
  model=/tmp/retention_inputs/model corpus=/tmp/retention_inputs/corpus
else
  if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL_DIR CORPUS_DIR [options] | $0 --random [options]" >&2; exit 1
  fi
  model=$1 corpus=$2; shift 2
  name=$(basename "$model")
fi
if [[ "${1:-}" == "--tag" ]]; then name=$2; shift 2; fi
results="$OUT/retention_${name}_${GPU_TAG}.json"
left=$(( limit - ($(date +%s) - began) ))
echo "study: up to $left s"
start=$(date +%s)
timeout "$left" python3 -m train.evaluation retention --model "$model" --corpus "$corpus" \
    --out "$results" --plot "${results%.json}.png" --no-progress "$@" \
    > "$OUT/retention_study_${name}.log" 2>&1
code=$?
echo "study: exit $code after $(( $(date +%s) - start )) s$( (( code == 124 )) && echo \
  ' (stopped at the time limit: nothing written; run fewer --lengths or a smaller --count)')"
grep -v "^W[0-9]\|Warning\|warn(" "$OUT/retention_study_${name}.log" | tail -45
if [[ -f "$results" ]]; then
  python3 -m train.evaluation retention-plot "$results" --table > "${results%.json}.md"
fi
exit $code
