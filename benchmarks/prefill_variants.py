"""Prefill tokens/s of our bounded layer under loop-shape variants (tuning aid)."""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import coda_jax.bounded as bounded
from coda_jax import CoDAGQALandmark


def timed(fn, repeats=5):
    fn(); fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)


for d, h, kv in ((512, 8, 2), (4096, 32, 8)):
    layer = CoDAGQALandmark(embed_dim=d, num_heads=h, num_kv_heads=kv, window=256,
                            num_landmarks_exact=64, num_landmarks_summary=64,
                            param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 4096, d), jnp.bfloat16)
    st = layer.init_state(1, jnp.bfloat16, key=jax.random.key(2))
    for unroll in (1, True):
        bounded.PREFILL_UNROLL = unroll
        for block, cpc in ((256, 4), (256, 16), (1024, 4)):
            sec = timed(lambda: jax.block_until_ready(
                layer.prefill(x, st, block_size=block, chunks_per_call=cpc)))
            print(f"{sys.argv[1] if len(sys.argv) > 1 else ''} D={d} unroll={unroll} "
                  f"block={block} chunks_per_call={cpc}: {4096 / sec / 1e3:.0f} K tok/s",
                  flush=True)
