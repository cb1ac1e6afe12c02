"""Fused differential flash attention in Pallas (portable Triton-style lowering).

One program owns a block of queries of one head and streams the K/V tiles of
its KV head once, keeping two online softmaxes (the signal query and its
Givens-rotated noise query) in registers; the epilogue ``signal - lambda *
noise`` and the head RMSNorm run before anything is written. GQA never
repeats K/V: the KV head is chosen by the BlockSpec index map. Causal masking
is aligned to the lower right (queries are the last Lq of Lk positions, as a
new block after a prefix of bank slots), and a per-key validity mask covers
the bank's unused slots. Rows with no visible key output zeros (as
``coda_jax.attention_math`` does).

The backward pass is a ``jax.custom_vjp`` of three Pallas kernels: one takes
the gradient through the epilogue per query block (the two streams' upstream
gradients, dlambda, and per-block shares of the norm weight's gradient, summed
after), two recompute the probabilities to form dq/dq_noise (per query block)
and dk/dv (per key block and query head, summed over each KV group).

On CPU these kernels run in Pallas interpret mode (the tests); on GPU through
Pallas' Triton lowering. On a Hopper GPU (16-bit, head_dim 64/128) the forward
runs on ``diff_flash_mgpu`` instead, with the same residuals, and the backward of
unmasked whole-tile calls on ``diff_flash_mgpu_bwd`` (H100, L=8192: forward 589
TFLOP/s against 118 here, forward+backward 459; benchmarks/results/NOTES.md).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .shared import MASKED_SCORE
from .diff_flash_mgpu import (MosaicConfig, heavy_first_pays, mosaic_blocks,
                              mosaic_forward, mosaic_supported)
from .diff_flash_mgpu_bwd import mosaic_backward

LOG2E = math.log2(math.e)


class FlashConfig(NamedTuple):
    """Static shape facts of one call (hashable: part of the jit/custom_vjp key)."""

    q_len: int
    k_len: int
    block_q: int
    block_k: int
    causal: bool
    head_norm: bool
    eps: float
    interpret: bool
    mosaic: bool = False  # forward on the Hopper kernel (diff_flash_mgpu)
    mosaic_backward: bool = False  # backward on the Hopper kernels (diff_flash_mgpu_bwd)
    masked: bool = False  # some key is masked (a key mask, or padding to whole tiles)

    @property
    def offset(self) -> int:  # query i sits at key position i + offset
        return self.k_len - self.q_len

    @property
    def q_pad(self) -> int:
        return -(-self.q_len // self.block_q) * self.block_q

    @property
    def k_pad(self) -> int:
        return -(-self.k_len // self.block_k) * self.block_k


def _visible(cfg: FlashConfig, q_start, k_start, valid):
    """(block_q, block_k) mask: key valid and, if causal, not in a query's future."""
    span_q = q_start + jnp.arange(cfg.block_q)
    span_k = k_start + jnp.arange(cfg.block_k)
    mask = jnp.broadcast_to(valid[None, :] > 0, (cfg.block_q, cfg.block_k))
    if cfg.causal:
        mask = mask & (span_k[None, :] <= span_q[:, None] + cfg.offset)
    return mask


def _k_blocks_for(cfg: FlashConfig, q_block):
    """Key blocks a query block can see (all of them unless causal)."""
    n_k = cfg.k_pad // cfg.block_k
    if not cfg.causal:
        return n_k
    last = (q_block + 1) * cfg.block_q + cfg.offset  # one past the last visible key
    return jnp.clip(lax_cdiv(last, cfg.block_k), 0, n_k)


def lax_cdiv(a, b: int):
    return jax.lax.div(a + b - 1, b)


# Contracted axes for matmul: a @ b.T, a @ b, a.T @ b.
NT, NN, TN = ((1,), (1,)), ((1,), (0,)), ((0,), (0,))


