"""Unbounded models (gqa, coda) generate through the bounded models' API, on a KVCache.

The reference for every number is the model's own full forward ``model(tokens)``
over the whole sequence: prefilling a prompt into the preallocated cache and
stepping token by token must give its logits, row by row, whatever the other
rows of the batch hold.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import (AttentionSpec, CausalLM, DecoderConfig, KVCache, concat_rows, generate,
                      select_rows, where_rows)
from coda_jax.kv_cache import cache_bytes
from coda_jax.runner import compile_counts

CFG = DecoderConfig(family="llama", vocab_size=53, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
QWEN3 = dataclasses.replace(CFG, family="qwen3", qk_norm=True, head_dim=16)
MISTRAL = dataclasses.replace(CFG, family="mistral", sliding_window=5)
# Most tests share one shape (3 rows, 24 positions, block 4), so they share
# compilations; the tests that count compilations use shapes of their own.
BATCH, MAX_LENGTH, BLOCK = 3, 24, 4
KINDS = {"gqa": (CFG, "gqa"), "coda": (CFG, "coda"), "gqa_qwen3": (QWEN3, "gqa"),
         "coda_qwen3": (QWEN3, "coda"), "gqa_sliding_window": (MISTRAL, "gqa")}


@pytest.fixture(scope="module", params=list(KINDS))
def model(request):
    cfg, kind = KINDS[request.param]
    return CausalLM(cfg, attention=kind, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gqa():
    return CausalLM(CFG, attention="gqa", rngs=nnx.Rngs(1))


@jax.jit
def _forward(model, tokens):
    return model(tokens)[0]


def _tokens(seed, batch, length):
    """Host token ids (numpy: no device op to compile per shape)."""
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, length), np.int32)


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


def _prefill_prefill_step(model, dtype=jnp.float32):
    """Rows at their own positions: a prompt of per-row lengths, a second one after
    it, then two steps; -> (logits of each part, final cache, the reference: the
    full forward of each row's whole sequence, rows padded to one width)."""
    first, second = [13, 6, 9], [4, 7, 1]
    tokens, more, steps = _tokens(2, BATCH, 13), _tokens(3, BATCH, 7), _tokens(4, BATCH, 2)
    cache = model.init_state(BATCH, dtype, max_length=MAX_LENGTH)
    logits1, cache = model.prefill(tokens, cache, lengths=first, block_size=BLOCK)
    logits2, cache = model.prefill(more, cache, lengths=second, block_size=BLOCK)
    logits3 = []
    for t in range(2):
        logits, cache = model.step(steps[:, t:t + 1], cache)
        logits3.append(logits)
    logits1, logits2, logits3 = (np.asarray(a, np.float32) for a in (
        logits1, logits2, jnp.concatenate(logits3, axis=1)))
    rows = np.zeros((BATCH, MAX_LENGTH), np.int32)
    for row, (n, m) in enumerate(zip(first, second)):
        rows[row, :n + m + 2] = np.concatenate([tokens[row, :n], more[row, :m], steps[row]])
    full = np.asarray(_forward(model, jnp.asarray(rows)), np.float32)
    got = []
    for row, (n, m) in enumerate(zip(first, second)):
        got.append((full[row, :n + m + 2], np.concatenate(
            [logits1[row, :n], logits2[row, :m], logits3[row]])))
    return got, cache, [n + m + 2 for n, m in zip(first, second)]


def test_prefill_and_steps_equal_the_full_forward_row_by_row(model):
    pairs, cache, lengths = _prefill_prefill_step(model)
    for want, got in pairs:
        _close(got, want)
    assert isinstance(cache, KVCache) and cache.k.shape[:3] == (2, BATCH, MAX_LENGTH)
    assert cache.lengths.tolist() == lengths
    for row, n in enumerate(lengths):  # padding is never written
        assert not np.asarray(cache.k[:, row, n:]).any()


def test_bf16_cache_follows_the_bf16_forward():
    # The weights cast to bf16 (cheaper than building a bf16 model op by op).
    model = CausalLM(QWEN3, attention="coda", rngs=nnx.Rngs(0))
    model = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model)
    pairs, cache, _ = _prefill_prefill_step(model, jnp.bfloat16)
    assert cache.k.dtype == jnp.bfloat16
    for want, got in pairs:
        np.testing.assert_allclose(got, want, atol=0.02 * float(np.abs(want).max()))


def _prompted(model, seed=5, lengths=(9, 5, 7)):
    cache = model.init_state(BATCH, max_length=MAX_LENGTH)
    return model.prefill(_tokens(seed, BATCH, max(lengths)), cache, block_size=BLOCK,
                         last_only=True, lengths=list(lengths))


