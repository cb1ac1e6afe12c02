"""Properties of the bounded layer beyond one-to-one parity: compile counts,
boundedness, batching of documents at different positions, switches the
reference lacks, gradients, metrics and input validation."""

from __future__ import annotations

import coda_gqa_l
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from coda_jax import CoDAGQA, CoDAGQALandmark, select_rows, concat_rows
from coda_jax.runner import compile_counts
from coda_jax.segments import segment_sizes
from convert import from_reference, load_reference_weights, reference_state_dict
from oracle import assert_close, reference_landmark, sorted_reference_topk, to_jnp

SMALL = dict(embed_dim=64, num_heads=4, num_kv_heads=2)


def _layer(seed: int = 0, **kw) -> CoDAGQALandmark:
    """A JAX layer with weights moved off their init (via a perturbed reference)."""
    cfg = SMALL | dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4) | kw
    overrides = {k: cfg.pop(k) for k in ("lf_band", "differential", "write_gate_lookahead",
                                         "exact_eviction", "sink_tokens") if k in cfg}
    return from_reference(reference_landmark(seed, **cfg), **overrides)


def _x(seed: int, batch: int, length: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, length, 64))


def test_window_covering_the_prompt_equals_unbounded_attention():
    layer = _layer(window=64)
    unbounded = CoDAGQA(**SMALL, rngs=nnx.Rngs(0))
    weights = {k: v for k, v in reference_state_dict(layer).items()
               if not k.startswith(("write_proj", "summary_eta_logit"))}
    load_reference_weights(unbounded, weights)
    x = _x(1, 2, 44)
    call = nnx.jit(lambda m, x, cache: m(x, past_key_value=cache))
    want, cache = unbounded(x[:, :40])
    got, state = layer.prefill(x[:, :40], layer.init_state(2, key=jax.random.key(0)),
                               block_size=16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for t in range(40, 44):
        want_t, cache = call(unbounded, x[:, t:t + 1], cache)
        got_t, state = layer.step(x[:, t:t + 1], state)
        np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-5)


def _new_traces(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in compile_counts().items()
            if v != before.get(k, 0)}


def test_prefill_compiles_once_for_any_length_and_step_once_for_1000_steps():
    layer = _layer(window=16)
    state = layer.init_state(1, key=jax.random.key(0))
    before = compile_counts()
    for length in (5, 37, 200, 64, 129):
        y, _ = layer.prefill(_x(length, 1, length), state, block_size=16)
        assert y.shape == (1, length, 64)
    traced = _new_traces(before)
    assert traced == {"prefill:CoDAGQALandmark": 1}, traced
    x = _x(0, 1, 1)
    for _ in range(1000):
        _, state = layer.step(x, state)
    assert int(state.pos[0]) == 1000
    assert _new_traces(before) == {"prefill:CoDAGQALandmark": 1, "step:CoDAGQALandmark": 1}


def test_bound_prefill_equals_prefill_compiles_once_and_keeps_its_weights():
    layer = _layer(window=16)
    state = layer.init_state(2, key=jax.random.key(0))
    bound = layer.prefill_fn(block_size=16)
    before = compile_counts()
    for length, lengths in ((37, None), (200, [200, 131]), (5, np.array([5, 0]))):
        x = _x(length, 2, length)
        got = bound(x, state, lengths)
        want = layer.prefill(x, state, block_size=16, lengths=lengths)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # one compilation each: bound and unbound
    assert _new_traces(before) == {"prefill:CoDAGQALandmark": 2}
    # A snapshot: changing the weights afterwards changes prefill, not the bound function.
    x = _x(9, 2, 20)
    before = bound(x, state)[0]
    layer.o_proj.kernel[...] = layer.o_proj.kernel[...] * 2
    np.testing.assert_array_equal(np.asarray(bound(x, state)[0]), np.asarray(before))
    assert not np.allclose(np.asarray(layer.prefill(x, state, block_size=16)[0]),
                           np.asarray(before))
    with pytest.raises(ValueError, match="lengths"):
        bound(x, state, [21, 3])


