"""The fused differential flash attention kernel against the pure-jnp reference.

CPU: Pallas interpret mode, over a pairwise matrix of lengths (1, 7, 129, 1000),
Lq < Lk prefixes, key masks with holes, GQA ratios 1/4/8, head_dim 64/128,
float32 (1e-5 relative) and bf16 (1e-2), with fresh random inputs per case;
gradients of every input against ``jax.grad`` of the reference; outputs
poisoned with NaN before the call so an unwritten tile fails. The ``gpu``
tests repeat the checks at real sizes when a GPU is present.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coda_jax.attention_math import causal_mask, differential_attention
from pallas_kernels.diff_flash import FlashConfig, diff_flash_attention, flash_forward, pad_inputs
from attention_inputs import host_rng, random_attention_inputs, rel_err
from pairwise import pairwise, uncovered_pairs

FACTORS = {
    "q_len": [1, 7, 129, 1000],
    "prefix": [0, 37],           # bank slots before the queries (Lk = Lq + prefix)
    "holes": [False, True],
    "group": [1, 4, 8],
    "head_dim": [64, 128],
    "dtype": ["float32", "bfloat16"],
    "head_norm": [True, False],
}
CASES = pairwise(FACTORS, seed=5)


def test_matrix_covers_every_pair():
    assert not uncovered_pairs(FACTORS, CASES)


def make_inputs(case, seed):
    arrays_key, mask_key, extra_key = jax.random.split(jax.random.key(seed), 3)
    b, lq = 2, case["q_len"]
    lk = lq + case["prefix"]
    arrays = random_attention_inputs(arrays_key, batch=b, q_len=lq, k_len=lk,
                                     group=case["group"], head_dim=case["head_dim"],
                                     dtype=case["dtype"])
    key_mask = (jnp.asarray(host_rng(mask_key).random((b, lk)) > 0.25) if case["holes"]
                else jnp.ones((b, lk), bool))
    return (*arrays, key_mask, extra_key)


@functools.partial(jax.jit, static_argnames="head_norm")  # one compile, not one per operation
def reference(q, qn, k, v, lam, w, key_mask, head_norm):
    mask = causal_mask(q.shape[1], k.shape[1])[None] & key_mask[:, None, :]
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        return differential_attention(up(q), up(k), up(v), q_noise=up(qn), lam=up(lam),
                                      mask=mask, norm_weight=up(w), head_norm=head_norm)


def kernel(q, qn, k, v, lam, w, key_mask, head_norm, blocks=(32, 32)):
    return diff_flash_attention(q, qn, k, v, lam, key_mask=key_mask, norm_weight=w,
                                head_norm=head_norm, block_q=blocks[0], block_k=blocks[1])


def tolerance(case):
    return 1e-5 if case["dtype"] == "float32" else 1e-2


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_forward_matches_reference(case):
    q, qn, k, v, lam, w, key_mask, _ = make_inputs(case, zlib.crc32(repr(case).encode()))
    got = kernel(q, qn, k, v, lam, w, key_mask, case["head_norm"])
    assert got.dtype == q.dtype and got.shape == q.shape
    want = reference(q, qn, k, v, lam, w, key_mask, case["head_norm"])
    assert rel_err(got, want) < tolerance(case)


@pytest.mark.parametrize("case", [c for c in CASES if c["q_len"] <= 129][:6],
                         ids=lambda c: "-".join(map(str, c.values())))
def test_gradients_match_reference(case):
    q, qn, k, v, lam, w, key_mask, gkey = make_inputs(case, zlib.crc32(repr(case).encode()) + 1)
    cot = jnp.asarray(host_rng(gkey).standard_normal(q.shape, np.float32))
    args = (q, qn, k, v, lam, w)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, key_mask, case["head_norm"]).astype(jnp.float32) * cot)

    # Each gradient compiled as a whole, as a training step takes it.
    got = jax.jit(jax.grad(loss(kernel), argnums=range(6)))(*args)
    want = jax.jit(jax.grad(loss(reference), argnums=range(6)))(*args)
    names = ["q", "q_noise", "k", "v", "lam", "norm_weight"]
    for name, g, r in zip(names, got, want):
        if name == "norm_weight" and not case["head_norm"]:
            continue
        assert g.dtype == dict(zip(names, args))[name].dtype
        assert rel_err(g, r) < 10 * tolerance(case), name


def test_every_output_tile_is_written():
    case = dict(q_len=70, prefix=37, holes=True, group=4, head_dim=64, dtype="float32",
                head_norm=True)
    q, qn, k, v, lam, w, key_mask, _ = make_inputs(case, 11)
    cfg = FlashConfig(q_len=70, k_len=107, block_q=16, block_k=32, causal=True,
                      head_norm=True, eps=1e-6, interpret=True)
    padded = pad_inputs(cfg, q, qn, k, v, lam, key_mask, w)
    poison = jnp.full(padded[0].shape, jnp.nan, padded[0].dtype)
    out = flash_forward(cfg, *padded, residuals=False, out_init=poison)[0]
    assert not np.isnan(np.asarray(out)).any()
    assert rel_err(out[:, :70], reference(q, qn, k, v, lam, w, key_mask, True)) < 1e-5


def test_rows_without_visible_keys_are_zero():
    case = dict(q_len=5, prefix=0, holes=False, group=1, head_dim=64, dtype="float32",
                head_norm=False)
    q, qn, k, v, lam, w, _, _ = make_inputs(case, 3)
    key_mask = jnp.zeros((2, 5), bool).at[:, 3].set(True)   # queries 0-2 see nothing
    got = kernel(q, qn, k, v, lam, w, key_mask, False)
    assert not np.asarray(got[:, :3]).any()
    assert rel_err(got, reference(q, qn, k, v, lam, w, key_mask, False)) < 1e-5


def test_bad_shapes_are_clear_errors():
    q = jnp.zeros((1, 4, 4, 48))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        diff_flash_attention(q, q, jnp.zeros((1, 4, 2, 48)), jnp.zeros((1, 4, 2, 48)),
                             jnp.zeros((1, 4, 4)))
    q = jnp.zeros((1, 8, 4, 64))
    with pytest.raises(ValueError, match="Lq <= Lk"):
        diff_flash_attention(q, q, jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 2, 64)),
                             jnp.zeros((1, 8, 4)))


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,prefix", [(2048, 0), (1024, 384), (1000, 383)])
def test_gpu_real_sizes(q_len, prefix):
    case = dict(q_len=q_len, prefix=prefix, holes=True, group=4, head_dim=128,
                dtype="bfloat16", head_norm=True)
    q, qn, k, v, lam, w, key_mask, _ = make_inputs(case, q_len)
    fn = jax.jit(lambda *a: diff_flash_attention(*a, key_mask=key_mask, interpret=False))
    got = fn(q, qn, k, v, lam)
    want = reference(q, qn, k, v, lam, jnp.ones_like(w), key_mask, True)
    assert rel_err(got, want) < 1e-2


MOSAIC_CASES = [  # (q_len, prefix, group, head_dim, dtype, causal, holes)
    (1024, 0, 4, 128, "bfloat16", True, False),
    (512, 256, 1, 64, "float16", True, False),
    (256, 0, 8, 128, "bfloat16", False, False),
    (192, 64, 4, 64, "bfloat16", True, False),
    (1024, 384, 4, 128, "bfloat16", True, True),   # a bounded-layer prefill block
    (1000, 383, 8, 64, "bfloat16", True, True),    # ragged: padded to tiles, masked
    (7, 37, 4, 128, "float16", False, True),
    (129, 0, 1, 128, "bfloat16", True, True),
    (256, 384, 4, 64, "bfloat16", True, "empty_prefix"),   # an empty bank: whole key
    (256, 384, 4, 128, "bfloat16", True, "empty_prefix"),  # tiles masked for every row
]


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,prefix,group,head_dim,dtype,causal,holes", MOSAIC_CASES)
def test_gpu_hopper_kernel_forward(q_len, prefix, group, head_dim, dtype, causal, holes):
    case = dict(q_len=q_len, prefix=prefix, holes=holes, group=group, head_dim=head_dim,
                dtype=dtype, head_norm=True)
    q, qn, k, v, lam, w, key_mask, _ = make_inputs(case, q_len + prefix)
    if holes == "empty_prefix":
        key_mask = jnp.ones_like(key_mask).at[:, :prefix].set(False)
    got = jax.jit(lambda *a: diff_flash_attention(
        *a, norm_weight=w, causal=causal, key_mask=key_mask if holes else None,
        kernel="mosaic"))(q, qn, k, v, lam)
    mask = key_mask[:, None, :] & (causal_mask(q_len, q_len + prefix)[None] if causal else True)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = differential_attention(up(q), up(k), up(v), q_noise=up(qn), lam=up(lam), mask=mask,
                                  norm_weight=up(w))
    assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
def test_gpu_hopper_kernel_rows_that_see_no_key_are_zero():
    """Batch row 0 has every key masked (an empty bank, no block tokens): zeros out
    and zero, finite gradients, as the reference gives."""
    case = dict(q_len=256, prefix=384, holes=True, group=4, head_dim=128, dtype="bfloat16",
                head_norm=True)
    q, qn, k, v, lam, w, key_mask, _ = make_inputs(case, 11)
    key_mask = key_mask.at[0].set(False)
    run = lambda *a: diff_flash_attention(*a, norm_weight=w, causal=False,  # noqa: E731
                                          key_mask=key_mask, kernel="mosaic")
    got = jax.jit(run)(q, qn, k, v, lam)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = differential_attention(up(q), up(k), up(v), q_noise=up(qn), lam=up(lam),
                                  mask=key_mask[:, None, :], norm_weight=up(w))
    assert not np.asarray(got[0], np.float32).any()
    assert rel_err(got, want) < 1e-2
    grads = jax.grad(lambda *a: jnp.sum(run(*a).astype(jnp.float32) ** 2),
                     argnums=range(5))(q, qn, k, v, lam)
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all()
    assert not np.asarray(grads[0][0], np.float32).any()


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,holes", [(512, False), (500, True)])
def test_gpu_hopper_forward_gradients(q_len, holes):
    """Unmasked whole tiles: the Hopper backward; masked or ragged: the portable one
    after the Hopper forward."""
    case = dict(q_len=q_len, prefix=128, holes=holes, group=4, head_dim=128,
                dtype="bfloat16", head_norm=True)
    q, qn, k, v, lam, w, key_mask, gkey = make_inputs(case, 77)
    cot = jnp.asarray(host_rng(gkey).standard_normal(q.shape, np.float32))

    def loss(kind):
        return lambda *a: jnp.sum(diff_flash_attention(
            *a[:5], norm_weight=a[5], key_mask=key_mask if holes else None,
            kernel=kind).astype(jnp.float32) * cot)

    got = jax.grad(loss("mosaic"), argnums=range(6))(q, qn, k, v, lam, w)
    want = jax.grad(lambda *a: jnp.sum(reference(*a, key_mask, True) * cot),
                    argnums=range(6))(q, qn, k, v, lam, w)
    for name, g, r in zip(["q", "q_noise", "k", "v", "lam", "norm_weight"], got, want):
        assert rel_err(g, r) < 1e-1, name


@pytest.mark.parametrize("q_len,k_len,block_q,block_kv", [
    (256, 256, 64, 128), (192, 320, 64, 64), (128, 384, 64, 128), (64, 64, 64, 64),
    (320, 448, 64, 64)])
def test_hopper_causal_tile_ranges_cover_exactly_the_visible_pairs(q_len, k_len, block_q,
                                                                   block_kv):
    """The loop bounds of the Hopper kernels: every visible (query, key) pair is
    visited, tiles run without a mask hold only visible pairs, skipped tiles none."""
    from pallas_kernels.diff_flash_mgpu import causal_key_tiles
    from pallas_kernels.diff_flash_mgpu_bwd import causal_query_tiles

    offset = k_len - q_len
    visible = np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + offset
    n_q, n_kv = q_len // block_q, k_len // block_kv
    by_query_tile = np.zeros_like(visible)
    for t in range(n_q):  # forward and dq: a query tile walks key tiles
        unmasked, steps = map(int, causal_key_tiles(t * block_q, block_q, offset, block_kv))
        assert 0 <= unmasked <= steps <= n_kv
        rows = slice(t * block_q, (t + 1) * block_q)
        by_query_tile[rows, :steps * block_kv] = True
        assert visible[rows, :unmasked * block_kv].all()
    np.testing.assert_array_equal(by_query_tile & visible, visible)
    by_key_tile = np.zeros_like(visible)
    for u in range(k_len // block_kv):  # dk/dv: a key tile walks query tiles
        first, full = map(int, causal_query_tiles(u * block_kv, block_kv, offset, block_q, n_q))
        assert 0 <= first <= full <= n_q
        cols = slice(u * block_kv, (u + 1) * block_kv)
        by_key_tile[first * block_q:, cols] = True
        assert not visible[:first * block_q, cols].any()
        assert visible[full * block_q:, cols].all()
    np.testing.assert_array_equal(by_key_tile & visible, visible)


@pytest.mark.parametrize("head_norm", [True, False])
def test_portable_kernels_lower_for_cuda_with_their_backward(head_norm):
    """The forward and the three backward kernels (epilogue, dq, dk/dv) traced and
    lowered through Pallas' Triton path on the CPU (not run)."""
    import re

    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 320, 2, 128), jnp.bfloat16)
    lam = jax.ShapeDtypeStruct((1, 256, 4), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((128,), jnp.bfloat16)
    key_mask = jax.ShapeDtypeStruct((1, 320), jnp.bool_)

    def loss(q, qn, k, v, lam, w, key_mask):
        return jnp.sum(diff_flash_attention(
            q, qn, k, v, lam, key_mask=key_mask, norm_weight=w, head_norm=head_norm,
            interpret=False, kernel="portable").astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=range(6)))
    text = grad.trace(q, q, kv, kv, lam, w, key_mask).lower(
        lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r'name = "(diff_flash[a-z_]*)"', text)) == {
        "diff_flash_forward", "diff_flash_epilogue_grad", "diff_flash_dq", "diff_flash_dkv"}


