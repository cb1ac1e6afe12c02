"""Batch rows of layer and model states: the row helpers and generation over a batch.

A model's state stacks its layers' states, (layers, B, ...); the row helpers
must act on axis 1 there and on axis 0 for one layer's state. Generation over
a batch must give every row what that row gives alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import (CausalLM, CoDAGQALandmark, DecoderConfig, batch_axis, generate,
                      select_rows, concat_rows, where_rows)

# Three layers: a batch of 3 is as long as the layer axis, the case that once
# passed with rows and layers confused.
CFG = DecoderConfig(family="llama", vocab_size=47, hidden_size=32, intermediate_size=40,
                    num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
OPTIONS = dict(window=4, num_landmarks_exact=2, num_landmarks_summary=2)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, attention="coda_bounded", attention_options=OPTIONS,
                    rngs=nnx.Rngs(7))


def _assert_rows_close(got, want, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=rtol, atol=atol)


def _prefilled(model, seed, length, batch=1):
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)
    state = model.init_state(batch, key=jax.random.key(seed))
    return model.prefill(tokens, state, block_size=4, last_only=True)


def test_row_helpers_act_on_the_batch_axis_of_model_states(model):
    docs = [_prefilled(model, seed, length)[1] for seed, length in ((1, 9), (2, 5), (3, 13))]
    assert batch_axis(docs[0]) == 1 and docs[0].num_layers == 3
    batch = concat_rows(*docs)
    assert batch.k_buf.shape[:2] == (3, 3) and batch.batch_size == 3
    np.testing.assert_array_equal(np.asarray(batch.pos[0]), [9, 5, 13])
    for row, doc in enumerate(docs):
        _assert_rows_close(select_rows(batch, row), doc, rtol=0, atol=0)
        _assert_rows_close(select_rows(batch, slice(row, row + 1)), doc, rtol=0, atol=0)
    swapped = select_rows(batch, jnp.array([2, 0]))
    _assert_rows_close(swapped, concat_rows(docs[2], docs[0]), rtol=0, atol=0)
    mixed = where_rows(jnp.array([True, False, True]), batch, concat_rows(*docs[::-1]))
    np.testing.assert_array_equal(np.asarray(mixed.pos[:, 1]), [5, 5, 5])
    np.testing.assert_array_equal(np.asarray(mixed.pos[:, 0]), [9, 9, 9])
    np.testing.assert_array_equal(np.asarray(mixed.pos[:, 2]), [13, 13, 13])


def test_row_helpers_act_on_axis_zero_of_layer_states():
    layer = CoDAGQALandmark(embed_dim=32, num_heads=4, num_kv_heads=2, **OPTIONS,
                            rngs=nnx.Rngs(0))
    states = []
    for seed, length in ((1, 6), (2, 11)):
        x = jax.random.normal(jax.random.key(seed), (1, length, 32))
        states.append(layer.prefill(x, layer.init_state(1, key=jax.random.key(seed)),
                                    block_size=4)[1])
    batch = concat_rows(*states)
    assert batch_axis(batch) == 0 and batch.num_layers is None
    np.testing.assert_array_equal(np.asarray(batch.pos), [6, 11])
    _assert_rows_close(select_rows(batch, 1), states[1], rtol=0, atol=0)
    _assert_rows_close(select_rows(batch, -2), states[0], rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range"):
        select_rows(batch, 2)


def test_row_helpers_refuse_mixed_states(model):
    model_state = _prefilled(model, 1, 5)[1]
    layer_state = jax.tree.map(lambda a: a[0], model_state)
    with pytest.raises(ValueError, match="cannot mix"):
        concat_rows(model_state, layer_state)
    with pytest.raises(ValueError, match="at least one"):
        concat_rows()


@pytest.mark.parametrize("lengths", [(9, 5, 13), (7, 13, 4, 10, 6)], ids=["batch3", "batch5"])
def test_every_row_of_a_batch_generates_what_it_generates_alone(model, lengths):
    batch = len(lengths)
    width = max(lengths)
    tokens = jax.random.randint(jax.random.key(batch), (batch, width), 0, CFG.vocab_size)
    state = model.init_state(batch, key=jax.random.key(0))
    logits, state = model.prefill(tokens, state, block_size=4, last_only=True,
                                  lengths=list(lengths))
    free, _, _ = generate(model, state, logits, max_new_tokens=8)
    stop = int(free[1, 2])  # row 1 stops after three tokens
    out, counts, final = generate(model, state, logits, max_new_tokens=8, stop_tokens=(stop,))
    assert int(counts[1]) <= 3 and int(counts[1]) < 8
    for row, length in enumerate(lengths):
        # The row alone: its prompt without padding, its own fresh state.
        alone_state = select_rows(model.init_state(batch, key=jax.random.key(0)), row)
        alone_logits, alone_state = model.prefill(tokens[row:row + 1, :length], alone_state,
                                                  block_size=4, last_only=True)
        alone, alone_count, alone_final = generate(model, alone_state, alone_logits,
                                                   max_new_tokens=8, stop_tokens=(stop,))
        np.testing.assert_array_equal(np.asarray(out[row]), np.asarray(alone[0]))
        assert int(counts[row]) == int(alone_count[0])
        _assert_rows_close(select_rows(final, row), alone_final)
        n = int(counts[row])
        assert int(final.pos[0, row]) == length + n
        assert (np.asarray(out[row, n:]) == -1).all()



@pytest.mark.parametrize("options", [
    OPTIONS,
    OPTIONS | dict(exact_eviction="gate", write_gate_lookahead=2, collect_metrics=True),
    OPTIONS | dict(num_landmarks_exact=0),
    OPTIONS | dict(num_landmarks_summary=0),
    None,  # an unbounded model and its KVCache
], ids=["lru", "gate-lookahead-metrics", "no-exact-bf16-state", "no-summary", "unbounded"])
def test_held_rows_keep_their_state_bit_for_bit(options, request):
    """decode_step(hold=...) equals where_rows(hold, old, stepped) exactly, step after
    step (the ring fills and evicts into both banks), without selecting over the buffers:
    what generate does with a row that has stopped."""
    if options is None:
        net = CausalLM(CFG, attention="gqa", rngs=nnx.Rngs(5))
        state = net.init_state(3, max_length=24)
    else:
        net = CausalLM(CFG, attention="coda_bounded", attention_options=options,
                       rngs=nnx.Rngs(5))
        dtype = jnp.bfloat16 if "bf16" in request.node.callspec.id else jnp.float32
        state = net.init_state(3, dtype, key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (3, 5), 0, CFG.vocab_size)
    _, state = net.prefill(tokens, state, block_size=4, lengths=[5, 3, 4])
    step = jax.jit(lambda st, tok, hold: net.decode_step(tok, st, hold=hold))
    free = jax.jit(lambda st, tok: net.decode_step(tok, st))
    for i in range(7):  # window 4, prompts of 5, 3, 4 tokens: every row soon evicts
        hold = jnp.array([i % 2 == 1, i >= 3, False])
        tok = jax.random.randint(jax.random.key(10 + i), (3, 1), 0, CFG.vocab_size)
        _, held = step(state, tok, hold)
        _, stepped = free(state, tok)
        want = where_rows(~hold, stepped, state)
        for got_leaf, want_leaf in zip(jax.tree.leaves(held), jax.tree.leaves(want),
                                       strict=True):
            np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))
        state = held


def test_stack_states_is_the_older_name_of_concat_rows():
    from coda_jax import stack_states

    assert stack_states is concat_rows