def test_long_calls_then_short_ones_read_as_one_block_per_call():
    """By default a CPU reads a long prompt in calls of 1,024 tokens and the rest in
    calls of 256 (one more compiled program, padding bounded by the short call); the
    outputs and the state equal those of a prompt read one block per call."""
    sizes = segment_sizes(1324, block_size=64, batch_size=1, chunks_per_call=None)
    on_cpu = jax.default_backend() == "cpu"
    assert sizes == ([1024, 256, 256] if on_cpu else [1024, 1024])
    assert segment_sizes(1324, block_size=64, batch_size=1, chunks_per_call=3) == [192] * 7
    assert segment_sizes(1324, block_size=1024, batch_size=1, chunks_per_call=None) == (
        [1024, 1024] if on_cpu else [4096])
    layer = _layer(window=16)
    x = _x(3, 1, 1324)
    state = layer.init_state(1, key=jax.random.key(0))
    before = compile_counts()
    y, got = layer.prefill(x, state, block_size=64)
    assert _new_traces(before) == {"prefill:CoDAGQALandmark": 2 if on_cpu else 1}
    y_blocks, want = layer.prefill(x, state, block_size=64, chunks_per_call=1)
    assert_close(y, y_blocks, what="outputs")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, what="state")


def test_decode_loop_equals_repeated_steps():
    layer = _layer(window=4, collect_metrics=True)
    state = layer.prefill(_x(20, 2, 9), layer.init_state(2, key=jax.random.key(0)),
                          block_size=4)[1]
    xs = _x(21, 2, 11)
    ys, looped = layer.decode(xs, state)
    for t in range(11):
        y_t, state = layer.step(xs[:, t:t + 1], state)
        assert_close(ys[:, t:t + 1], y_t, what=f"decode step {t}")
    for a, b in zip(jax.tree.leaves(looped), jax.tree.leaves(state)):
        assert_close(a, b, what="state after the loop")


def test_state_is_bounded_after_100k_decode_tokens():
    layer = _layer(window=8)
    state = layer.init_state(2, key=jax.random.key(0))
    _, state = layer.prefill(_x(1, 2, 10), state, block_size=4)
    bytes_after_10 = sum(leaf.nbytes for leaf in jax.tree.leaves(state))

    @jax.jit
    def decode(layer, state):
        def body(i, st):
            x = jax.random.normal(jax.random.fold_in(jax.random.key(7), i), (2, 1, 64))
            return layer.step(x, st)[1]
        return jax.lax.fori_loop(0, 100_000, body, state)

    state = decode(layer, state)
    assert int(state.pos[0]) == 100_010
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(state)) == bytes_after_10
    assert bytes_after_10 == layer.cache_bytes(batch_size=2, dtype=jnp.float32)
    for leaf in jax.tree.leaves(state):
        assert not np.isnan(np.asarray(leaf, np.float64)).any()
    assert bool(state.allowed.all())


def test_documents_at_different_positions_share_one_batch():
    layer = _layer(window=8, num_landmarks_exact=4, num_landmarks_summary=4,
                   min_landmarks_exact=2, expansion_t_max=30)
    docs = [_x(10, 1, 11), _x(11, 1, 30)]
    states = [layer.prefill(d, layer.init_state(1, key=jax.random.key(i)), block_size=4)[1]
              for i, d in enumerate(docs)]
    batch = concat_rows(*states)
    np.testing.assert_array_equal(batch.pos, [11, 30])
    for t in range(12):
        x = _x(100 + t, 2, 1)
        y, batch = layer.step(x, batch)
        for row in range(2):
            y_row, states[row] = layer.step(x[row:row + 1], states[row])
            assert_close(y[row:row + 1], y_row, what=f"step {t} row {row}")
    for row in range(2):
        for a, b in zip(jax.tree.leaves(select_rows(batch, slice(row, row + 1))),
                        jax.tree.leaves(states[row])):
            assert_close(a, b, what=f"state row {row}")


