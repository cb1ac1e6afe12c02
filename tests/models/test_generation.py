"""Whole-model bounded prefill/step and compiled generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax.runner import bind_weights, compile_counts
from coda_jax.decoder import CausalLM
from coda_jax.generation import generate, sample_logits
from coda_jax.model_config import DecoderConfig
from coda_jax.state import widen_buffers

CFG = DecoderConfig(family="llama", vocab_size=53, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
OPTIONS = dict(window=4, num_landmarks_exact=2, num_landmarks_summary=2)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, attention="coda_bounded", attention_options=OPTIONS,
                    rngs=nnx.Rngs(0))


def _prompt(seed, batch=2, length=13):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def test_model_prefill_equals_layerwise_and_last_only(model):
    tokens = _prompt(1)
    state = model.init_state(2, key=jax.random.key(0))
    logits, new_state = model.prefill(tokens, state, block_size=4)
    assert logits.shape == (2, 13, 53) and new_state.pos.shape == (2, 2)
    last, _ = model.prefill(tokens, state, block_size=4, last_only=True, lengths=[13, 9])
    np.testing.assert_allclose(last[0, 0], logits[0, -1], rtol=1e-5, atol=1e-6)
    short, _ = model.prefill(tokens[1:, :9], jax.tree.map(lambda a: a[:, 1:], state),
                             block_size=4)
    np.testing.assert_allclose(last[1, 0], short[0, -1], rtol=1e-5, atol=1e-5)
    # The same computation, one layer at a time with the layers' own API.
    h = model.embed_tokens(tokens)
    for i in range(CFG.num_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], model.layers)
        layer_state = jax.tree.map(lambda a, i=i: a[i], state)
        out, _ = layer.self_attn.prefill(layer.input_layernorm(h), layer_state, block_size=4)
        h = layer.mlp_residual(h + out)
    np.testing.assert_allclose(model.logits(h), logits, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_a_loop_of_steps_and_compiles_once(model):
    state = model.init_state(2, key=jax.random.key(0))
    logits, state = model.prefill(_prompt(2), state, block_size=4, last_only=True)
    before = compile_counts().get("generate:CausalLM", 0)
    tokens, counts, final = generate(model, state, logits, max_new_tokens=7)
    generate(model, state, logits + 0.0, max_new_tokens=7)
    assert compile_counts()["generate:CausalLM"] - before == 1
    manual, st, lg = [], state, logits[:, -1]
    for _ in range(7):
        tok = jnp.argmax(lg, axis=-1)
        manual.append(tok)
        lg, st = model.step(tok[:, None].astype(jnp.int32), st)
        lg = lg[:, -1]
    np.testing.assert_array_equal(tokens, jnp.stack(manual, 1))
    assert counts.tolist() == [7, 7]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(st)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=1e-5, atol=1e-6)


def test_stop_tokens_end_a_row_and_freeze_its_state(model):
    state = model.init_state(2, key=jax.random.key(0))
    logits, state = model.prefill(_prompt(3), state, block_size=4, last_only=True)
    free, _, _ = generate(model, state, logits, max_new_tokens=6)
    stop = int(free[0, 2])
    tokens, counts, final = generate(model, state, logits, max_new_tokens=6,
                                     stop_tokens=(stop,), pad_id=-1)
    first = int(np.argmax(np.asarray(free[0]) == stop))
    assert counts[0] == first + 1
    assert (np.asarray(tokens[0, first + 1:]) == -1).all()
    assert int(final.pos[0, 0]) == 13 + first + 1


def test_without_the_state_generation_gives_the_same_tokens(model):
    """return_state=False (what query_many asks): stopped rows' states are not kept
    each step; the tokens and counts are those of the full call."""
    state = model.init_state(2, key=jax.random.key(0))
    logits, state = model.prefill(_prompt(4), state, block_size=4, last_only=True)
    stop = int(generate(model, state, logits, max_new_tokens=4)[0][0, 1])
    kwargs = dict(max_new_tokens=5, stop_tokens=(stop,))
    full = generate(model, state, logits, **kwargs)
    tokens, counts, none = generate(model, state, logits, return_state=False, **kwargs)
    assert none is None and np.array_equal(tokens, full[0]) and np.array_equal(counts, full[1])
    assert int(full[1][0]) <= 2  # row 0 stopped: its later steps are what differs


@pytest.mark.parametrize("return_state", [True, False])
def test_layers_split_once_give_the_same_tokens_and_state(model, return_state):
    """split_layers (the GPU's default: weights and state sliced apart before the token
    loop) is the stacked loop's computation: same tokens, counts and final state,
    stopped rows' states kept."""
    state = model.init_state(3, key=jax.random.key(5))
    logits, state = model.prefill(_prompt(6, batch=3), state, block_size=4, last_only=True)
    stop = int(generate(model, state, logits, max_new_tokens=4)[0][0, 1])
    kwargs = dict(max_new_tokens=6, stop_tokens=(stop,), return_state=return_state)
    stacked = generate(model, state, logits, split_layers=False, **kwargs)
    split = generate(model, state, logits, split_layers=True, **kwargs)
    apart = generate(model, state, logits, split_layers=True, join_projections=False, **kwargs)
    for other in (split, apart):  # input projections joined (the default) and apart
        np.testing.assert_array_equal(other[0], stacked[0])
        np.testing.assert_array_equal(other[1], stacked[1])
    assert int(stacked[1][0]) <= 2 and int(stacked[1].max()) == 6  # a row stopped early
    if return_state:
        assert jax.tree.structure(split[2]) == jax.tree.structure(stacked[2])
        for a, b in zip(jax.tree.leaves(split[2]), jax.tree.leaves(stacked[2])):
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                       rtol=1e-5, atol=1e-6)
    else:
        assert split[2] is None


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(1)
    top1 = sample_logits(logits, keys, temperature=1.0, top_k=1)
    assert (top1 == 0).all()
    nucleus = sample_logits(logits, keys, temperature=1.0, top_p=0.75)
    assert set(np.unique(nucleus).tolist()) == {0, 1}
    full = np.bincount(np.asarray(sample_logits(logits, keys, temperature=1.0)), minlength=4)
    np.testing.assert_allclose(full / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_generation_input_errors(model):
    state = model.init_state(1, key=jax.random.key(0))
    logits = jnp.zeros((1, CFG.vocab_size))
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, state, logits, max_new_tokens=3, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, state, logits, max_new_tokens=3, top_p=0.0)
    with pytest.raises(ValueError, match="state does not match"):
        generate(model, model.init_state(2, key=jax.random.key(0)), logits, max_new_tokens=3)
    with pytest.raises(ValueError, match="integer ids"):
        model.prefill(jnp.zeros((1, 3)), state)


