"""Bounded decode a layer per call (``coda_jax.layer_steps``) against the compiled
whole-model step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax.decoder import CausalLM
from coda_jax.layer_steps import LayerSteps
from coda_jax.model_config import DecoderConfig

CFG = DecoderConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                    num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
OPTIONS = dict(window=4, num_landmarks_exact=3, num_landmarks_summary=2,
               write_gate_threshold_exact=0.0)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, attention="coda_bounded", attention_options=OPTIONS,
                    rngs=nnx.Rngs(3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_steps_equal_the_models_steps(model, dtype):
    """Eight tokens a layer per call: the same logits each step and the same state at
    the end as the model's own step (past the window, so the banks are written), in
    a float32 and a bfloat16 state; the state given to ``start`` is left as it was."""
    key = jax.random.key(int(np.random.default_rng().integers(1 << 30)))
    prompt = jax.random.randint(key, (2, 11), 0, CFG.vocab_size)
    tokens = jax.random.randint(jax.random.fold_in(key, 1), (8, 2), 0, CFG.vocab_size)
    state = model.init_state(2, dtype, key=jax.random.key(0))
    _, state = model.prefill(prompt, state, block_size=4, last_only=True)
    kept = jax.tree.map(np.asarray, state)
    steps = LayerSteps(model)
    split = steps.start(state)
    want = state
    for token in tokens:
        logits, split = steps(token, split)
        want_logits, want = model.decode_step(token[:, None], want)
        np.testing.assert_allclose(logits, want_logits[:, 0], rtol=2e-5, atol=2e-5)
    got = steps.finish(split)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_layer_step_updates_its_state_in_place(model):
    """The layer's compiled step aliases its state's K/V buffers from input to output
    (the state is donated): a token writes its slots, not a copy of the buffers."""
    state = model.init_state(2, jnp.bfloat16, key=jax.random.key(0))
    steps = LayerSteps(model)
    hlo = steps.lower_layer(steps.start(state), index=1).compile().as_text()
    header = hlo.splitlines()[0]
    assert "input_output_alias" in header
    # Every state leaf (the buffers included) is an output aliased to an input.
    assert header.count("may-alias") >= len(jax.tree.leaves(state))


def test_layer_steps_need_a_bounded_model():
    full = CausalLM(CFG, attention="gqa", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="coda_bounded"):
        LayerSteps(full)
