"""The bounded decode attention kernel against the pure-jnp reference.

CPU: Pallas interpret mode over a pairwise matrix of query tokens (1, 3), bank
sizes (50: one tile, so the kernel finishes the rows itself; 100, 384, 700: not
multiples of the tile, split over programs and merged afterwards), batch
(1, 3), GQA ratios 1/4/8, head_dim 64/128, masks (none, holes, per-token),
float32 (1e-5 relative) and bf16 (1e-2), fresh random inputs per case. The
``gpu`` test repeats it at decode sizes when a GPU is present.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coda_jax.attention_math import differential_attention
from pallas_kernels.decode_attention import decode_attention, decode_splits
from attention_inputs import host_rng, random_attention_inputs, rel_err
from pairwise import pairwise, uncovered_pairs

FACTORS = {
    "tokens": [1, 3],
    "slots": [50, 100, 384, 700],
    "batch": [1, 3],
    "group": [1, 4, 8],
    "head_dim": [64, 128],
    "mask": ["none", "holes", "per_token"],
    "dtype": ["float32", "bfloat16"],
}
CASES = pairwise(FACTORS, seed=3)


def test_matrix_covers_every_pair():
    assert not uncovered_pairs(FACTORS, CASES)


def make_inputs(case, seed):
    arrays_key, mask_key = jax.random.split(jax.random.key(seed))
    b, t, s = case["batch"], case["tokens"], case["slots"]
    arrays = random_attention_inputs(arrays_key, batch=b, q_len=t, k_len=s,
                                     group=case["group"], head_dim=case["head_dim"],
                                     dtype=case["dtype"])
    uniform = host_rng(mask_key).random
    mask = (None if case["mask"] == "none" else
            jnp.asarray(uniform((b, s)) > 0.3) if case["mask"] == "holes" else
            jnp.asarray(uniform((b, t, s)) > 0.5))
    return (*arrays, mask)


@functools.partial(jax.jit, static_argnames="head_norm")  # one compile, not one per operation
def reference(q, qn, k, v, lam, w, mask, head_norm=True):
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, :]
    with jax.default_matmul_precision("highest"):
        if not head_norm:
            return differential_attention(up(q), up(k), up(v), q_noise=up(qn), lam=up(lam),
                                          mask=mask, head_norm=False)
        return differential_attention(up(q), up(k), up(v), q_noise=up(qn), lam=up(lam),
                                      mask=mask, norm_weight=up(w))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_decode_matches_reference(case):
    q, qn, k, v, lam, w, mask = make_inputs(case, zlib.crc32(repr(case).encode()))
    got = decode_attention(q, qn, k, v, lam, mask, norm_weight=w)
    assert got.dtype == q.dtype and got.shape == q.shape
    tol = 1e-5 if case["dtype"] == "float32" else 1e-2
    assert rel_err(got, reference(q, qn, k, v, lam, w, mask)) < tol


@pytest.mark.parametrize("slots", [50, 384])
def test_without_head_norm(slots):
    case = dict(tokens=1, slots=slots, batch=2, group=4, head_dim=64, mask="holes",
                dtype="float32")
    q, qn, k, v, lam, w, mask = make_inputs(case, slots)
    got = decode_attention(q, qn, k, v, lam, mask, head_norm=False)
    assert rel_err(got, reference(q, qn, k, v, lam, w, mask, head_norm=False)) < 1e-5


def test_slots_split_over_programs_when_the_batch_is_small():
    assert decode_splits(batch=1, kv_heads=8, slots=384, block_s=64) == 6
    assert decode_splits(batch=256, kv_heads=8, slots=384, block_s=64) == 1
    assert decode_splits(batch=1, kv_heads=8, slots=50, block_s=64) == 1


def test_rows_without_visible_slots_are_zero():
    case = dict(tokens=1, slots=100, batch=2, group=4, head_dim=64, mask="holes",
                dtype="float32")
    q, qn, k, v, lam, w, _ = make_inputs(case, 5)
    mask = jnp.ones((2, 100), bool).at[0].set(False)
    got = decode_attention(q, qn, k, v, lam, mask, norm_weight=w)
    assert not np.asarray(got[0]).any()
    assert rel_err(got[1], reference(q, qn, k, v, lam, w, mask)[1]) < 1e-5


def test_bad_mask_shape_is_a_clear_error():
    q = jnp.zeros((1, 1, 4, 64))
    kv = jnp.zeros((1, 32, 2, 64))
    with pytest.raises(ValueError, match="key_mask must be"):
        decode_attention(q, q, kv, kv, jnp.zeros((1, 1, 4)), jnp.ones((1, 31), bool))


@pytest.mark.gpu
@pytest.mark.parametrize("batch,slots", [(1, 384), (64, 768), (256, 384)])
def test_gpu_decode_sizes(batch, slots):
    case = dict(tokens=1, slots=slots, batch=batch, group=4, head_dim=128, mask="holes",
                dtype="bfloat16")
    q, qn, k, v, lam, w, mask = make_inputs(case, batch + slots)
    got = jax.jit(lambda *a: decode_attention(*a, norm_weight=w))(q, qn, k, v, lam, mask)
    assert rel_err(got, reference(q, qn, k, v, lam, w, mask)) < 1e-2