def test_model_prefill_and_step_compile_once(model):
    state = model.init_state(1, key=jax.random.key(0))
    before = compile_counts()
    for length in (3, 17, 40):  # block 8: a shape no other test compiles
        _, st = model.prefill(_prompt(length, 1, length), state, block_size=8)
    for t in range(20):
        _, st = model.step(jnp.full((1, 1), t % 53, jnp.int32), st)
    now = compile_counts()
    assert {k: now[k] - before.get(k, 0) for k in ("prefill:CausalLM", "step:CausalLM")} == {
        "prefill:CausalLM": 1, "step:CausalLM": 1}


def test_whole_model_state_round_trip(model, tmp_path):
    from coda_jax import load_state, save_state

    state = model.init_state(2, key=jax.random.key(0))
    _, state = model.prefill(_prompt(4), state, block_size=4)
    save_state(tmp_path / "doc", state, model)
    restored = load_state(tmp_path / "doc", model)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = CausalLM(CFG, attention="coda_bounded", attention_options=OPTIONS,
                     rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="different weights"):
        load_state(tmp_path / "doc", other)


def test_bound_step_functions_equal_step_and_keep_their_weights():
    model = CausalLM(CFG, attention="coda_bounded", attention_options=OPTIONS,
                     rngs=nnx.Rngs(3))
    state = model.init_state(2, key=jax.random.key(0))
    _, state = model.prefill(_prompt(4), state, block_size=4)
    token = jnp.array([[5], [7]], jnp.int32)
    bound = model.step_fn()
    for got, want in zip(jax.tree.leaves(bound(token, state)),
                         jax.tree.leaves(model.step(token, state))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # One layer's bound step, on that layer's slice of the state.
    layer = jax.tree.map(lambda a: a[0], model.layers).self_attn
    layer_state = jax.tree.map(lambda a: a[0], state)
    x = jax.random.normal(jax.random.key(5), (2, 1, CFG.hidden_size))
    y_bound, s_bound = layer.step_fn()(x, layer_state)
    y, s = layer.step(x, layer_state)
    np.testing.assert_array_equal(np.asarray(y_bound), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(s_bound.k_buf), np.asarray(s.k_buf))
    # A snapshot: changing the weights afterwards changes step, not the bound function.
    logits_before = bound(token, state)[0]
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 2
    np.testing.assert_array_equal(np.asarray(bound(token, state)[0]),
                                  np.asarray(logits_before))
    assert not np.allclose(np.asarray(model.step(token, state)[0]), np.asarray(logits_before))
    with pytest.raises(ValueError):
        bound(jnp.zeros((3, 1), jnp.int32), state)


def test_a_bound_function_donates_the_arguments_it_is_told_to(model):
    """bind_weights(donate_args=...): the donated state is consumed by the call (its
    buffers reused for the output), the others are kept; the results are the same."""
    state = model.init_state(2, key=jax.random.key(0))
    token = jnp.array([[5], [7]], jnp.int32)
    step = lambda m, st, tok: m.decode_step(tok, st)  # noqa: E731
    kept, donating = bind_weights(model, step), bind_weights(model, step, donate_args=(0,))
    want = kept(state, token)
    given = jax.tree.map(jnp.copy, state)
    got = donating(given, token)
    assert given.k_buf.is_deleted() and not token.is_deleted() and not state.k_buf.is_deleted()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generation_from_a_poisoned_state_warns(model):
    state = model.init_state(2, key=jax.random.key(0))
    logits, state = model.prefill(jnp.array([[1, 2, 3], [4, 99, 6]]), state, block_size=4,
                                  last_only=True)  # 99: outside the vocabulary, on device
    with pytest.warns(UserWarning, match=r"row\(s\) \[1\] of the state hold NaN or Inf"):
        generate(model, state, logits, max_new_tokens=2)


def test_a_16_bit_state_decodes_widened_as_in_its_own_dtype(model):
    """On a CPU, generate widens a bfloat16 state to float32 for its token loop
    (widen_buffers) and rounds what it writes: the tokens and the final state equal
    a loop of decode steps on the bfloat16 state itself, bit for bit, and a loop
    whose rows have all stopped ends with the same result."""
    state = model.init_state(3, jnp.bfloat16, key=jax.random.key(7))
    logits, state = model.prefill(_prompt(8, batch=3, length=11), state, block_size=4,
                                  last_only=True)
    assert widen_buffers(state)[0].k_buf.dtype == jnp.float32
    step = jax.jit(lambda st, tok, hold: model.decode_step(tok, st, hold=hold))
    free = generate(model, state, logits, max_new_tokens=9)[0]
    stops = (int(free[0, 1]), int(free[1, 2]), int(free[2, 3]))
    tokens, counts, final = generate(model, state, logits, max_new_tokens=9, stop_tokens=stops)
    assert int(counts.max()) < 9  # every row stopped before the last step
    st, lg = state, logits[:, -1]
    done = jnp.zeros((3,), bool)
    for _ in range(9):
        tok = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        lg, st = step(st, tok[:, None], done)
        lg = lg[:, -1]
        done = done | jnp.isin(tok, jnp.asarray(stops))
    assert final.k_buf.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
