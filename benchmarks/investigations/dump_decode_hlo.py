"""Dump the optimised HLO of one decode step (to find slow fusions).

    python benchmarks/investigations/dump_decode_hlo.py D HEADS KV_HEADS OUT.hlo
"""
import sys
import jax
import jax.numpy as jnp
from flax import nnx
from coda_jax import CoDAGQALandmark

d, h, kv = (int(a) for a in sys.argv[1:4])
layer = CoDAGQALandmark(embed_dim=d, num_heads=h, num_kv_heads=kv, window=256,
                        num_landmarks_exact=64, num_landmarks_summary=64,
                        param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
state = layer.init_state(1, jnp.bfloat16, key=jax.random.key(0))
x = jnp.ones((1, 1, d), jnp.bfloat16)
step = jax.jit(lambda m, x, s: m.decode_step(x, s, training=False))
text = step.lower(layer, x, state).compile().as_text()
open(sys.argv[4], "w").write(text)