def test_greedy_generation_equals_a_loop_of_steps_and_compiles_once(gqa):
    logits, cache = _prompted(gqa)
    before = compile_counts().get("generate:CausalLM", 0)
    tokens, counts, final = generate(gqa, cache, logits, max_new_tokens=7)
    generate(gqa, cache, logits + 0.0, max_new_tokens=7)
    assert compile_counts()["generate:CausalLM"] - before == 1
    manual, st, lg = [], cache, logits[:, -1]
    for _ in range(7):
        tok = jnp.argmax(lg, axis=-1)
        manual.append(tok)
        lg, st = gqa.step(tok[:, None].astype(jnp.int32), st)
        lg = lg[:, -1]
    np.testing.assert_array_equal(tokens, jnp.stack(manual, 1))
    assert counts.tolist() == [7, 7, 7] and final.lengths.tolist() == [16, 12, 14]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(st)):
        _close(a, b)


def test_prefill_and_step_compile_once_for_any_prompt_length(gqa):
    cache = gqa.init_state(1, max_length=40)  # a shape no other test compiles
    before = compile_counts()
    for length in (3, 17, 33):
        _, st = gqa.prefill(_tokens(length, 1, length), cache, block_size=8)
    for t in range(5):
        _, st = gqa.step(jnp.full((1, 1), t, jnp.int32), st)
    now = compile_counts()
    assert {k: now[k] - before.get(k, 0) for k in ("prefill:CausalLM", "step:CausalLM")} == {
        "prefill:CausalLM": 1, "step:CausalLM": 1}


def test_stop_tokens_pad_and_freeze_a_row(gqa):
    lengths = [9, 5, 7]
    logits, cache = _prompted(gqa, lengths=lengths)
    free, _, free_final = generate(gqa, cache, logits, max_new_tokens=7)
    stop = int(free[1, 2])
    out, counts, final = generate(gqa, cache, logits, max_new_tokens=7, stop_tokens=(stop,),
                                  pad_id=-7)
    for row, n in enumerate(lengths):
        hits = np.flatnonzero(np.asarray(free[row]) == stop)
        k = int(hits[0]) + 1 if hits.size else 7
        assert int(counts[row]) == k and int(final.lengths[row]) == n + k
        np.testing.assert_array_equal(np.asarray(out[row, :k]), np.asarray(free[row, :k]))
        assert (np.asarray(out[row, k:]) == -7).all()
        # Its cache holds exactly its tokens up to the stop token: the free run's
        # up to there, nothing after.
        _close(final.k[:, row, :n + k], free_final.k[:, row, :n + k], tol=0)
        _close(final.v[:, row, :n + k], free_final.v[:, row, :n + k], tol=0)
        assert not np.asarray(final.k[:, row, n + k:]).any()
    assert int(counts[1]) <= 3


def test_the_cache_must_have_room(gqa):
    cache = gqa.init_state(BATCH, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match=r"the prompt does not fit the KV cache: row 1 has 0 "
                                         r"of max_length=24 positions filled, room for 24 "
                                         r"more, and needs 25"):
        gqa.prefill(_tokens(7, BATCH, 25), cache, lengths=[10, 25, 3])
    logits, cache = _prompted(gqa, lengths=(17, 6, 7))
    with pytest.raises(ValueError, match=r"max_new_tokens=8 does not fit the KV cache: row 0 "
                                         r"has 17 of max_length=24 .* room for 7 more"):
        generate(gqa, cache, logits, max_new_tokens=8)
    tokens, counts, cache = generate(gqa, cache, logits, max_new_tokens=7)
    assert cache.lengths.tolist() == [24, 13, 14]
    with pytest.raises(ValueError, match="one more token does not fit the KV cache: row 0"):
        gqa.step(np.zeros((BATCH, 1), np.int32), cache)
    # The pure functions cannot refuse: an overflowing row's logits are NaN instead.
    logits, over = jax.jit(type(gqa).decode_step)(gqa, jnp.zeros((BATCH, 1), jnp.int32), cache)
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1:])).all()
    assert over.lengths.tolist() == [25, 14, 15]


def test_state_requests_by_kind(gqa):
    with pytest.raises(ValueError, match="needs max_length"):
        gqa.init_state(1)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        gqa.init_state(1, max_length=0)
    with pytest.raises(ValueError, match="mem_init is a bounded model's option"):
        gqa.init_state(1, max_length=4, mem_init="zeros")
    bounded = CausalLM(CFG, attention="coda_bounded", rngs=nnx.Rngs(0),
                       attention_options=dict(window=4, num_landmarks_exact=2,
                                              num_landmarks_summary=2))
    with pytest.raises(ValueError, match="max_length=8 is for the unbounded kinds"):
        bounded.init_state(1, max_length=8)
    state = bounded.init_state(1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="expected this model's KVCache"):
        gqa.prefill(np.ones((1, 3), int), state)
    with pytest.raises(ValueError, match="expected this model's BankState"):
        bounded.step(np.ones((1, 1), int), gqa.init_state(1, max_length=4))
    with pytest.raises(ValueError, match="cannot mix"):
        concat_rows(gqa.init_state(1, max_length=4), state)
    other = KVCache.zeros(num_layers=2, batch_size=1, max_length=4, num_kv_heads=2,
                          head_dim=16)
    with pytest.raises(ValueError, match="KV cache does not match this model"):
        gqa.step(np.ones((1, 1), int), other)
    with pytest.raises(ValueError, match="write_logits needs a bounded model"):
        gqa.prefill_segment(jnp.ones((1, 4), jnp.int32), jnp.array([4]), gqa.init_state(
            1, max_length=4), block_size=4, training=False, unroll=1, write_logits=True)
    cache = gqa.init_state(3, jnp.bfloat16, max_length=100)
    assert cache.nbytes == cache_bytes(num_layers=2, num_kv_heads=2, head_dim=8,
                                       max_length=100, batch_size=3, dtype=jnp.bfloat16)