@pytest.mark.parametrize("causal,head_dim,residuals,key_bias", [
    (True, 128, True, False), (False, 64, False, True), (True, 64, False, False),
    (True, 128, True, True)])
def test_hopper_kernel_lowers_for_cuda(causal, head_dim, residuals, key_bias):
    """Traced and lowered to Mosaic GPU on the CPU (not run): API drift and tracing
    errors show here; the ``gpu`` tests above check its numbers on a Hopper GPU."""
    from pallas_kernels.diff_flash_mgpu import MosaicConfig, mosaic_blocks, mosaic_forward

    cfg = MosaicConfig(*mosaic_blocks(head_dim), 2, causal=causal, head_norm=True, eps=1e-6,
                       offset=250 if key_bias else None)
    q = jax.ShapeDtypeStruct((1, 256, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, head_dim), jnp.bfloat16)
    lam = jax.ShapeDtypeStruct((1, 4, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((head_dim,), jnp.float32)
    bias = [jax.ShapeDtypeStruct((1, 512), jnp.float32)] if key_bias else []
    fn = jax.jit(lambda *a: mosaic_forward(cfg, *a, residuals=residuals))
    text = fn.trace(q, q, kv, kv, lam, w, *bias).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("causal,head_dim,q_len,k_len", [(True, 128, 256, 384),
                                                         (False, 64, 128, 128)])
def test_hopper_backward_lowers_for_cuda(causal, head_dim, q_len, k_len):
    """The Hopper backward kernels traced and lowered on the CPU (not run)."""
    from pallas_kernels.diff_flash_mgpu_bwd import mosaic_backward

    q = jax.ShapeDtypeStruct((1, q_len, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, k_len, 2, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, 4, q_len), jnp.float32)
    fn = jax.jit(lambda *a: mosaic_backward(*a, causal=causal))
    lowered = fn.trace(q, q, kv, kv, q, q, rows, rows, rows, rows).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("prefix,causal", [(128, True), (0, False)])
def test_gpu_hopper_backward_gradients(prefix, causal):
    case = dict(q_len=512, prefix=prefix, holes=False, group=4, head_dim=128,
                dtype="bfloat16", head_norm=True)
    q, qn, k, v, lam, w, key_mask, gkey = make_inputs(case, 78 + prefix)
    cot = jnp.asarray(host_rng(gkey).standard_normal(q.shape, np.float32))

    def loss(backward):
        return lambda *a: jnp.sum(diff_flash_attention(
            *a[:5], norm_weight=a[5], causal=causal, kernel="mosaic",
            backward=backward).astype(jnp.float32) * cot)

    got = jax.grad(loss("mosaic"), argnums=range(6))(q, qn, k, v, lam, w)
    want = jax.grad(loss("portable"), argnums=range(6))(q, qn, k, v, lam, w)
    for name, g, r in zip(["q", "q_noise", "k", "v", "lam", "norm_weight"], got, want):
        assert rel_err(g, r) < 3e-2, name


def test_hopper_kernel_refuses_what_it_cannot_run():
    q = jnp.zeros((1, 64, 4, 64))
    with pytest.raises(ValueError, match="Hopper kernel needs"):
        diff_flash_attention(q, q, jnp.zeros((1, 64, 2, 64)), jnp.zeros((1, 64, 2, 64)),
                             jnp.zeros((1, 64, 4)), kernel="mosaic", interpret=False)
    with pytest.raises(ValueError, match="needs the Hopper forward"):
        diff_flash_attention(q, q, jnp.zeros((1, 64, 2, 64)), jnp.zeros((1, 64, 2, 64)),
                             jnp.zeros((1, 64, 4)), backward="mosaic")


def test_pallas_fallback_sends_decode_to_xla_and_prefill_to_the_library(monkeypatch):
    """Calls the Pallas kernels cannot take (here: no noise stream): a few queries
    over a bank go to XLA, longer ones to the fused library (cuDNN on a GPU, forced
    here; the CPU has no cuDNN, so reaching it raises)."""
    from coda_jax import attention_math

    monkeypatch.setattr(attention_math, "library_attention", lambda dtype: "cudnn")
    k = jnp.ones((1, 32, 2, 64))
    decode = differential_attention(jnp.ones((1, 1, 4, 64)), k, k,
                                    key_mask=jnp.ones((1, 32), bool), implementation="pallas")
    assert decode.shape == (1, 1, 4, 64)
    with pytest.raises(Exception, match="(?i)cudnn|gpu|cuda"):
        differential_attention(jnp.ones((1, 32, 4, 64)), k, k, causal=True,
                               implementation="pallas")
