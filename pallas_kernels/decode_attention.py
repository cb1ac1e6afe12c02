"""Bounded decode attention in Pallas: a few query tokens against a fixed-size bank.

Decode reads a state of Lbuf = W + Me + Ms slots (384-768) per layer and per
sequence and does little arithmetic with it, so its speed is memory bandwidth.
One program owns one KV head of one sequence and one slice of the slots: all
query heads of the KV group and all query tokens (both differential streams)
are rows of the same tiles, so every K/V byte is read once. The slots are split
over programs (flash-decoding) when the batch alone would leave the GPU's
streaming multiprocessors idle; their partial softmaxes are merged afterwards,
together with the ``signal - lambda * noise`` and head-RMSNorm epilogue. When
the batch fills the GPU the slots are not split and each program applies the
epilogue itself, writing only the finished 16-bit rows. A key mask shared by
all query rows is read once per slot, not once per row.
Forward only: decode is inference.

On CPU the kernel runs in Pallas interpret mode (the tests); on GPU through the
portable Triton lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .diff_flash import NN, masked_scores, matmul
from .shared import MASKED_SCORE, head_rms_norm

MIN_ROWS = 16        # the tile matmul's smallest row count
TARGET_PROGRAMS = 264  # two per H100 streaming multiprocessor


def _split_kernel(q_ref, qn_ref, k_ref, v_ref, mask_ref, *rest, block_s: int, scale: float,
                  epilogue: bool, head_norm: bool, eps: float):
    """Both streams' online softmax over this program's slots. With ``epilogue``
    (the slots are not split) the program finishes the rows itself: softmax
    normalisation, ``signal - lambda * noise``, head RMSNorm, one 16-bit write;
    otherwise it writes float32 partials for :func:`_merge`."""
    queries = (q_ref[...], qn_ref[...])
    rows, dh = queries[0].shape
    init = tuple(x for _ in range(2) for x in (
        jnp.zeros((rows, dh), jnp.float32), jnp.full((rows,), MASKED_SCORE, jnp.float32),
        jnp.zeros((rows,), jnp.float32)))

    def body(i, carry):
        span = pl.ds(i * block_s, block_s)
        k, v = k_ref[span, :], v_ref[span, :]
        mask = mask_ref[:, span] > 0  # (1 or rows, block_s): shared by the rows or per row
        out = []
        for stream, query in enumerate(queries):
            acc, m_prev, l_prev = carry[3 * stream:3 * stream + 3]
            s = masked_scores(query, k, scale, mask)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
            corr = jnp.exp2(m_prev - m_next)
            p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
            out += [acc * corr[:, None] + matmul(p.astype(v.dtype), v, NN), m_next,
                    l_prev * corr + jnp.sum(p, axis=-1)]
        return tuple(out)

    n_blocks = k_ref.shape[0] // block_s
    acc1, m1, l1, acc2, m2, l2 = jax.lax.fori_loop(0, n_blocks, body, init)
    if not epilogue:
        acc1_ref, acc2_ref, m1_ref, m2_ref, l1_ref, l2_ref = rest
        acc1_ref[...], acc2_ref[...] = acc1, acc2
        m1_ref[...], m2_ref[...], l1_ref[...], l2_ref[...] = m1, m2, l1, l2
        return
    lam_ref, w_ref, out_ref = rest

    def normalised(acc, total):  # rows that saw nothing -> 0
        return jnp.where(total[:, None] > 0, acc / jnp.where(total > 0, total, 1.0)[:, None], 0.0)

    out = normalised(acc1, l1) - lam_ref[...][:, None] * normalised(acc2, l2)
    if head_norm:
        out = out * jax.lax.rsqrt(jnp.mean(out * out, axis=1, keepdims=True) + eps)
        out = out * w_ref[...][None, :]
    out_ref[...] = out.astype(out_ref.dtype)


def _merge(acc, m, denom):
    """Combine per-split partial softmaxes (axis 2); rows that saw nothing -> 0."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp2(m - m_all)
    total = jnp.sum(denom * weight, axis=2)
    out = jnp.sum(acc * weight[..., None], axis=2)
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


