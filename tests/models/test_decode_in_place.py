"""Bounded decode updates the state's K/V buffers in place: a loop of decode steps over
split layers (what ``generate`` runs on a GPU) compiles without copying them.

Each copy of those buffers moves every row's whole state once a step; the decode
profile on an H100 (docs/results.md) found two per buffer and layer before
``bank_writes.write_one`` wrote its slots with one scatter per buffer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from coda_jax import CausalLM, DecoderConfig
from coda_jax.decoder import unstack

CFG = DecoderConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
# What the package compiles with: the suite's faster CPU compile (tests/conftest.py)
# emits fusions otherwise, and a one-slot scatter there becomes a dynamic-update-slice.
PACKAGE_COMPILE = {"xla_cpu_use_fusion_emitters": True}


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("banks", [dict(num_landmarks_exact=8, num_landmarks_summary=4,
                                        exact_eviction="gate", write_gate_lookahead=2),
                                   dict(num_landmarks_exact=8, num_landmarks_summary=0)])
def test_a_decode_loop_does_not_copy_the_state_buffers(hold, banks):
    model = CausalLM(CFG, attention="coda_bounded",
                     attention_options=dict(window=16, **banks), rngs=nnx.Rngs(0))
    batch = 3
    states = unstack(model.init_state(batch, key=jax.random.key(0)), CFG.num_layers)
    graphdef, params = nnx.split(model)

    def loop(params, states, token):
        merged = nnx.merge(graphdef, params)
        layers = unstack(merged.layers, CFG.num_layers)

        def body(_, carry):
            token, states, done = carry
            logits, states = merged.decode_step_unstacked(token, layers, states,
                                                          hold=done if hold else None)
            token = jnp.argmax(logits[:, -1], -1)[:, None].astype(token.dtype)
            return token, states, done | (token[:, 0] == 3)

        return jax.lax.fori_loop(0, 4, body, (token, states, jnp.zeros((batch,), bool)))

    compiled = jax.jit(loop, donate_argnums=1).lower(
        params, states, jnp.zeros((batch, 1), jnp.int32)).compile(PACKAGE_COMPILE)
    # A copy of any array of the K/V buffers' shape, whatever its dtype.
    dims = ",".join(map(str, states[0].k_buf.shape))
    copies = re.findall(rf"= \w+\[{dims}\]\S* copy\(", compiled.as_text())
    assert copies == []


@pytest.mark.parametrize("hold", [False, True])
def test_a_stacked_decode_step_writes_only_its_slots(hold):
    """The rolled loop over layers (a CPU's decode) carries the stacked state: no
    array of the stacked K/V buffers' shape is copied, converted or rewritten by a
    dynamic-update-slice; only scattered into. Before, each layer's whole new buffer
    was written into the stack every step (most of a CPU decode step)."""
    model = CausalLM(CFG, attention="coda_bounded",
                     attention_options=dict(window=16, num_landmarks_exact=8,
                                            num_landmarks_summary=4), rngs=nnx.Rngs(0))
    state = model.init_state(3, jnp.float32, key=jax.random.key(0))
    hold_rows = jnp.array([False, True, False]) if hold else None
    step = jax.jit(lambda m, s, t: m.decode_step(t, s, hold=hold_rows), donate_argnums=1)
    text = step.lower(model, state, jnp.zeros((3, 1), jnp.int32)).compile(
        PACKAGE_COMPILE).as_text()
    dims = ",".join(map(str, state.k_buf.shape))
    made = re.findall(rf"= f32\[{dims}\]\S* (\w[\w-]*)\(", text)
    assert made and set(made) <= {"scatter", "fusion", "parameter", "get-tuple-element",
                                  "bitcast", "tuple"}
    fused = re.findall(rf"%([\w.-]+) = f32\[{dims}\]\S* fusion\(", text)
    assert all("scatter" in name for name in fused), fused