def matmul(a, b, contract):
    """Tile matmul accumulating in float32."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def masked_scores(query, k, scale: float, mask):
    """Masked logits of a (block_q, block_k) tile, in log2 units (for exp2)."""
    return jnp.where(mask, matmul(query, k, NT) * (scale * LOG2E), MASKED_SCORE)


def _key_tile(cfg: FlashConfig, k_ref, v_ref, valid_ref, kb, q_start):
    """Key block kb of a query block's loop: k, v and the visibility mask."""
    k_start = kb * cfg.block_k
    rows = pl.ds(k_start, cfg.block_k)
    return k_ref[rows, :], v_ref[rows, :], _visible(cfg, q_start, k_start, valid_ref[rows])


# ----------------------------------------------------------------- forward
def _forward_kernel(q_ref, qn_ref, k_ref, v_ref, lam_ref, valid_ref, w_ref,
                    o_ref, o1_ref, o2_ref, lse1_ref, lse2_ref, *, cfg: FlashConfig,
                    scale: float):
    q_block = pl.program_id(0)
    q_start = q_block * cfg.block_q
    q = q_ref[...]
    qn = qn_ref[...]
    dh = q.shape[-1]
    init = tuple(x for _ in range(2) for x in (
        jnp.zeros((cfg.block_q, dh), jnp.float32),
        jnp.full((cfg.block_q,), MASKED_SCORE, jnp.float32),
        jnp.zeros((cfg.block_q,), jnp.float32)))

    def body(kb, carry):
        k, v, mask = _key_tile(cfg, k_ref, v_ref, valid_ref, kb, q_start)
        out = []
        for stream, query in enumerate((q, qn)):
            acc, m_prev, l_prev = carry[3 * stream:3 * stream + 3]
            s = masked_scores(query, k, scale, mask)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
            corr = jnp.exp2(m_prev - m_next)
            p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
            acc = acc * corr[:, None] + matmul(p.astype(v.dtype), v, NN)
            out += [acc, m_next, l_prev * corr + jnp.sum(p, axis=-1)]
        return tuple(out)

    acc1, m1, l1, acc2, m2, l2 = jax.lax.fori_loop(0, _k_blocks_for(cfg, q_block), body, init)
    seen = l1 > 0  # both streams see the same keys
    o1 = jnp.where(seen[:, None], acc1 / jnp.where(seen, l1, 1.0)[:, None], 0.0)
    o2 = jnp.where(seen[:, None], acc2 / jnp.where(seen, l2, 1.0)[:, None], 0.0)
    o = o1 - lam_ref[...].astype(jnp.float32)[:, None] * o2
    if cfg.head_norm:
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + cfg.eps)
        o = o * w_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = o.astype(o_ref.dtype)
    if o1_ref is not None:
        o1_ref[...] = o1.astype(o1_ref.dtype)
        o2_ref[...] = o2.astype(o2_ref.dtype)
        # log2-sum-exp2 per row; +inf for rows that saw nothing (their p is 0).
        lse1_ref[...] = jnp.where(seen, m1 + jnp.log2(jnp.where(seen, l1, 1.0)), jnp.inf)
        lse2_ref[...] = jnp.where(seen, m2 + jnp.log2(jnp.where(seen, l2, 1.0)), jnp.inf)


def _compiler_params(dh: int):
    """Triton launch settings: more warps for wider heads (ignored when interpreting)."""
    return plgpu.CompilerParams(num_warps=4 if dh <= 64 else 8, num_stages=2)


def _specs_q(cfg: FlashConfig, dh: int):
    return pl.BlockSpec((None, cfg.block_q, None, dh), lambda i, b, h: (b, i, h, 0))


