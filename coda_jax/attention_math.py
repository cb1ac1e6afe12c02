"""Pure-jnp (differential) grouped-query attention: the numerical reference.

Every attention variant in the package funnels into :func:`differential_attention`;
GPU kernels (``pallas_kernels``) are checked against it.

Shapes: q (B, Lq, H, Dh); k, v (B, Lk, Hkv, Dh); lam (B, Lq, H);
mask broadcastable to (B, Lq, Lk), True = may attend. K/V are never
repeated per query head: queries are grouped as (Hkv, G) instead.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.shared import MASKED_SCORE

from .primitives import einsum_f32, head_rms_norm


def causal_mask(q_len: int, k_len: int) -> jax.Array:
    """Lower-right aligned causal mask (Lq, Lk): query i sees keys ``<= i + Lk - Lq``."""
    q_idx = jnp.arange(q_len)[:, None] + (k_len - q_len)
    return jnp.arange(k_len)[None, :] <= q_idx


def sliding_window_mask(q_len: int, k_len: int, window: int, *, causal: bool = True
                        ) -> jax.Array:
    """Lower-right aligned sliding window (Lq, Lk): the query at position
    ``p = i + Lk - Lq`` sees keys ``p - window < j`` (and ``j <= p`` when ``causal``),
    as transformers' Mistral does.

    Built here rather than with ``jax.nn.dot_product_attention``'s
    ``local_window_size``, whose XLA mask is aligned to the upper left (wrong after
    a past cache: a decoded query would see only the first keys).
    """
    if window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
    k_pos = jnp.arange(k_len)[None, :]
    visible = k_pos > q_pos - window
    return visible & (k_pos <= q_pos) if causal else visible


Implementation = Literal["xla", "cudnn", "pallas"]
DECODE_MAX_TOKENS = 16  # up to this many queries over a bank: the decode kernel
# Causal XLA attention runs this many queries at a time over the keys they can
# see (the masked upper triangle beyond them is not computed); on a 2-core CPU
# prefill of 4 x 1024 queries over 1408 keys ran 2.1x faster than in one piece.
CAUSAL_QUERY_CHUNK = 256
QUERY_TILE = 64  # queries per step of the CPU's attention loop (tiled_attention)
# A CPU tile attends to the keys some query of it may see, gathered first and taken
# this many at a time: a bounded block's empty bank slots and the masked part of a
# causal block are not computed.
KEY_CHUNK = 256


def resolve_implementation(requested: str | None) -> Implementation:
    """``None`` picks ``"pallas"`` on GPU and ``"xla"`` elsewhere.

    ``"pallas"`` runs ``pallas_kernels`` (the fused flash kernel; the decode
    kernel for a few queries over a bank); its measured speed against cuDNN is in
    the README and ``benchmarks/results``. Calls it cannot take (a general mask
    or bias, a non-power-of-two head_dim) go to :func:`library_attention`.
    """
    if requested not in (None, "xla", "cudnn", "pallas"):
        raise ValueError("implementation must be 'xla', 'cudnn', 'pallas' or None, got "
                         f"{requested!r}")
    if requested is not None:
        return requested
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def library_attention(dtype) -> Implementation:
    """The best non-Pallas path: cuDNN's fused attention on GPU for 16-bit inputs, else XLA."""
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and low_precision else "xla"


