#!/usr/bin/env bash
# Builds, on this machine, what train/run_smollm2_gpu.sh needs on a device machine,
# in two folders that one device call each can carry (at most 64 MiB with the tree):
#   .gpu_a/  the GGUF file's first part, the training tokens' first shard, the manifest
#   .gpu_b/  the GGUF file's second part, the second shard, the held-out tokens and the
#            second held-out source (the Debian handbook)
# (both ignored by git: add /.gpu_a/ and /.gpu_b/ to .git/info/exclude). Then, on one
# warm machine, calls in a row (it goes back 30 s after a call):
#   carry [".gpu_a", ".whl"]:  mkdir -p /tmp/smollm2_runs/in && cp -r .gpu_a/. /tmp/smollm2_runs/in/
#   carry [".gpu_b", ".whl"]:  cp -r .gpu_b/. /tmp/smollm2_runs/in/ && bash train/run_smollm2_gpu.sh run 520
# .whl/ holds the gguf wheel for the device's Python 3.12 (pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0). The bundled
# 19M model (29 MB) does not fit beside a part: move coda_db/default_model out of the
# tree for those calls (not git rm), and back before committing.
#
#   bash train/stage_smollm2_gpu.sh WORK_DIR     # WORK_DIR keeps the corpora (reused)
# It reads the text packages of docs/training.md's corpus (apt-get install ...) and
# Debian's debian-handbook (the second held-out source); a missing one is an error.
set -euo pipefail
work=${1:?usage: $0 WORK_DIR}
mkdir -p "$work"
gguf=$(python3 -c "from convert.smollm2 import smollm2_path; print(smollm2_path())")
[[ -f "$work/smollm2/tokenizer.json" ]] || python3 -m convert gguf "$gguf" "$work/smollm2"
tok="$work/smollm2/tokenizer.json"
[[ -f "$work/corpus/manifest.json" ]] || python3 -m train.corpus "$work/corpus" --tokenizer "$tok"
[[ -f "$work/handbook/manifest.json" ]] || python3 -m train.corpus "$work/handbook" \
    --sources debian-handbook --tokenizer "$tok" --heldout-fraction 0
[[ -f "$work/subset/manifest.json" ]] || python3 -m train.corpus_subset "$work/corpus" \
    "$work/subset" --train-tokens 10000000
# Two training shards of 5M tokens (10 MB each), one per call.
if [[ ! -f "$work/subset_2/train/shards.json" ]]; then
  python3 - "$work/subset" "$work/subset_2" <<'EOF'
import shutil, sys
from pathlib import Path
from train import data
src, out = Path(sys.argv[1]), Path(sys.argv[2])
data.write_shards(data.read_tokens(src / "train"), out / "train", shard_tokens=5_000_000,
                  meta={"split": "train", "subset_of": str(src)})
shutil.copytree(src / "heldout", out / "heldout")
shutil.copy(src / "manifest.json", out / "manifest.json")
EOF
fi
rm -rf .gpu_a .gpu_b
mkdir -p .gpu_a/corpus/train .gpu_b/corpus/train .gpu_b/heldout2
split -b 49500000 "$gguf" "$work/smollm2.gguf.part-"
mv "$work/smollm2.gguf.part-aa" .gpu_a/ && mv "$work/smollm2.gguf.part-ab" .gpu_b/
cp "$work/subset_2/train/shard_00000.npy" "$work/subset_2/train/shards.json" .gpu_a/corpus/train/
cp "$work/subset_2/manifest.json" .gpu_a/corpus/
cp "$work/subset_2/train/shard_00001.npy" .gpu_b/corpus/train/
cp -r "$work/subset_2/heldout" .gpu_b/corpus/
cp -r "$work/handbook/train/." .gpu_b/heldout2/
du -sh .gpu_a .gpu_b