def test_ragged_prompts_in_one_batch_equal_separate_prefills():
    layer = _layer(window=8)
    x = _x(3, 3, 29)
    lengths = [29, 5, 17]
    y, state = layer.prefill(x, layer.init_state(3, mem_init="zeros"), block_size=8,
                             lengths=lengths)
    y_dev, _ = layer.prefill(x, layer.init_state(3, mem_init="zeros"), block_size=8,
                             lengths=jnp.asarray(lengths))  # device lengths: no read-back
    np.testing.assert_array_equal(y_dev, y)
    for row, n in enumerate(lengths):
        y_row, s_row = layer.prefill(x[row:row + 1, :n], layer.init_state(1, mem_init="zeros"),
                                     block_size=8)
        assert_close(y[row, :n], y_row[0], what=f"output row {row}")
        assert not np.asarray(y[row, n:]).any()
        for a, b in zip(jax.tree.leaves(select_rows(state, slice(row, row + 1))),
                        jax.tree.leaves(s_row)):
            assert_close(a, b, what=f"state row {row}")


def test_unrolled_block_loop_equals_the_rolled_one():
    """GPU prefill unrolls the block loop (``runner.default_unroll``); CPU runs it rolled."""
    layer = _layer(window=8)
    x = _x(4, 2, 45)
    state0 = layer.init_state(2, mem_init="zeros")
    results = []
    for unroll in (1, True):
        results.append(layer.prefill(x, state0, block_size=8, lengths=[45, 20],
                                     chunks_per_call=4, unroll=unroll))
    (y_rolled, s_rolled), (y_unrolled, s_unrolled) = results
    assert_close(y_unrolled, y_rolled, what="output")
    for a, b in zip(jax.tree.leaves(s_unrolled), jax.tree.leaves(s_rolled)):
        assert_close(a, b, what="state")


def test_write_gate_lookahead_raises_each_gate_to_the_next_tokens_and_decode_agrees():
    """write_gate_lookahead=3 (not in the reference): the ring's gates are the raw
    gates (those of the same weights without it) raised to the largest of the next
    3 tokens' seen so far, in prefill by segments and in token-by-token steps."""
    plain, ahead = _layer(7), _layer(7, write_gate_lookahead=3)
    x = _x(8, 2, 37)
    _, raw = plain.prefill(x, plain.init_state(2, mem_init="zeros"), block_size=4)
    _, state = ahead.prefill(x, ahead.init_state(2, mem_init="zeros"), block_size=4,
                             chunks_per_call=2)
    g = np.asarray(raw.g_recent)                       # the ring in time order: tokens 29..36
    want = np.stack([g[:, i:i + 4].max(axis=1) for i in range(8)], axis=1)
    np.testing.assert_allclose(np.asarray(state.g_recent), want, rtol=0, atol=0)
    assert (want > g).any()  # the lookahead changed some gates
    # The banks differ from the plain layer's: the raised gates write other tokens.
    assert not np.array_equal(np.asarray(state.k_buf), np.asarray(raw.k_buf))
    # Token-by-token steps raise the same gates (the ring is circular there).
    _, stepped = ahead.prefill(x[:, :21], ahead.init_state(2, mem_init="zeros"), block_size=4)
    for t in range(21, 37):
        _, stepped = ahead.step(x[:, t:t + 1], stepped)
    order = (np.asarray(stepped.recent_idx)[:, None] + np.arange(8)) % 8
    np.testing.assert_allclose(np.take_along_axis(np.asarray(stepped.g_recent), order, 1),
                               want, rtol=1e-6, atol=0)  # a step's gate: a 1-token matmul


