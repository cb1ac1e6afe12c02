"""Schedule choices of the Hopper forward, timed against both cuDNN baselines.

B=1, H=32, Hkv=8, Dh=128, causal, bf16: the forward of
``diff_flash_mgpu.mosaic_forward`` with heavy_first on and off (the launch
order of the causal query tiles), next to the two cuDNN baselines of
``bench_diff_attention`` in the same process, the variants timed in turns.
Prints one JSON line per length, with each variant's error against two cuDNN
calls and each round's ratio to the faster cuDNN baseline.

    python benchmarks/tune_mosaic.py --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from bench_diff_attention import B, DH, H, HKV, cudnn_stacked, cudnn_two, time_interleaved
from bench_layer import rel_err
from pallas_kernels.diff_flash_mgpu import MosaicConfig, mosaic_forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    args = parser.parse_args()
    runs = []
    for length in args.lengths:
        keys = jax.random.split(jax.random.key(length), 6)
        q, qn = (jax.random.normal(kk, (B, length, H, DH), jnp.bfloat16) for kk in keys[:2])
        k, v = (jax.random.normal(kk, (B, length, HKV, DH), jnp.bfloat16) for kk in keys[2:4])
        lam = jax.nn.sigmoid(jax.random.normal(keys[4], (B, length, H)))
        w = jnp.ones((DH,), jnp.float32)
        flops = 2 * 4 * B * H * length ** 2 * DH / 2
        entry = {"L": length, "tflops": {}}
        lam_bhl = jnp.swapaxes(lam, 1, 2)
        fns = {name: functools.partial(jax.jit(fn), q, qn, k, v, lam, w)
               for name, fn in (("cudnn_two", cudnn_two), ("cudnn_stacked", cudnn_stacked))}
        reference = np.asarray(fns["cudnn_two"](), np.float32)
        for heavy_first in (True, False):
            cfg = MosaicConfig(64, 128, 2, causal=True, head_norm=True, eps=1e-6,
                               heavy_first=heavy_first)
            name = f"heavy_first={heavy_first}"
            fn = functools.partial(
                jax.jit(lambda *a, cfg=cfg: mosaic_forward(cfg, *a, residuals=False)),
                q, qn, k, v, lam_bhl, w)
            try:
                out = np.asarray(fn(), np.float32)
                fns[name] = fn
                entry.setdefault("rel_l2_to_cudnn_two", {})[name] = rel_err(out, reference)
            except Exception as err:  # noqa: BLE001  (recorded)
                entry["tflops"][name] = f"{type(err).__name__}: {str(err)[:300]}"
        timings = time_interleaved(fns)
        for name, secs in timings.items():
            entry["tflops"][name] = flops / statistics.median(secs) / 1e12
        # Per round: the faster cuDNN baseline's time over each variant's.
        best = [min(pair) for pair in zip(timings["cudnn_two"], timings["cudnn_stacked"])]
        entry["rounds_vs_faster_cudnn"] = {
            name: [round(b / t, 3) for b, t in zip(best, secs)]
            for name, secs in timings.items() if not name.startswith("cudnn")}
        runs.append(entry)
        print(json.dumps(entry), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
