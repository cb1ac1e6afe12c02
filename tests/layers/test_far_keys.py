"""``max_key_distance``: exact-bank keys farther than the limit from the query are read
as if at the limit (documents longer than a model's training positions); the state
records each exact slot's token position for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import CoDAGQALandmark, load_state, save_state

SMALL = dict(embed_dim=64, num_heads=4, num_kv_heads=2)
WINDOW = 8


def _layer(limit: int | None, seed: int = 0) -> CoDAGQALandmark:
    """A layer whose write gates differ per token (random gate weights), so the exact
    bank keeps some tokens and not others; no summary bank (its routing reads keys)."""
    layer = CoDAGQALandmark(**SMALL, window=WINDOW, num_landmarks_exact=6,
                            num_landmarks_summary=0, exact_eviction="gate", sink_tokens=2,
                            exact_candidates_per_block=4, exact_novelty_threshold=0.99,
                            write_gate_threshold_exact=0.2, max_key_distance=limit,
                            rngs=nnx.Rngs(seed))
    layer.write_proj.kernel[...] = jax.random.normal(jax.random.key(seed + 1), (64, 1))
    return layer


def _x(seed: int, batch: int, length: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, length, 64))


def _rotate(keys: np.ndarray, shift: np.ndarray, head_dim: int, base: float) -> np.ndarray:
    """RoPE by ``shift`` (B, M) positions of keys (B, M, H, Dh), interleaved pairs,
    written out here independently of coda_jax.primitives."""
    inv_freq = base ** (-np.arange(0, head_dim, 2) / head_dim)
    angle = shift[..., None, None].astype(np.float64) * inv_freq       # (B, M, 1, Dh/2)
    a, b = keys[..., 0::2].astype(np.float64), keys[..., 1::2].astype(np.float64)
    out = np.empty(keys.shape, np.float64)
    out[..., 0::2] = a * np.cos(angle) - b * np.sin(angle)
    out[..., 1::2] = b * np.cos(angle) + a * np.sin(angle)
    return out.astype(keys.dtype)


def _moved_to_the_limit(state, limit: int, query_pos: np.ndarray):
    """``state`` with its exact keys re-encoded where a query at ``query_pos`` (B,)
    reads them under ``limit``, and no positions: what a layer without the limit
    must read to give the same outputs."""
    k = np.array(state.k_buf)
    exact = slice(WINDOW, WINDOW + state.exact_pos.shape[-1])
    shift = np.maximum(query_pos[:, None] - limit - np.asarray(state.exact_pos), 0)
    assert shift.max() > 0, "no key is far enough to be moved: the test tests nothing"
    k[:, exact] = _rotate(k[:, exact], shift, 16, 10_000.0)
    return state.replace(k_buf=jnp.asarray(k), exact_pos=None)


def test_exact_pos_names_the_token_each_exact_slot_holds():
    layer = _layer(limit=40)
    x = _x(1, 2, 150)
    lengths = np.array([120, 97])
    _, state = layer.prefill(x[:, :120], layer.init_state(2, key=jax.random.key(0)),
                             block_size=16, lengths=lengths)
    for t in range(20):
        _, state = layer.step(x[:, 120 + t:121 + t], state)
    # Every token's key at its position: row 1 read 97 prompt tokens, then the steps.
    inputs = np.array(x)
    inputs[1, 97:117] = inputs[1, 120:140]
    keys, _ = layer.project_kv(jnp.asarray(inputs), jnp.broadcast_to(jnp.arange(150), (2, 150)))
    used = np.asarray(state.allowed[:, WINDOW:])
    assert used.sum() >= 8, "too few exact slots in use to test"
    for row in range(2):
        for slot in np.flatnonzero(used[row]):
            at = int(state.exact_pos[row, slot])
            np.testing.assert_allclose(state.k_buf[row, WINDOW + slot], keys[row, at],
                                       rtol=1e-5, atol=1e-5)
    assert set(np.asarray(state.exact_pos[0])[used[0]]) >= {0, 1}, "the sinks are kept"


def test_within_the_limit_nothing_changes():
    near, plain = _layer(limit=400), _layer(limit=None)
    x = _x(2, 2, 210)
    got, state = near.prefill(x[:, :200], near.init_state(2, key=jax.random.key(0)),
                              block_size=16)
    want, plain_state = plain.prefill(x[:, :200], plain.init_state(2, key=jax.random.key(0)),
                                      block_size=16)
    np.testing.assert_array_equal(got, want)
    for t in range(200, 210):
        got, state = near.step(x[:, t:t + 1], state)
        want, plain_state = plain.step(x[:, t:t + 1], plain_state)
        np.testing.assert_array_equal(got, want)
    assert plain_state.exact_pos is None
    jax.tree.map(np.testing.assert_array_equal, state.replace(exact_pos=None), plain_state)


@pytest.mark.parametrize("limit", [24, 61])
def test_far_exact_keys_are_read_at_the_limit(limit):
    near, plain = _layer(limit), _layer(None)
    x = _x(3, 2, 260)
    _, state = near.prefill(x[:, :240], near.init_state(2, key=jax.random.key(0)),
                            block_size=16, lengths=np.array([240, 203]))
    pos = np.asarray(state.pos)
    # One decode step: the query at pos.
    got, _ = near.step(x[:, 240:241], state)
    want, _ = plain.step(x[:, 240:241], _moved_to_the_limit(state, limit, pos))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # One block of 16 prompt tokens: the bank is read from the block's last token.
    got, _ = near.prefill(x[:, 240:256], state, block_size=16)
    want, _ = plain.prefill(x[:, 240:256], _moved_to_the_limit(state, limit, pos + 15),
                            block_size=16)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Not moving them gives other outputs: the test can fail.
    unmoved, _ = plain.step(x[:, 240:241], state.replace(exact_pos=None))
    assert not np.allclose(unmoved, near.step(x[:, 240:241], state)[0], atol=1e-4)


def test_the_limit_is_checked_and_saved_states_keep_their_positions(tmp_path):
    with pytest.raises(ValueError, match="max_key_distance must be None or an integer above"):
        _layer(limit=WINDOW)
    with pytest.raises(ValueError, match="max_key_distance"):
        _layer(limit=40.5)
    near = _layer(limit=40)
    _, state = near.prefill(_x(4, 1, 90), near.init_state(1, key=jax.random.key(0)),
                            block_size=16)
    save_state(tmp_path / "s", state, near)
    jax.tree.map(np.testing.assert_array_equal, load_state(tmp_path / "s", near), state)
    with pytest.raises(ValueError, match="max_key_distance: saved 40, model None"):
        load_state(tmp_path / "s", _layer(limit=None))
    with pytest.raises(ValueError, match="lacks exact_pos"):
        near.check_state(state.replace(exact_pos=None))
