"""Tile and pipeline settings of the bounded decode kernel (tuning aid).

    python benchmarks/tune_decode.py --out tune_decode_h200.json

Times ``decode_attention`` as bench_decode_attention.py does (one token, H=32,
Hkv=8, Dh=128, bf16, a key mask with holes) at the batches where it is
bandwidth-bound, for every combination of slots per tile (``block_s``) and
pipeline stages, and prints achieved GB/s per setting, then the three best
settings of each case.
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax

from bench_decode_attention import decode_inputs, kv_bytes_read, per_call_seconds
from pallas_kernels.decode_attention import decode_attention

# Warps (4 or 8) and block_s 128 were flat on the H100 (tune_decode_h100.json); several
# KV heads per program and sequence-major launch order lost on the H200 (NOTES.md).
SETTINGS = {"block_s": (32, 64), "num_stages": (2, 3, 4)}
CASES = ((64, 384), (256, 384), (256, 768))  # (batch, slots)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {"what": __doc__.split("\n\n")[0], "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "GBs": {}}
    for batch, slots in CASES:
        inputs = decode_inputs(batch, slots, seed=batch + slots)
        kv_bytes = kv_bytes_read(inputs)
        for values in itertools.product(*SETTINGS.values()):
            setting = dict(zip(SETTINGS, values))

            def fn(*a, setting=setting):
                return decode_attention(*a[:6], norm_weight=a[6], interpret=False, **setting)
            try:
                gbs = kv_bytes / per_call_seconds(fn, *inputs) / 1e9
            except Exception as error:  # noqa: BLE001  (a setting the GPU cannot fit)
                print(batch, slots, setting, "failed:", str(error)[:200], flush=True)
                continue
            label = f"B{batch} S{slots} " + " ".join(f"{n}={x}" for n, x in setting.items())
            results["GBs"][label] = round(gbs)
            print(label, round(gbs), flush=True)
    for batch, slots in CASES:
        prefix = f"B{batch} S{slots} "
        ranked = sorted(((gbs, label) for label, gbs in results["GBs"].items()
                         if label.startswith(prefix)), reverse=True)
        print("best:", ranked[:3], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