@pytest.mark.parametrize("path", ["prefill", "steps"])
def test_gate_eviction_keeps_the_highest_gates(path):
    """exact_eviction="gate" (not in the reference): with every evicted token a novel
    candidate (threshold 0, novelty off), the exact bank ends holding the tokens of
    the highest write gates among all evicted, each slot keyed by its token's gate;
    "lru" keeps the last ones instead."""
    opts = dict(window=4, num_landmarks_exact=3, num_landmarks_summary=0,
                write_gate_threshold_exact=0.0, exact_novelty_threshold=1.01,
                exact_candidates_per_block=4)
    x = _x(9, 2, 30)
    ends = {}
    for eviction in ("gate", "lru"):
        layer = _layer(11, exact_eviction=eviction, **opts)
        if path == "prefill":
            _, state = layer.prefill(x, layer.init_state(2, mem_init="zeros"), block_size=4)
        else:
            state = layer.init_state(2, mem_init="zeros")
            for t in range(30):
                _, state = layer.step(x[:, t:t + 1], state)
        ends[eviction] = state
    # Every token's gate: the ring of the same weights under a window longer than the input.
    wide = _layer(11, **(opts | dict(window=32)))
    _, whole = wide.prefill(x, wide.init_state(2, mem_init="zeros"), block_size=4)
    evicted = np.asarray(whole.g_recent)[:, :26]                     # tokens 0..25 left
    gate_state, lru_state = ends["gate"], ends["lru"]
    held = np.sort(np.asarray(gate_state.mem_last_exact), axis=1)
    want = np.sort(np.round(np.sort(evicted, axis=1)[:, -3:] * (1 << 24)), axis=1)
    # (Prefill's candidates are each block's best 4: the top 3 overall are among them.)
    np.testing.assert_allclose(held, want, atol=2)
    # ... and they hold those tokens' keys.
    top = np.argsort(evicted, axis=1)[:, -3:]
    for row in range(2):
        bank = np.asarray(gate_state.k_buf[row, 4:7], np.float64).reshape(3, -1)
        tokens = np.asarray(whole.k_buf[row, top[row]], np.float64).reshape(3, -1)
        assert_close(bank[np.lexsort(bank.T)], tokens[np.lexsort(tokens.T)], what="keys")
    assert not np.array_equal(np.asarray(lru_state.mem_last_exact),
                              np.asarray(gate_state.mem_last_exact))


def test_sink_tokens_stay_in_the_exact_bank_by_prefill_and_by_steps():
    """sink_tokens=2 (not in the reference): the first two tokens' keys are in the
    exact bank after 40 tokens through a 4-token window, keyed above any gate, by
    prefill in blocks and by token-by-token steps alike; without sinks they are not."""
    opts = dict(window=4, num_landmarks_exact=3, num_landmarks_summary=2,
                exact_eviction="gate", exact_novelty_threshold=1.01)
    x = _x(12, 2, 40)
    wide = _layer(13, **(opts | dict(window=64)))
    _, whole = wide.prefill(x, wide.init_state(2, mem_init="zeros"), block_size=4)
    first = np.asarray(whole.k_buf[:, :2], np.float64)               # tokens 0 and 1

    def bank_rows(state):
        return np.asarray(state.k_buf[:, 4:7], np.float64)

    def holds_first(state, row):
        bank = bank_rows(state)[row].reshape(3, -1)
        return [bool(np.any(np.all(np.isclose(bank, t.reshape(1, -1), atol=1e-6), axis=1)))
                for t in first[row]]

    sinks, plain = _layer(13, sink_tokens=2, **opts), _layer(13, **opts)
    _, prefilled = sinks.prefill(x, sinks.init_state(2, mem_init="zeros"), block_size=4)
    stepped = sinks.init_state(2, mem_init="zeros")
    for t in range(40):
        _, stepped = sinks.step(x[:, t:t + 1], stepped)
    _, without = plain.prefill(x, plain.init_state(2, mem_init="zeros"), block_size=4)
    for row in range(2):
        assert holds_first(prefilled, row) == [True, True]
        assert holds_first(stepped, row) == [True, True]
        assert holds_first(without, row) != [True, True]
    key = 2 * (1 << 24)  # a sink's slot key: its gate of 2
    assert (np.asarray(prefilled.mem_last_exact) == key).sum(axis=1).tolist() == [2, 2]
    assert (np.asarray(stepped.mem_last_exact) == key).sum(axis=1).tolist() == [2, 2]


@pytest.mark.parametrize("bad", [dict(sink_tokens=2, exact_eviction="lru"),
                                 dict(sink_tokens=5, exact_eviction="gate"),
                                 dict(sink_tokens=-1, exact_eviction="gate")])
def test_sink_tokens_are_checked(bad):
    with pytest.raises(ValueError, match="sink_tokens"):
        CoDAGQALandmark(**SMALL, window=8, num_landmarks_exact=4, num_landmarks_summary=4,
                        rngs=nnx.Rngs(0), **bad)


