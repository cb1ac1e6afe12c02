"""Launch-order and pipeline-depth choices of the Hopper forward, timed against cuDNN.

B=1, H=32, Hkv=8, Dh=128, causal, bf16: the forward of
``diff_flash_mgpu.mosaic_forward`` with heavy_first on/off and 2 or 3 K/V
stages, next to the stacked cuDNN call of ``bench_diff_attention`` in the same
process. Prints one JSON line per length.

    python benchmarks/tune_mosaic.py --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp

from bench_diff_attention import B, DH, H, HKV, cudnn_stacked, time_interleaved
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
        fns = {"cudnn_stacked": functools.partial(jax.jit(cudnn_stacked), q, qn, k, v, lam, w)}
        for heavy_first in (True, False):
            for stages in (2, 3):
                cfg = MosaicConfig(64, 128, stages, causal=True, head_norm=True, eps=1e-6,
                                   heavy_first=heavy_first)
                name = f"heavy_first={heavy_first},stages={stages}"
                fn = functools.partial(
                    jax.jit(lambda *a, cfg=cfg: mosaic_forward(cfg, *a, residuals=False)),
                    q, qn, k, v, lam_bhl, w)
                try:
                    jax.block_until_ready(fn())
                    fns[name] = fn
                except Exception as err:  # noqa: BLE001  (recorded)
                    entry["tflops"][name] = f"{type(err).__name__}: {str(err)[:300]}"
        for name, secs in time_interleaved(fns).items():
            entry["tflops"][name] = flops / statistics.median(secs) / 1e12
        runs.append(entry)
        print(json.dumps(entry), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
