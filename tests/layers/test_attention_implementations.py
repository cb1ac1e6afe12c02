"""The bounded layer under each attention implementation: Pallas kernels against XLA
(CPU, interpret mode) and against cuDNN (GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_inputs import rel_err
from coda_jax import CoDAGQALandmark


def test_bounded_layer_with_the_pallas_switch_matches_xla():
    def layer(impl):
        return CoDAGQALandmark(embed_dim=128, num_heads=4, num_kv_heads=2, window=16,
                               num_landmarks_exact=8, num_landmarks_summary=8,
                               detach_evicted=False, implementation=impl, rngs=nnx.Rngs(0))

    x = jax.random.normal(jax.random.key(0), (2, 45, 128))
    tokens = jax.random.normal(jax.random.key(2), (2, 3, 128))
    outs, grads, steps = [], [], []
    for impl in ("xla", "pallas"):
        m = layer(impl)
        state = m.init_state(2, key=jax.random.key(1))
        y, state_after = m.prefill(x, state, block_size=16, lengths=[45, 30])
        outs.append(y)
        steps.append(m.decode(tokens, state_after)[0])   # the decode kernel
        grads.append(jax.grad(lambda x: jnp.sum(
            m.prefill(x, state, block_size=16, training=True)[0] ** 2))(x))
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert rel_err(steps[1], steps[0]) < 1e-5
    assert rel_err(grads[1], grads[0]) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("embed_dim,num_heads,num_kv_heads", [(512, 8, 2), (4096, 32, 8)])
def test_gpu_bounded_layer_prefill_pallas_matches_cudnn(embed_dim, num_heads, num_kv_heads):
    """The benchmark's layer shapes in bf16 from an empty bank: the Pallas default
    against cuDNN attention, finite and within bf16 noise."""
    x = jax.random.normal(jax.random.key(3), (1, 512, embed_dim), jnp.bfloat16)
    outs = []
    for impl in ("pallas", "cudnn"):
        layer = CoDAGQALandmark(embed_dim=embed_dim, num_heads=num_heads,
                                num_kv_heads=num_kv_heads, window=256, num_landmarks_exact=64,
                                num_landmarks_summary=64, param_dtype=jnp.bfloat16,
                                implementation=impl, rngs=nnx.Rngs(0))
        state = layer.init_state(1, jnp.bfloat16, mem_init="zeros")
        outs.append(np.asarray(layer.prefill(x, state, block_size=256)[0], np.float32))
    assert np.isfinite(outs[0]).all()
    assert rel_err(outs[0], outs[1]) < 2e-2