def flash_forward(cfg: FlashConfig, q, qn, k, v, lam, valid, w, *, residuals: bool,
             out_init=None):
    """Padded inputs -> o (and, with ``residuals``, o1, o2, lse1, lse2)."""
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    group = h // hkv
    kv_spec = pl.BlockSpec((None, cfg.k_pad, None, dh), lambda i, b_, h_: (b_, 0, h_ // group, 0))
    row_spec = pl.BlockSpec((None, None, cfg.block_q), lambda i, b_, h_: (b_, h_, i))
    in_specs = [_specs_q(cfg, dh), _specs_q(cfg, dh), kv_spec, kv_spec, row_spec,
                pl.BlockSpec((None, cfg.k_pad), lambda i, b_, h_: (b_, 0)),
                pl.BlockSpec((dh,), lambda i, b_, h_: (0,))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [_specs_q(cfg, dh)]
    if residuals:
        out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2
        out_shape += [jax.ShapeDtypeStruct((b, h, lq), jnp.float32)] * 2
        out_specs += [_specs_q(cfg, dh)] * 2 + [row_spec] * 2
    kernel = functools.partial(_forward_kernel, cfg=cfg, scale=dh ** -0.5)
    if not residuals:
        kernel = functools.partial(_no_residuals, kernel)
    args = [q, qn, k, v, lam, valid, w]
    aliases = {}
    if out_init is not None:  # tests: a poisoned output shows any tile left unwritten
        args.append(out_init)
        in_specs.append(_specs_q(cfg, dh))
        aliases = {len(args) - 1: 0}
        kernel = functools.partial(_drop_aliased_input, kernel)
    return pl.pallas_call(
        kernel, grid=(cfg.q_pad // cfg.block_q, b, h), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=_compiler_params(dh), interpret=cfg.interpret,
        name="diff_flash_forward")(*args)


def _no_residuals(kernel, q_ref, qn_ref, k_ref, v_ref, lam_ref, valid_ref, w_ref, o_ref):
    kernel(q_ref, qn_ref, k_ref, v_ref, lam_ref, valid_ref, w_ref, o_ref,
           None, None, None, None)


def _drop_aliased_input(kernel, *refs):
    # The aliased poisoned buffer is the last input; the kernel never reads it.
    n_in = 7
    kernel(*refs[:n_in], *refs[n_in + 1:])


# ---------------------------------------------------------------- backward
def _dq_kernel(q_ref, qn_ref, k_ref, v_ref, valid_ref, do1_ref, do2_ref, lse1_ref, lse2_ref,
               d1_ref, d2_ref, dq_ref, dqn_ref, *, cfg: FlashConfig, scale: float):
    q_block = pl.program_id(0)
    q_start = q_block * cfg.block_q
    streams = ((q_ref[...], do1_ref[...], lse1_ref[...], d1_ref[...]),
               (qn_ref[...], do2_ref[...], lse2_ref[...], d2_ref[...]))

    def body(kb, grads):
        k, v, mask = _key_tile(cfg, k_ref, v_ref, valid_ref, kb, q_start)
        out = []
        for (query, do, lse, delta), dq in zip(streams, grads):
            p = jnp.where(mask, jnp.exp2(masked_scores(query, k, scale, mask) - lse[:, None]), 0.0)
            ds = p * (matmul(do, v, NT) - delta[:, None])
            out.append(dq + matmul(ds.astype(k.dtype), k, NN))
        return tuple(out)

    zeros = jnp.zeros((cfg.block_q, q_ref.shape[-1]), jnp.float32)
    dq, dqn = jax.lax.fori_loop(0, _k_blocks_for(cfg, q_block), body, (zeros, zeros))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    dqn_ref[...] = (dqn * scale).astype(dqn_ref.dtype)


def _dkv_kernel(q_ref, qn_ref, k_ref, v_ref, valid_ref, do1_ref, do2_ref, lse1_ref, lse2_ref,
                d1_ref, d2_ref, dk_ref, dv_ref, *, cfg: FlashConfig, scale: float):
    k_block = pl.program_id(0)
    k_start = k_block * cfg.block_k
    k = k_ref[...]
    v = v_ref[...]
    valid = valid_ref[pl.ds(k_start, cfg.block_k)]
    refs = ((q_ref, do1_ref, lse1_ref, d1_ref), (qn_ref, do2_ref, lse2_ref, d2_ref))

    def body(qb, grads):
        dk, dv = grads
        q_start = qb * cfg.block_q
        rows = pl.ds(q_start, cfg.block_q)
        mask = _visible(cfg, q_start, k_start, valid)
        for query_ref, do_ref, lse_ref, delta_ref in refs:
            query, do = query_ref[rows, :], do_ref[rows, :]
            s = masked_scores(query, k, scale, mask)
            p = jnp.where(mask, jnp.exp2(s - lse_ref[rows][:, None]), 0.0)
            dv = dv + matmul(p.astype(do.dtype), do, TN)
            ds = p * (matmul(do, v, NT) - delta_ref[rows][:, None])
            dk = dk + matmul(ds.astype(query.dtype), query, TN)
        return dk, dv

    first = 0
    if cfg.causal:  # query i sees key j iff j <= i + offset
        first = jnp.maximum(k_start - cfg.offset, 0) // cfg.block_q
    zeros = jnp.zeros((cfg.block_k, k_ref.shape[-1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(first, cfg.q_pad // cfg.block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _attention_grads(cfg: FlashConfig, q, qn, k, v, valid, do1, do2, lse1, lse2, d1, d2):
    """dq, dq_noise (B, Lq, H, Dh) and dk, dv (B, Lk, Hkv, Dh), float32."""
    b, _, h, dh = q.shape
    hkv = k.shape[2]
    group = h // hkv
    kv_full = pl.BlockSpec((None, cfg.k_pad, None, dh), lambda i, b_, h_: (b_, 0, h_ // group, 0))
    rows_q = pl.BlockSpec((None, None, cfg.block_q), lambda i, b_, h_: (b_, h_, i))
    valid_spec = pl.BlockSpec((None, cfg.k_pad), lambda i, b_, h_: (b_, 0))
    q_grad_shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    dq, dqn = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, scale=dh ** -0.5),
        grid=(cfg.q_pad // cfg.block_q, b, h),
        in_specs=[_specs_q(cfg, dh)] * 2 + [kv_full] * 2 + [valid_spec]
        + [_specs_q(cfg, dh)] * 2 + [rows_q] * 4,
        out_specs=[_specs_q(cfg, dh)] * 2, out_shape=[q_grad_shape] * 2,
        compiler_params=_compiler_params(dh), interpret=cfg.interpret, name="diff_flash_dq",
    )(q, qn, k, v, valid, do1, do2, lse1, lse2, d1, d2)
    q_full = pl.BlockSpec((None, cfg.q_pad, None, dh), lambda j, b_, h_: (b_, 0, h_, 0))
    kv_block = pl.BlockSpec((None, cfg.block_k, None, dh),
                            lambda j, b_, h_: (b_, j, h_ // group, 0))
    rows_full = pl.BlockSpec((None, None, cfg.q_pad), lambda j, b_, h_: (b_, h_, 0))
    per_head = pl.BlockSpec((None, cfg.block_k, None, dh), lambda j, b_, h_: (b_, j, h_, 0))
    head_grad_shape = jax.ShapeDtypeStruct((b, cfg.k_pad, h, dh), jnp.float32)
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, scale=dh ** -0.5),
        grid=(cfg.k_pad // cfg.block_k, b, h),
        in_specs=[q_full] * 2 + [kv_block] * 2
        + [pl.BlockSpec((None, cfg.k_pad), lambda j, b_, h_: (b_, 0))]
        + [q_full] * 2 + [rows_full] * 4,
        out_specs=[per_head] * 2, out_shape=[head_grad_shape] * 2,
        compiler_params=_compiler_params(dh), interpret=cfg.interpret, name="diff_flash_dkv",
    )(q, qn, k, v, valid, do1, do2, lse1, lse2, d1, d2)
    # Sum each KV group's query heads.
    fold = lambda g: g.reshape(b, cfg.k_pad, hkv, group, dh).sum(axis=3)  # noqa: E731
    return dq, dqn, fold(dk_h), fold(dv_h)


def _portable_grads(cfg: FlashConfig, q, qn, k, v, valid, *rows):
    """The portable backward kernels. After the Hopper forward (keys padded to
    its 128/256-key tiles) they run on 64-key tiles: keys past the 64-multiple
    are padding (masked), so they are sliced off and get zero gradients."""
    if not cfg.mosaic or cfg.block_k == 64:
        return _attention_grads(cfg, q, qn, k, v, valid, *rows)
    tiles64 = cfg._replace(block_k=64)
    n = tiles64.k_pad
    dq, dqn, dk, dv = _attention_grads(tiles64, q, qn, k[:, :n], v[:, :n], valid[:, :n], *rows)
    pad = ((0, 0), (0, cfg.k_pad - n), (0, 0), (0, 0))
    return dq, dqn, jnp.pad(dk, pad), jnp.pad(dv, pad)


def _epilogue_grad_kernel(do_ref, o1_ref, o2_ref, lam_ref, w_ref, do1_ref, do2_ref, dlam_ref,
                          dw_ref, *, cfg: FlashConfig):
    """Gradients through ``HeadNorm(o1 - lam * o2)`` for one tile of query rows:
    the streams' upstream gradients, dlambda per row, and this tile's share of
    the norm weight's gradient."""
    f32 = jnp.float32
    do, o1, o2 = do_ref[...].astype(f32), o1_ref[...].astype(f32), o2_ref[...].astype(f32)
    lam = lam_ref[...].astype(f32)[:, None]
    if cfg.head_norm:
        pre = o1 - lam * o2
        r = jax.lax.rsqrt(jnp.mean(pre * pre, axis=-1, keepdims=True) + cfg.eps)
        normed = pre * r
        dw_ref[...] = jnp.sum(do * normed, axis=0)
        dn = do * w_ref[...].astype(f32)[None, :]
        do = r * (dn - normed * jnp.mean(dn * normed, axis=-1, keepdims=True))
    else:
        dw_ref[...] = jnp.zeros(dw_ref.shape, f32)
    do1_ref[...] = do.astype(do1_ref.dtype)
    do2_ref[...] = (-lam * do).astype(do2_ref.dtype)
    dlam_ref[...] = -jnp.sum(do * o2, axis=-1)


def _epilogue_backward(cfg: FlashConfig, do, o1, o2, lam, w):
    """(do1, do2) in the inputs' dtype, dlambda (B, H, Lq) and dw (Dh,), float32."""
    b, lq, h, dh = o1.shape
    n_q = cfg.q_pad // cfg.block_q
    rows = pl.BlockSpec((None, None, cfg.block_q), lambda i, b_, h_: (b_, h_, i))
    do1, do2, dlam, dw_tiles = pl.pallas_call(
        functools.partial(_epilogue_grad_kernel, cfg=cfg), grid=(n_q, b, h),
        in_specs=[_specs_q(cfg, dh)] * 3 + [rows, pl.BlockSpec((dh,), lambda i, b_, h_: (0,))],
        out_specs=[_specs_q(cfg, dh)] * 2 + [
            rows, pl.BlockSpec((None, None, None, dh), lambda i, b_, h_: (i, b_, h_, 0))],
        out_shape=[jax.ShapeDtypeStruct(o1.shape, o1.dtype)] * 2 + [
            jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
            jax.ShapeDtypeStruct((n_q, b, h, dh), jnp.float32)],
        compiler_params=_compiler_params(dh), interpret=cfg.interpret,
        name="diff_flash_epilogue_grad",
    )(do, o1, o2, lam, w)
    return do1, do2, dlam, dw_tiles.sum(axis=(0, 1, 2))


def _any_forward(cfg: FlashConfig, q, qn, k, v, lam, valid, w, *, residuals: bool):
    if not cfg.mosaic:
        outs = flash_forward(cfg, q, qn, k, v, lam, valid, w, residuals=residuals)
        return tuple(outs) if residuals else outs[0]
    mcfg = MosaicConfig(cfg.block_q, cfg.block_k, stages=2, causal=cfg.causal,
                        head_norm=cfg.head_norm, eps=cfg.eps,
                        heavy_first=heavy_first_pays(q.shape[1]), offset=cfg.offset)
    bias = jnp.where(valid > 0, 0.0, MASKED_SCORE) if cfg.masked else None
    return mosaic_forward(mcfg, q, qn, k, v, lam.astype(jnp.float32), w.astype(jnp.float32),
                          bias, residuals=residuals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, q, qn, k, v, lam, valid, w):
    return _any_forward(cfg, q, qn, k, v, lam, valid, w, residuals=False)


def _fused_fwd(cfg, q, qn, k, v, lam, valid, w):
    o, o1, o2, lse1, lse2 = _any_forward(cfg, q, qn, k, v, lam, valid, w, residuals=True)
    return o, (q, qn, k, v, lam, valid, w, o1, o2, lse1, lse2)


def _fused_bwd(cfg, res, do):
    q, qn, k, v, lam, valid, w, o1, o2, lse1, lse2 = res
    do1, do2, dlam, dw = _epilogue_backward(cfg, do, o1, o2, lam, w)
    # The kernels see do in the inputs' dtype; delta = rowsum(do * o) must use the
    # same rounded do, or dp - delta leaves rounding noise where it should cancel.
    delta = lambda g, o: jnp.swapaxes(jnp.sum(  # noqa: E731
        g.astype(jnp.float32) * o.astype(jnp.float32), -1), 1, 2)
    if cfg.mosaic_backward:
        dq, dqn, dk, dv = mosaic_backward(q, qn, k, v, do1, do2, lse1, lse2, delta(do1, o1),
                                          delta(do2, o2), causal=cfg.causal)
    else:
        dq, dqn, dk, dv = _portable_grads(cfg, q, qn, k, v, valid, do1, do2, lse1, lse2,
                                          delta(do1, o1), delta(do2, o2))
    cast = lambda g, x: g.astype(x.dtype)  # noqa: E731
    return (cast(dq, q), cast(dqn, qn), cast(dk, k), cast(dv, v), cast(dlam, lam),
            jnp.zeros_like(valid), cast(dw, w))


_fused.defvjp(_fused_fwd, _fused_bwd)


def default_blocks(head_dim: int, q_len: int, k_len: int) -> tuple[int, int]:
    """Tile sizes: 64x64 (smaller for short inputs), powers of two."""
    fit = lambda n: max(16, min(64, pl.next_power_of_2(n)))  # noqa: E731
    return fit(q_len), fit(k_len)


def diff_flash_attention(q: jax.Array, q_noise: jax.Array, k: jax.Array, v: jax.Array,
                         lam: jax.Array, *, key_mask: jax.Array | None = None,
                         norm_weight: jax.Array | None = None, head_norm: bool = True,
                         eps: float = 1e-6, causal: bool = True, block_q: int | None = None,
                         block_k: int | None = None, interpret: bool | None = None,
                         kernel: str = "auto", backward: str = "auto") -> jax.Array:
    """``HeadNorm(Attn(q) - lam * Attn(q_noise))`` in one fused pass -> (B, Lq, H, Dh).

    q, q_noise (B, Lq, H, Dh); k, v (B, Lk, Hkv, Dh) with Lq <= Lk (queries are
    the last Lq positions when causal); lam (B, Lq, H); key_mask (B, Lk) bool,
    True = may attend; norm_weight (Dh,). Differentiable in q, q_noise, k, v,
    lam and norm_weight. ``interpret`` defaults to True off GPU.

    ``kernel``: ``"mosaic"`` runs the forward on the Hopper kernel
    (``diff_flash_mgpu``; compute capability 9.0, bf16/fp16, Dh 64/128; ragged
    lengths are padded to its tiles and masked), ``"portable"`` on the
    Triton-lowered one (``block_q``/``block_k`` size its tiles); ``"auto"`` takes
    the Hopper kernel wherever it applies. ``backward``: ``"mosaic"`` runs the
    gradients on ``diff_flash_mgpu_bwd`` (needs the Hopper forward, no key mask and
    whole tiles: Lq % 64, Lk % 128, or 256 at Dh 64), ``"portable"`` on the
    portable kernels; ``"auto"`` takes the Hopper backward wherever it applies.
    """
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if q_noise.shape != q.shape or v.shape != k.shape or k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"shapes do not fit: q {q.shape}, q_noise {q_noise.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if h % hkv or dh & (dh - 1) or (causal and lq > lk):
        raise ValueError(f"need num_heads % num_kv_heads == 0, a power-of-two head_dim and, "
                         f"when causal, Lq <= Lk; got H={h}, Hkv={hkv}, Dh={dh}, Lq={lq}, "
                         f"Lk={lk}")
    if kernel not in ("auto", "mosaic", "portable"):
        raise ValueError(f"kernel must be 'auto', 'mosaic' or 'portable', got {kernel!r}")
    if backward not in ("auto", "portable", "mosaic"):
        raise ValueError(f"backward must be 'auto', 'portable' or 'mosaic', got {backward!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    mosaic = kernel != "portable" and not interpret and mosaic_supported(q, k, causal=causal)
    if kernel == "mosaic" and not mosaic:
        raise ValueError(
            "the Hopper kernel needs a compute-capability 9.0 GPU, bf16/fp16, head_dim 64 "
            f"or 128 and, when causal, Lq <= Lk; got {q.dtype}, Dh={dh}, Lq={lq}, Lk={lk}, "
            f"backend {jax.default_backend()}, interpret={interpret}")
    if mosaic:
        block_q, block_k = mosaic_blocks(dh)
    else:
        default_q, default_k = default_blocks(dh, lq, lk)
        block_q, block_k = block_q or default_q, block_k or default_k
    masked = key_mask is not None or lq % block_q != 0 or lk % block_k != 0
    mosaic_bwd = mosaic and not masked
    if backward == "mosaic" and not mosaic_bwd:
        raise ValueError(
            "backward='mosaic' needs the Hopper forward, no key mask and whole tiles "
            f"(Lq % {mosaic_blocks(dh)[0]}, Lk % {mosaic_blocks(dh)[1]}); got Lq={lq}, "
            f"Lk={lk}, key_mask={key_mask is not None}, Hopper forward={mosaic}")
    cfg = FlashConfig(q_len=lq, k_len=lk, block_q=block_q, block_k=block_k, causal=causal,
                      head_norm=head_norm, eps=float(eps), interpret=interpret,
                      mosaic=mosaic, mosaic_backward=mosaic_bwd and backward != "portable",
                      masked=masked)
    args = pad_inputs(cfg, q, q_noise, k, v, lam, key_mask, norm_weight)
    return _fused(cfg, *args)[:, :lq]


def pad_inputs(cfg: FlashConfig, q, qn, k, v, lam, key_mask, w):
    """Pad to whole blocks; lam becomes (B, H, Lq) and the mask float (B, Lk)."""
    pad_q = ((0, 0), (0, cfg.q_pad - cfg.q_len), (0, 0), (0, 0))
    pad_k = ((0, 0), (0, cfg.k_pad - cfg.k_len), (0, 0), (0, 0))
    valid = jnp.ones(k.shape[:2], jnp.float32) if key_mask is None else key_mask.astype(
        jnp.float32)
    if w is None:
        w = jnp.ones((q.shape[-1],), q.dtype)
    return (jnp.pad(q, pad_q), jnp.pad(qn, pad_q), jnp.pad(k, pad_k), jnp.pad(v, pad_k),
            jnp.pad(jnp.swapaxes(lam, 1, 2), ((0, 0), (0, 0), (0, cfg.q_pad - cfg.q_len))),
            jnp.pad(valid, ((0, 0), (0, cfg.k_pad - cfg.k_len))), w)