def test_non_differential_switch_is_gqa_over_the_same_buffer():
    """differential=False equals the reference with its lambda forced to 0."""
    ref = reference_landmark(5, **SMALL, window=8, num_landmarks_exact=4,
                             num_landmarks_summary=4)
    with torch.no_grad():
        ref.lambda_proj.weight.zero_()
        ref.lambda_proj.bias.fill_(-1e4)
    ours = CoDAGQALandmark(**SMALL, window=8, num_landmarks_exact=4, num_landmarks_summary=4,
                           differential=False, rngs=nnx.Rngs(0))
    assert ours.theta is None and ours.lambda_proj is None
    load_reference_weights(ours, {k: v for k, v in ref.state_dict().items()
                                  if not k.startswith(("theta", "lambda_proj"))})
    x = torch.randn(2, 30, 64)
    init = ref.init_state(batch_size=2, device="cpu", dtype=torch.float32)
    from convert import state_from_reference
    state = state_from_reference(init, ours)
    with torch.no_grad(), sorted_reference_topk():
        want, _ = ref.prefill_chunked(x, init, block_size=8)
    got, _ = ours.prefill(to_jnp(x), state, block_size=8)
    assert_close(got, want)


def test_frequency_band_keeps_the_fast_pairs_of_summary_keys_zero():
    kw = dict(window=4, num_landmarks_exact=0, num_landmarks_summary=4, rope_interleaved=False)
    x = _x(4, 1, 40)
    for band in ("reference", "frequency"):
        layer = _layer(6, lf_band=band, **kw)
        _, state = layer.prefill(x, layer.init_state(1, key=jax.random.key(0)), block_size=8)
        summary = np.asarray(state.k_buf[:, layer.layout.summary_slice])
        band_mask = np.isin(np.arange(16), layer.layout.lf_dims)  # independent of the library
        assert np.abs(summary[..., ~band_mask]).max() == 0
        assert np.abs(summary[..., band_mask]).max() > 0
    # Under interleaved pairing both bands are the same dims: identical results.
    a = _layer(7, lf_band="reference")
    b = _layer(7, lf_band="frequency")
    ya, _ = a.prefill(x, a.init_state(1, key=jax.random.key(1)), block_size=8)
    yb, _ = b.prefill(x, b.init_state(1, key=jax.random.key(1)), block_size=8)
    np.testing.assert_array_equal(ya, yb)


def test_gradients_through_evictions_match_the_reference():
    torch.manual_seed(0)
    ref = reference_landmark(11, **SMALL, window=8, num_landmarks_exact=4,
                             num_landmarks_summary=4, detach_evicted=False,
                             write_gate_threshold_exact=0.0, write_gate_threshold_summary=0.0)
    ref.train()
    layer = from_reference(ref)
    x = torch.randn(2, 40, 64)
    weight = torch.randn(2, 40, 64)
    xr = x.clone().requires_grad_(True)
    with sorted_reference_topk():
        y, _ = ref.prefill_chunked(xr, ref.init_state(batch_size=2, device="cpu",
                                                      dtype=torch.float32, mem_init="zeros"),
                                   block_size=8)
        (y * weight).sum().backward()

    def loss(layer, x):
        y, _ = layer.prefill(x, layer.init_state(2, mem_init="zeros"), block_size=8,
                             training=True)
        return jnp.sum(y * to_jnp(weight))

    grads, grad_x = jax.grad(loss, argnums=(0, 1))(layer, to_jnp(x))
    assert_close(grad_x, xr.grad, rtol=1e-4, what="d/dx")
    ours = reference_state_dict(grads)
    assert np.abs(ours["write_proj.weight"]).max() > 0
    for name, p in ref.named_parameters():
        assert np.isfinite(ours[name]).all(), name
        assert_close(ours[name], p.grad, rtol=1e-4, what=f"d/d{name}")


def test_metrics_count_what_the_reference_counts_in_prefill():
    kw = SMALL | dict(window=4, num_landmarks_exact=4, num_landmarks_summary=4,
                      collect_metrics=True, min_landmarks_exact=1, expansion_t_max=20)
    ref = reference_landmark(12, **kw)
    layer = from_reference(ref)
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(5, 64, generator=gen)
    x = table[torch.randint(0, 5, (1, 60), generator=gen)]
    init = ref.init_state(batch_size=1, device="cpu", dtype=torch.float32)
    from convert import state_from_reference
    state = state_from_reference(init, layer)
    with torch.no_grad(), sorted_reference_topk():
        _, ref_state = ref.prefill_chunked(x, init, block_size=8)
    _, state = layer.prefill(to_jnp(x), state, block_size=8)
    m = ref_state.metrics
    assert m["total_evictions"] > 0 and m["exact_hits"] + m["exact_inserts"] > 0
    for name in ("total_evictions", "tokens_gated_out", "exact_hits", "exact_inserts",
                 "exact_overwrites", "exact_frustrated", "summary_updates", "summary_inserts",
                 "summary_frustrated", "expansions_exact", "expansions_summary"):
        assert int(getattr(state.metrics, name)[0]) == m[name], name


