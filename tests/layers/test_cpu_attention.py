"""The CPU's attention loop (``attention_math.tiled_attention``): query tiles that attend
only to the keys some query of them may see, against attention in one piece."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_inputs import rel_err
from coda_jax import attention_math


def grouped(seed: int, rows: int, queries: int, keys: int):
    """Fresh grouped queries (B, Lq, Hkv=2, S=3, Dh=16) and keys/values (B, Lk, 2, 16)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (rows, queries, 2, 3, 16)),
            jax.random.normal(kk, (rows, keys, 2, 16)),
            jax.random.normal(kv, (rows, keys, 2, 16)))


@pytest.mark.parametrize("visible", [0, 1, 37, 255, 256, 257, 300])
def test_visible_keys_attention_matches_attention_in_one_piece(visible, monkeypatch):
    """Any count of visible keys (none, under, at and over a chunk, all), scattered
    over the keys, with a bias: the same outputs and gradients as the dense path."""
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 256)
    q, k, v = grouped(visible, 1, 8, 300)
    rng = np.random.default_rng(visible)
    seen = np.zeros(300, bool)
    seen[rng.choice(300, visible, replace=False)] = True
    # Each query sees a random part of the visible keys; one query sees none.
    mask = jnp.asarray(seen[None, None] & (rng.random((1, 8, 300)) < 0.7))
    mask = mask.at[:, 3].set(False)
    bias = jnp.asarray(rng.normal(size=(1, 8, 300)), jnp.float32)
    heads_first = lambda a: a.transpose(0, 2, 1, 3, 4)  # noqa: E731
    kv_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731

    def loss(fn, q, k, v):
        out = fn(heads_first(q), kv_first(k), kv_first(v), mask, bias)
        return jnp.sum(out * jnp.cos(out)), out

    (_, want), want_grads = jax.value_and_grad(
        lambda *a: loss(attention_math.heads_first_attention, *a), argnums=(0, 1, 2),
        has_aux=True)(q, k, v)
    (_, got), got_grads = jax.value_and_grad(
        lambda *a: loss(attention_math.visible_keys_attention, *a), argnums=(0, 1, 2),
        has_aux=True)(q, k, v)
    assert np.isfinite(np.asarray(got)).all()
    assert float(jnp.abs(got[:, :, 3]).max()) == 0.0      # a query that sees nothing
    assert rel_err(got, want) < 1e-5
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-4


def test_visible_keys_attention_takes_fewer_keys(monkeypatch):
    """Few visible keys run the smallest branch: its keys are gathered (a gather of
    KEY_CHUNK rows is in the program), and masked keys never reach the output even
    when they hold NaN (they are not read)."""
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    q, k, v = grouped(5, 1, 4, 256)
    mask = (jnp.arange(256) < 40)[None, None]
    k = k.at[:, 200:].set(jnp.nan)
    v = v.at[:, 200:].set(jnp.nan)
    out = attention_math.visible_keys_attention(
        q.transpose(0, 2, 1, 3, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, None)
    assert np.isfinite(np.asarray(out)).all()
    want = attention_math.heads_first_attention(
        q.transpose(0, 2, 1, 3, 4), k[:, :40].transpose(0, 2, 1, 3),
        v[:, :40].transpose(0, 2, 1, 3), mask[..., :40], None)
    assert rel_err(out, want) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_differential_attention_on_cpu_tiles_matches_one_piece(causal, monkeypatch):
    """The bounded prefill's shape on a CPU (several rows, a key mask with an empty
    middle, as a bank with unused slots): tiled and compacted against one piece."""
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    kq, kn, kk, kv, kl = jax.random.split(jax.random.key(11), 5)
    q = jax.random.normal(kq, (3, 128, 6, 16))
    q_noise = jax.random.normal(kn, (3, 128, 6, 16))
    k = jax.random.normal(kk, (3, 400, 2, 16))
    v = jax.random.normal(kv, (3, 400, 2, 16))
    lam = jax.random.uniform(kl, (3, 128, 6))
    used = jnp.arange(400)[None, :]
    key_mask = (used < jnp.array([[90], [300], [10]])) | (used >= 272)

    def run():
        return attention_math.differential_attention(q, k, v, q_noise=q_noise, lam=lam,
                                                     causal=causal, key_mask=key_mask)

    tiled = run()
    monkeypatch.setattr(attention_math, "QUERY_TILE", 1024)   # no tiles: one piece
    assert rel_err(tiled, run()) < 1e-5
