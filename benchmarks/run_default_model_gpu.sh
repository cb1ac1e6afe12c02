#!/usr/bin/env bash
# The bundled default model's recipe (python -m train.default_model, configs/default_model.yaml)
# in one device call, from a corpus carried as a tar.xz of python -m train.corpus's output
# (train/, heldout/, tokenizer.json):
#
#   bash benchmarks/run_default_model_gpu.sh .gpu_data/corpus_full.tar.xz   (carry [".gpu_data"])
#
# Back in $OUT: default_model_<gpu>.json (the stages' configs, summaries and metrics, and the
# quick retention check) and export/ (the bf16 shards, export.json, card.json, tokenizer.json:
# what python -m train.bundle takes). The log's tail is printed. FROM_STAGE=NAME BASE=MODEL
# resume the recipe at stage NAME from MODEL (e.g. the bundled coda_db/default_model).
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
if [[ $# -ne 1 || ! -f "$1" ]]; then
  echo "usage: $0 CORPUS_TAR_XZ" >&2; exit 2
fi
corpus=/tmp/default_model_corpus run=/tmp/default_model_run
mkdir -p "$corpus" && tar -xJf "$1" -C "$corpus" || exit 1
resume=()
[[ -n "${FROM_STAGE:-}" ]] && resume=(--from-stage "$FROM_STAGE" --base "${BASE:?BASE: the model to resume from}")
start=$(date +%s)
timeout "${TRAIN_TIMEOUT:-570}" python3 -m train.default_model --corpus "$corpus" --out "$run" \
    --no-progress --checks "${CHECKS:-bounded,unbounded}" "${resume[@]}" > /tmp/default_model.log 2>&1
code=$?
echo "recipe: exit $code after $(( $(date +%s) - start )) s"
grep -v "^W\|Warning\|^I0000\|^  warnings" /tmp/default_model.log | tail -60
[[ -f "$run/retention_quick.json" ]] && cp "$run/retention_quick.json" "$OUT/default_model_${GPU_TAG}.json"
[[ -d "$run/export" ]] && cp -r "$run/export" "$OUT/export"
exit $code