def test_cache_bytes_is_the_true_size_and_smaller_than_the_reference():
    layer = _layer(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
    for dtype in (jnp.float32, jnp.bfloat16):
        state = layer.init_state(3, dtype, key=jax.random.key(0))
        actual = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        assert layer.cache_bytes(batch_size=3, dtype=dtype) == actual
    ref = coda_gqa_l.CoDAGQALandmarkPerf2(**SMALL, window=256, num_landmarks_exact=64,
                                          num_landmarks_summary=64)
    assert layer.cache_bytes(batch_size=1, dtype=jnp.bfloat16) < ref.cache_bytes(
        batch_size=1, dtype=torch.bfloat16)


@pytest.mark.parametrize("kwargs,message", [
    (dict(embed_dim=60, num_heads=8, num_kv_heads=2), "divisible by num_heads"),
    (dict(embed_dim=64, num_heads=4, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(embed_dim=36, num_heads=4, num_kv_heads=2), "head_dim must be even"),
    (dict(window=0), "window must be a positive"),
    (dict(min_landmarks_exact=5, max_landmarks_exact=2), "min_landmarks_exact"),
    (dict(min_landmarks_summary=3, max_landmarks_summary=1), "min_landmarks_summary"),
    (dict(write_policy="sometimes"), "write_policy"),
    (dict(lf_band="middle"), "lf_band"),
    (dict(write_gate_lookahead=8), "write_gate_lookahead must be an integer from 0 to"),
    (dict(write_gate_lookahead=-1), "write_gate_lookahead"),
    (dict(exact_eviction="oldest"), "exact_eviction"),
])
def test_bad_configs_are_clear_errors(kwargs, message):
    cfg = SMALL | dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4) | kwargs
    with pytest.raises(ValueError, match=message):
        CoDAGQALandmark(**cfg, rngs=nnx.Rngs(0))


def test_bad_inputs_and_foreign_states_are_clear_errors():
    layer = _layer(window=8)
    state = layer.init_state(2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="embed_dim=64"):
        layer.prefill(jnp.zeros((2, 5, 32)), state)
    with pytest.raises(ValueError, match="one token per row"):
        layer.step(jnp.zeros((2, 3, 64)), state)
    with pytest.raises(ValueError, match="k_buf"):
        layer.step(jnp.zeros((3, 1, 64)), state)
    other = _layer(window=16)
    with pytest.raises(ValueError, match="window=8"):
        layer.prefill(jnp.zeros((2, 5, 64)), other.init_state(2, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="metrics"):
        layer.step(jnp.zeros((2, 1, 64)), _layer(collect_metrics=True).init_state(
            2, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="lengths"):
        layer.prefill(jnp.zeros((2, 5, 64)), state, lengths=[5, 6])
    with pytest.raises(ValueError, match="block_size"):
        layer.prefill(jnp.zeros((2, 5, 64)), state, block_size=0)
    with pytest.raises(ValueError, match="PRNG key"):
        layer.init_state(2)


def test_lru_slot_ranking_equals_a_stable_sort():
    """The exact bank picks insertion slots by pairwise ranking instead of a sort."""
    from coda_jax.exact_bank import nth_in_stable_order

    rng = np.random.default_rng(0)
    for _ in range(20):
        key = rng.integers(-3, 4, size=(3, 16)).astype(np.int32)   # many ties
        n = rng.integers(0, 16, size=(3, 5))
        want = np.take_along_axis(np.argsort(key, axis=-1, kind="stable"), n, axis=1)
        np.testing.assert_array_equal(nth_in_stable_order(jnp.asarray(key), jnp.asarray(n)),
                                      want)