def _cudnn_attention(q, k, v, mask, bias):
    """cuDNN flash attention of grouped queries; masks become an additive bias."""
    b, lq, hkv, s, dh = q.shape
    total = None
    if bias is not None:
        total = bias.astype(jnp.float32)
    if mask is not None:
        masked = jnp.where(mask, 0.0, MASKED_SCORE)
        total = masked if total is None else total + masked
    if total is not None:
        total = jnp.broadcast_to(total, (total.shape[0], lq, k.shape[1]))[:, None].astype(q.dtype)
    out = jax.nn.dot_product_attention(q.reshape(b, lq, hkv * s, dh), k, v, bias=total,
                                       implementation="cudnn")
    return out.reshape(b, lq, hkv, s, dh)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array | None = None,
                      bias: jax.Array | None = None,
                      implementation: Implementation = "xla") -> jax.Array:
    """Softmax attention of grouped queries q (B, Lq, Hkv, S, Dh) -> (B, Lq, Hkv, S, Dh).

    ``mask`` (bool, True = attend) and ``bias`` (additive) broadcast to (B, Lq, Lk).
    A row with no visible key outputs zeros (not NaN), so padded queries stay
    finite under ``jax.grad``. On a CPU, many queries run ``QUERY_TILE`` at a
    time (see :func:`tiled_attention`).
    """
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, mask, bias)
    lq = q.shape[1]
    if jax.default_backend() == "cpu" and lq > QUERY_TILE and lq % QUERY_TILE == 0:
        return tiled_attention(q, k, v, mask, bias)
    return softmax_attention(q, k, v, mask, bias)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      bias: jax.Array | None) -> jax.Array:
    """:func:`grouped_attention` in one piece, in XLA."""
    out = heads_first_attention(q.transpose(0, 2, 1, 3, 4), k.transpose(0, 2, 1, 3),
                                v.transpose(0, 2, 1, 3), mask, bias)
    return out.transpose(0, 2, 1, 3, 4)


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          bias: jax.Array | None) -> jax.Array:
    """Softmax attention with heads before tokens: q (B, Hkv, Lq, S, Dh), k and v
    (B, Hkv, Lk, Dh) -> (B, Hkv, Lq, S, Dh); ``mask`` and ``bias`` broadcast to
    (B, Lq, Lk). Both products are plain batched matmuls (no operand or score
    is transposed)."""
    logits = einsum_f32("bhqsd,bhkd->bhqsk", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)[:, None, :, None]
    if mask is not None:
        logits = jnp.where(mask[:, None, :, None], logits, MASKED_SCORE)
    # Softmax with the normalisation after the value product (as flash
    # attention does): the (Lq, Lk) weights are written once, not rescaled in
    # a second pass over them, which on a CPU costs as much as the matmuls.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)                  # (B, Hkv, Lq, S, 1)
    out = einsum_f32("bhqsk,bhkd->bhqsd", weights.astype(v.dtype), v) / total
    if mask is not None:
        seen = jnp.broadcast_to(jnp.any(mask, axis=-1), (out.shape[0], out.shape[2]))
        out = jnp.where(seen[:, None, :, None, None], out, 0.0)
    return out.astype(v.dtype)


def _tile_of(a: jax.Array | None, row: jax.Array, tile: jax.Array) -> jax.Array | None:
    """Query tile ``tile`` of batch row ``row`` of a mask or bias broadcasting to
    (B, Lq, Lk) -> (1, QUERY_TILE or 1, Lk)."""
    if a is None:
        return None
    a = jax.lax.dynamic_slice_in_dim(a, row if a.shape[0] > 1 else 0, 1, axis=0)
    if a.shape[1] > 1:
        a = jax.lax.dynamic_slice_in_dim(a, tile * QUERY_TILE, QUERY_TILE, axis=1)
    return a


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    bias: jax.Array | None) -> jax.Array:
    """:func:`softmax_attention` of one batch row's ``QUERY_TILE`` queries per
    step of a loop (Lq a multiple of it). A step's scores stay small enough
    for the CPU's caches; in one piece they are hundreds of MB, written and
    read back from memory several times (4 x 1024 differential queries over
    1408 keys, SmolLM2's heads: 2x faster on 2 cores)."""
    b, lq, hkv, s, dh = q.shape
    tiles = lq // QUERY_TILE
    q_tiles = q.reshape(b * tiles, QUERY_TILE, hkv, s, dh).transpose(0, 2, 1, 3, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)      # (B, Hkv, Lk, Dh)

    def one(inputs):
        index, q_tile = inputs
        row, tile = index // tiles, index % tiles
        row_k = jax.lax.dynamic_slice_in_dim(k, row, 1, axis=0)
        row_v = jax.lax.dynamic_slice_in_dim(v, row, 1, axis=0)
        return visible_keys_attention(q_tile[None], row_k, row_v, _tile_of(mask, row, tile),
                                      _tile_of(bias, row, tile))[0]

    out = jax.lax.map(one, (jnp.arange(b * tiles), q_tiles))   # (B * tiles, Hkv, T, S, Dh)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)