def test_row_helpers_act_on_caches(gqa):
    _, cache = _prompted(gqa)
    rows = [select_rows(cache, 2), select_rows(cache, 0)]
    both = concat_rows(*rows)
    assert both.batch_size == 2 and both.lengths.tolist() == [7, 9]
    for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(select_rows(cache, jnp.array([2, 0])))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mixed = where_rows(jnp.array([False, True]), concat_rows(rows[1], rows[0]), both)
    assert mixed.lengths.tolist() == [7, 7]
    np.testing.assert_array_equal(np.asarray(mixed.k[:, 1]), np.asarray(cache.k[:, 2]))
    with pytest.raises(ValueError, match="differ only in their rows"):
        concat_rows(rows[0], gqa.init_state(1, max_length=MAX_LENGTH + 1))


def test_a_poisoned_row_is_flagged_and_generation_warns(gqa):
    cache = gqa.init_state(BATCH, max_length=MAX_LENGTH)
    prompt = jnp.array([[1, 2, 3], [4, 99, 6], [7, 8, 9]])  # 99: outside the vocabulary
    logits, cache = gqa.prefill(prompt, cache, block_size=BLOCK, last_only=True)
    assert cache.nonfinite.tolist() == [False, True, False]
    with pytest.warns(UserWarning, match=r"row\(s\) \[1\] of the state hold NaN or Inf"):
        generate(gqa, cache, logits, max_new_tokens=7)


def test_the_pallas_decode_kernel_reads_the_cache_as_xla_does():
    """On CPU in Pallas interpret mode: a ``coda`` step over the cache's key mask."""
    spec = dict(kind="coda", implementation="pallas")
    pallas = CausalLM(CFG, attention=AttentionSpec(**spec), rngs=nnx.Rngs(0))
    xla = CausalLM(CFG, attention=AttentionSpec(**(spec | dict(implementation="xla"))),
                   rngs=nnx.Rngs(0))
    _, cache = _prompted(xla)
    token = _tokens(9, BATCH, 1)
    _close(pallas.step(token, cache)[0], xla.step(token, cache)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["gqa", "coda"])
def test_gpu_default_kernels_follow_the_forward(kind, dtype):
    """On GPU with the default implementation (Pallas, cuDNN for bf16 masks): a
    prompt of per-row lengths, steps and greedy generation against the forward."""
    cfg = DecoderConfig(family="llama", vocab_size=128, hidden_size=256, intermediate_size=512,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
    model = CausalLM(cfg, attention=kind, rngs=nnx.Rngs(0))
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        model = jax.tree.map(lambda a: a.astype(dtype), model)
    lengths, width, steps = [100, 37], 100, 6
    tokens = np.random.default_rng(0).integers(0, 128, (2, width + steps), np.int32)
    cache = model.init_state(2, dtype, max_length=160)
    logits, cache = model.prefill(tokens[:, :width], cache, lengths=lengths, block_size=64)
    step_logits = []
    for t in range(steps):
        out, cache = model.step(tokens[:, width + t:width + t + 1], cache)
        step_logits.append(np.asarray(out[:, 0], np.float32))
    tol = 3e-2 if dtype == jnp.bfloat16 else 2e-3
    for row, n in enumerate(lengths):
        seq = np.concatenate([tokens[row, :n], tokens[row, width:]])[None]
        full = np.asarray(_forward(model, jnp.asarray(seq))[0], np.float32)
        scale = float(np.abs(full).max())
        got = np.concatenate([np.asarray(logits[row, :n], np.float32),
                              np.stack(step_logits)[:, row]])
        np.testing.assert_allclose(got, full, atol=tol * scale)
    last = jnp.asarray(np.stack(step_logits)[-1])
    generated, _, _ = generate(model, cache, last, max_new_tokens=5)
    manual, st, lg = [], cache, last
    for _ in range(5):
        tok = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        manual.append(tok)
        lg, st = model.step(tok[:, None], st)
        lg = lg[:, 0]
    np.testing.assert_array_equal(np.asarray(generated), np.asarray(jnp.stack(manual, 1)))
