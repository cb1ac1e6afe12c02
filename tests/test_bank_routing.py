"""The fused bank-routing kernel against the XLA routing it replaces.

Each case builds a state with XLA (banks partly full, so hits, inserts and LRU
eviction all happen), then writes one more segment both ways: with
``fused=True`` (the Pallas kernel, interpret mode on CPU) and without. Every
leaf of the new state and of the per-block views must agree: integers and
masks exactly, floats to 1e-5 (float32) or 1e-2 (bf16, one rounding).
Pairwise matrix over the write policy, refresh-on-hit, overwrite-on-insert,
bank expansion, training, dtype, block size (7: candidates padded to a tile),
head layout (a non-power-of-two KV head count), LF band and ragged rows
(lengths 0, partial and full in one batch). The ``gpu`` test repeats it at
the benchmark's layer shape.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coda_jax import memory
from coda_jax.config import BankConfig
from pairwise import pairwise, uncovered_pairs

FACTORS = {
    "write_policy": ["gated", "none"],
    "refresh_on_hit": [False, True],
    "overwrite_on_insert": [True, False],
    "expansion": [False, True],
    "training": [False, True],
    "dtype": ["float32", "bfloat16"],
    "block": [7, 16],
    "heads_dim": [(2, 16), (3, 32)],
    "lf_band": ["reference", "frequency"],
    "ragged": [False, True],
}
CASES = pairwise(FACTORS, seed=5)


def test_matrix_covers_every_pair():
    assert not uncovered_pairs(FACTORS, CASES)


def bank_config(case, slots=16) -> BankConfig:
    lo = slots // 2 if case["expansion"] else slots
    return BankConfig(
        window=16, num_landmarks_exact=slots, num_landmarks_summary=slots,
        write_policy=case["write_policy"], exact_refresh_on_hit=case["refresh_on_hit"],
        summary_overwrite_on_insert=case["overwrite_on_insert"],
        min_landmarks_exact=lo, max_landmarks_exact=slots, min_landmarks_summary=lo,
        max_landmarks_summary=slots, expansion_t_max=64, collect_metrics=True,
        lf_band=case["lf_band"], mem_init="zeros")


def segment(key, batch, length, heads, head_dim, dtype):
    """Keys with near-repeats (exact-bank hits) and fresh tokens, values, gates."""
    k1, k2, k3 = jax.random.split(key, 3)
    base = jax.random.normal(k1, (batch, length // 4, heads, head_dim))
    fresh = jax.random.normal(k2, (batch, length - 2 * (length // 4), heads, head_dim))
    k = jnp.concatenate([base, base + 0.01 * fresh[:, :length // 4], fresh], axis=1)
    v = 0.5 * jnp.roll(k, 3, axis=1) + 0.1
    gate = jax.nn.sigmoid(2.0 * jax.random.normal(k3, (batch, length)))
    return k.astype(dtype), v.astype(dtype), gate


def write_both_ways(case, seed, *, batch=3, n_blocks=3, slots=16, detach=True):
    heads, head_dim = case["heads_dim"]
    cfg = bank_config(case, slots)
    if not detach:
        cfg = BankConfig(**{**cfg.__dict__, "detach_evicted": False})
    layout = memory.bank_layout(cfg, heads, head_dim, case["lf_band"] == "reference")
    dtype = jnp.dtype(case["dtype"])
    block = case["block"]
    length = block * n_blocks
    keys = jax.random.split(jax.random.key(seed), 3)
    eta = jnp.linspace(-1.0, 1.0, heads)

    def write(state, k, v, gate, lengths, fused):
        return memory.write_segment(
            layout, state, k=k, v=v, gate=gate, lengths=lengths, block_size=block,
            eta_logit=eta, training=case["training"], unroll=1, fused=fused)

    full = jnp.full((batch,), length, jnp.int32)
    state = memory.init_state(layout, batch, dtype, None, "zeros")
    state, _ = jax.jit(write, static_argnums=5)(
        state, *segment(keys[0], batch, length, heads, head_dim, dtype), full, False)
    lengths = jnp.asarray([0, length - block - 2, length][:batch]) if case["ragged"] else full
    k, v, gate = segment(keys[1], batch, length, heads, head_dim, dtype)
    return layout, state, (k, v, gate, lengths), write


def assert_same(got, want, dtype):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        name = jax.tree_util.keystr(path)
        if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            tol = 1e-5 if dtype == jnp.float32 else 1e-2
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64),
                                       rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_fused_routing_matches_xla(case):
    layout, state, (k, v, gate, lengths), write = write_both_ways(
        case, zlib.crc32(repr(case).encode()))
    run = jax.jit(write, static_argnums=5)
    assert memory.fusable(layout)
    assert "bank_routing" in str(jax.make_jaxpr(write, static_argnums=5)(
        state, k, v, gate, lengths, True))
    assert_same(run(state, k, v, gate, lengths, True), run(state, k, v, gate, lengths, False),
                jnp.dtype(case["dtype"]))


def test_layouts_the_kernel_does_not_take_fall_back_to_xla():
    case = dict(CASES[0], heads_dim=(2, 8))
    layout, state, (k, v, gate, lengths), write = write_both_ways(case, 1)
    assert not memory.fusable(layout)
    assert "bank_routing" not in str(jax.make_jaxpr(write, static_argnums=5)(
        state, k, v, gate, lengths, True))


def test_gradient_through_the_fused_routing_is_the_xla_one():
    case = dict(write_policy="gated", refresh_on_hit=True, overwrite_on_insert=True,
                expansion=False, training=True, dtype="float32", block=16,
                heads_dim=(2, 16), lf_band="reference", ragged=False)
    _, state, (k, v, gate, lengths), write = write_both_ways(case, 7, batch=2, n_blocks=2,
                                                             detach=False)

    def loss(k, v, gate, fused):
        new, views = write(state, k, v, gate, lengths, fused)
        return (jnp.sum(new.k_buf ** 2) + jnp.sum(new.v_buf * views[1][:, -1:].mean())
                + jnp.sum(views[0] ** 2))

    grads = {fused: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(
        k, v, gate, fused) for fused in (True, False)}
    for got, want in zip(grads[True], grads[False]):
        assert np.isfinite(np.asarray(got)).all() and np.abs(np.asarray(want)).max() > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_layer_shape():
    case = dict(write_policy="gated", refresh_on_hit=False, overwrite_on_insert=True,
                expansion=True, training=False, dtype="bfloat16", block=1024,
                heads_dim=(8, 128), lf_band="reference", ragged=True)
    _, state, (k, v, gate, lengths), write = write_both_ways(case, 11, batch=2, n_blocks=4,
                                                             slots=64)
    run = jax.jit(write, static_argnums=5)
    assert_same(run(state, k, v, gate, lengths, True), run(state, k, v, gate, lengths, False),
                jnp.bfloat16)