def decode_splits(batch: int, kv_heads: int, slots: int, block_s: int) -> int:
    """How many slot slices per (sequence, KV head): enough programs to fill the GPU."""
    blocks = -(-slots // block_s)
    want = -(-TARGET_PROGRAMS // (batch * kv_heads))
    return max(1, min(blocks, want))


def decode_attention(q: jax.Array, q_noise: jax.Array, k: jax.Array, v: jax.Array,
                     lam: jax.Array, key_mask: jax.Array | None = None, *,
                     norm_weight: jax.Array | None = None, head_norm: bool = True,
                     eps: float = 1e-6, block_s: int = 64, num_warps: int = 4,
                     num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
    """``HeadNorm(Attn(q) - lam * Attn(q_noise))`` of T query tokens over a bank -> (B, T, H, Dh).

    q, q_noise (B, T, H, Dh); k, v (B, S, Hkv, Dh) (the bank's slots); lam
    (B, T, H); key_mask (B, S) or (B, T, S) bool, True = may attend (the bank's
    allowed slots; a (B, T, S) mask also expresses causality among the T new
    tokens). Rows with no visible slot output zeros. ``block_s`` (slots per
    tile), ``num_warps`` and ``num_stages`` are the GPU tuning knobs
    (``benchmarks/tune_decode.py``; 64 slots, 4 warps and 3 stages were the best
    or within 3% of it at batch 256 on an H200). ``interpret`` defaults to True
    off GPU.
    """
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if q_noise.shape != q.shape or v.shape != k.shape or k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"shapes do not fit: q {q.shape}, q_noise {q_noise.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if h % hkv or dh & (dh - 1):
        raise ValueError(f"need num_heads % num_kv_heads == 0 and a power-of-two head_dim; "
                         f"got H={h}, Hkv={hkv}, Dh={dh}")
    if key_mask is not None and key_mask.shape not in ((b, s), (b, t, s)):
        raise ValueError(f"key_mask must be (B, S)={(b, s)} or (B, T, S)={(b, t, s)}, got "
                         f"{key_mask.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    g = h // hkv
    rows = t * g
    rows_pad = max(MIN_ROWS, pl.next_power_of_2(rows))
    splits = decode_splits(b, hkv, s, block_s)
    split_len = -(-s // (splits * block_s)) * block_s
    s_pad = splits * split_len
    epilogue = splits == 1  # each program owns whole rows: finish them in the kernel

    def as_rows(x):  # (B, T, H, ...) -> (B, Hkv, rows_pad, ...), row = token * G + head
        x = x.reshape(b, t, hkv, g, *x.shape[3:]).swapaxes(1, 2).reshape(b, hkv, rows,
                                                                         *x.shape[3:])
        return jnp.pad(x, [(0, 0), (0, 0), (0, rows_pad - rows)] + [(0, 0)] * (x.ndim - 3))

    # The key mask: one row shared by every query row (B, S), or per row (B, T, S).
    if key_mask is None or key_mask.ndim == 2:
        mask = (jnp.ones((b, s), bool) if key_mask is None else key_mask)[:, None, :]
    else:
        mask = jnp.repeat(key_mask, g, axis=1)                               # (B, rows, S)
        mask = jnp.pad(mask, ((0, 0), (0, rows_pad - rows), (0, 0)))
    mask_rows = mask.shape[1]
    mask = jnp.pad(mask.astype(jnp.float32), ((0, 0), (0, 0), (0, s_pad - s)))
    pad_s = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    # Grid (KV head, split, sequence), KV head fastest: the programs that run side by
    # side read the same slots of one sequence, whose KV heads sit next to each other
    # in memory (B, S, Hkv, Dh), so together they stream whole rows, not 256-byte
    # pieces of rows far apart.
    row_spec = pl.BlockSpec((None, None, rows_pad, dh), lambda j, c, b_: (b_, j, 0, 0))
    kv_spec = pl.BlockSpec((None, split_len, None, dh), lambda j, c, b_: (b_, c, j, 0))
    in_specs = [row_spec, row_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, mask_rows, split_len), lambda j, c, b_: (b_, 0, c))]
    args = [as_rows(q), as_rows(q_noise), jnp.pad(k, pad_s), jnp.pad(v, pad_s), mask]
    if epilogue:
        weight = jnp.ones((dh,)) if norm_weight is None else norm_weight
        in_specs += [pl.BlockSpec((None, None, rows_pad), lambda j, c, b_: (b_, j, 0)),
                     pl.BlockSpec((dh,), lambda j, c, b_: (0,))]
        args += [as_rows(lam.astype(jnp.float32)), weight.astype(jnp.float32)]
        out_specs = [row_spec]
        out_shape = [jax.ShapeDtypeStruct((b, hkv, rows_pad, dh), q.dtype)]
    else:
        acc_spec = pl.BlockSpec((None, None, None, rows_pad, dh),
                                lambda j, c, b_: (b_, j, c, 0, 0))
        stat_spec = pl.BlockSpec((None, None, None, rows_pad), lambda j, c, b_: (b_, j, c, 0))
        out_specs = [acc_spec] * 2 + [stat_spec] * 4
        out_shape = ([jax.ShapeDtypeStruct((b, hkv, splits, rows_pad, dh), jnp.float32)] * 2
                     + [jax.ShapeDtypeStruct((b, hkv, splits, rows_pad), jnp.float32)] * 4)
    outs = pl.pallas_call(
        functools.partial(_split_kernel, block_s=block_s, scale=dh ** -0.5, epilogue=epilogue,
                          head_norm=head_norm, eps=eps),
        grid=(hkv, splits, b), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="bounded_decode_attention",
    )(*args)

    def as_heads(x):  # (B, Hkv, rows_pad, Dh) -> (B, T, H, Dh)
        return x[:, :, :rows].reshape(b, hkv, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(
            b, t, h, dh)

    if epilogue:
        return as_heads(outs[0])
    acc1, acc2, m1, m2, l1, l2 = outs
    signal, noise = as_heads(_merge(acc1, m1, l1)), as_heads(_merge(acc2, m2, l2))
    out = signal - lam[..., None].astype(jnp.float32) * noise
    if head_norm:
        return head_rms_norm(out, norm_weight, eps).astype(q.dtype)
    return out.astype(q.dtype)
