"""A bounded layer's input projections joined into one kernel (``joined_inputs``): what
``generate``'s split token loop multiplies each decode step's token with."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from coda_jax import CoDAGQALandmark


@pytest.mark.parametrize("options", [dict(), dict(differential=False, qkv_bias=True),
                                     dict(qk_norm=True, write_policy="none")])
def test_joined_input_projections_step_as_separate_ones(options):
    """A decode step's one product with ``joined_inputs`` (what generate's split loop
    uses) gives the outputs and state of one product per projection."""
    layer = CoDAGQALandmark(embed_dim=64, num_heads=4, num_kv_heads=2, window=8,
                            num_landmarks_exact=4, num_landmarks_summary=4, rngs=nnx.Rngs(3),
                            **options)
    params = nnx.state(layer, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    nnx.update(layer, jax.tree.unflatten(tree, [
        leaf + 0.1 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]))
    kernel, bias = layer.joined_inputs()
    width = sum(lin.out_features for lin in layer.input_linears())
    assert kernel.shape == (64, -(-width // 128) * 128) and bias.shape == kernel.shape[1:]
    assert not np.asarray(kernel[:, width:]).any() and not np.asarray(bias[width:]).any()
    x = jax.random.normal(jax.random.key(5), (2, 24, 64))
    _, state = layer.prefill(x[:, :20], layer.init_state(2, key=jax.random.key(0)),
                             block_size=4)
    step = jax.jit(lambda m, x, st, joined: m.decode_step(x, st, joined=joined))
    apart, joined = state, state
    for t in range(20, 24):
        want, apart = step(layer, x[:, t:t + 1], apart, None)
        got, joined = step(layer, x[:, t:t + 1], joined, (kernel, bias))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(apart)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=1e-5, atol=1e-5)