def visible_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                           bias: jax.Array | None) -> jax.Array:
    """:func:`heads_first_attention` of one batch row (q (1, Hkv, Lq, S, Dh), k and v
    (1, Hkv, Lk, Dh), ``mask`` and ``bias`` (1, Lq or 1, Lk)) over only the keys
    some query may see: they are gathered in key order and attended in one piece
    of the next multiple of ``KEY_CHUNK`` keys (one branch per size). A masked key
    weighs exactly zero in the softmax, so leaving it out changes only the
    summation order; with every key visible the keys are not gathered."""
    if mask is None:
        return heads_first_attention(q, k, v, mask, bias)
    keys = k.shape[2]
    seen = jnp.any(mask, axis=(0, 1))                                   # (Lk,)
    sizes = list(range(KEY_CHUNK, keys, KEY_CHUNK)) + [keys]

    def attend_first(size):
        if size == keys:
            return lambda: heads_first_attention(q, k, v, mask, bias)

        def gathered():  # sorted only in a branch that gathers (a tile seeing all does not)
            index = jnp.argsort(jnp.where(seen, 0, 1).astype(jnp.int8), stable=True)[:size]
            return heads_first_attention(q, k[:, :, index], v[:, :, index], mask[..., index],
                                         None if bias is None else bias[..., index])
        return gathered

    which = jnp.minimum((jnp.sum(seen) + KEY_CHUNK - 1) // KEY_CHUNK, len(sizes)) - 1
    return jax.lax.switch(jnp.maximum(which, 0), [attend_first(size) for size in sizes])


def _query_rows(a: jax.Array | None, start: int, stop: int, keys: int) -> jax.Array | None:
    """Rows [start, stop) and the first ``keys`` keys of a mask or bias that
    broadcasts to (B, Lq, Lk) (a query axis of 1 broadcasts over all rows)."""
    if a is None:
        return None
    rows = slice(start, stop) if a.shape[1] > 1 else slice(None)
    return a[:, rows, :keys]


def _causal_chunks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   bias: jax.Array | None) -> jax.Array:
    """:func:`grouped_attention` of lower-right causal queries q (B, Lq, Hkv, S, Dh),
    ``CAUSAL_QUERY_CHUNK`` at a time, each over the keys up to its last query
    (``mask`` already holds the causal mask). Keys beyond a query weigh exactly
    zero in its softmax, so leaving them out changes only the summation order."""
    lq, lk = q.shape[1], k.shape[1]
    outs = []
    for start in range(0, lq, CAUSAL_QUERY_CHUNK):
        stop = min(start + CAUSAL_QUERY_CHUNK, lq)
        keys = min(lk, max(1, lk - lq + stop))
        outs.append(grouped_attention(q[:, start:stop], k[:, :keys], v[:, :keys],
                                      mask=_query_rows(mask, start, stop, keys),
                                      bias=_query_rows(bias, start, stop, keys)))
    return jnp.concatenate(outs, axis=1)


def differential_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           q_noise: jax.Array | None = None,
                           lam: jax.Array | None = None,
                           mask: jax.Array | None = None,
                           bias: jax.Array | None = None,
                           norm_weight: jax.Array | None = None,
                           head_norm: bool = True,
                           eps: float = 1e-6,
                           causal: bool = False,
                           key_mask: jax.Array | None = None,
                           implementation: Implementation = "xla") -> jax.Array:
    """``HeadNorm(Attn(q, K, V) - lam * Attn(q_noise, K, V))`` -> (B, Lq, H, Dh).

    With ``q_noise=None`` only the signal stream is computed (standard GQA
    attention, optionally head-normed). Both streams share one pass over K/V:
    they are stacked as extra query rows of each KV group. Visibility is the
    conjunction of ``causal`` (lower-right aligned), ``key_mask`` (B, Lk) and a
    general ``mask``; the Pallas kernels take the first two only (other calls
    fall back to XLA when decode-shaped, else to :func:`library_attention`).
    """
    b, lq, h, dh = q.shape
    decode_shaped = lq <= DECODE_MAX_TOKENS and not causal  # a few queries over a bank
    if (implementation == "pallas" and q_noise is not None and mask is None and bias is None
            and dh & (dh - 1) == 0):
        if decode_shaped:
            from pallas_kernels.decode_attention import decode_attention

            return decode_attention(q, q_noise, k, v, lam, key_mask, norm_weight=norm_weight,
                                    head_norm=head_norm, eps=eps)
        from pallas_kernels.diff_flash import diff_flash_attention

        return diff_flash_attention(q, q_noise, k, v, lam, key_mask=key_mask,
                                    norm_weight=norm_weight, head_norm=head_norm, eps=eps,
                                    causal=causal)
    if implementation == "pallas":  # a flash library has nothing to tile in decode
        implementation = "xla" if decode_shaped else library_attention(q.dtype)
    if causal:
        mask = causal_mask(lq, k.shape[1])[None] if mask is None else (
            mask & causal_mask(lq, k.shape[1])[None])
    if key_mask is not None:
        mask = key_mask[:, None, :] if mask is None else mask & key_mask[:, None, :]
    hkv = k.shape[2]
    g = h // hkv
    streams = [q] if q_noise is None else [q, q_noise]
    stacked = jnp.concatenate([s.reshape(b, lq, hkv, g, dh) for s in streams], axis=3)
    if causal and implementation == "xla" and lq > CAUSAL_QUERY_CHUNK:
        out = _causal_chunks(stacked, k, v, mask, bias)
    else:
        out = grouped_attention(stacked, k, v, mask=mask, bias=bias,
                                implementation=implementation)
    signal = out[:, :, :, :g].reshape(b, lq, h, dh)
    if q_noise is not None:
        noise = out[:, :, :, g:].reshape(b, lq, h, dh)
        signal = signal - lam[..., None].astype(signal.dtype) * noise
    if head_norm:
        signal = head_rms_norm(signal, norm_weight, eps)
    return signal
