"""Prefill tokens/s of our bounded layer under loop-shape variants (tuning aid).

    python benchmarks/prefill_variants.py LABEL [--unroll 1 True] [--configs 256x4 256x16 1024x4]

Each config is block_size x chunks_per_call; L=4096, bf16, W=256/Me=64/Ms=64,
the two layer shapes of bench_layer.py. Run it again under other XLA_FLAGS to
compare (LABEL tags the lines).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import coda_jax.bounded as bounded
from bench_layer import CACHE, LENGTH, SHAPES
from coda_jax import CoDAGQALandmark


def timed(fn, repeats=5):
    fn(); fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)


parser = argparse.ArgumentParser()
parser.add_argument("label")
parser.add_argument("--unroll", nargs="*", default=["1", "True"])
parser.add_argument("--configs", nargs="*", default=["256x4", "256x16", "1024x4"])
args = parser.parse_args()
for shape in SHAPES:
    d = shape["embed_dim"]
    layer = CoDAGQALandmark(**shape, **CACHE, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, LENGTH, d), jnp.bfloat16)
    st = layer.init_state(1, jnp.bfloat16, key=jax.random.key(2))
    for unroll in args.unroll:
        bounded.PREFILL_UNROLL = True if unroll == "True" else int(unroll)
        for config in args.configs:
            block, cpc = map(int, config.split("x"))
            sec = timed(lambda: jax.block_until_ready(
                layer.prefill(x, st, block_size=block, chunks_per_call=cpc)))
            print(f"{args.label} D={d} unroll={unroll} block={block} chunks_per_call={cpc}: "
                  f"{LENGTH / sec / 1e3:.0f} K tok/s", flush=True)
