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


def _grouped_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """(B, Lq, Hkv, S, Dh) x (B, Lk, Hkv, Dh) -> float32 logits (B, Hkv, S, Lq, Lk)."""
    scale = q.shape[-1] ** -0.5
    logits = einsum_f32("bqhsd,bkhd->bhsqk", q, k)
    return logits * scale


Implementation = Literal["xla", "cudnn", "pallas"]
DECODE_MAX_TOKENS = 16  # up to this many queries over a bank: the decode kernel


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
    finite under ``jax.grad``.
    """
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, mask, bias)
    logits = _grouped_scores(q, k)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)[:, None, None]
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, MASKED_SCORE)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(jnp.any(mask, axis=-1)[:, None, None, :, None], probs, 0.0)
    out = einsum_f32("bhsqk,bkhd->bqhsd", probs.astype(v.dtype), v)
    return out.astype(v.dtype)


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
    out = grouped_attention(stacked, k, v, mask=mask, bias=bias, implementation=implementation)
    signal = out[:, :, :, :g].reshape(b, lq, h, dh)
    if q_noise is not None:
        noise = out[:, :, :, g:].reshape(b, lq, h, dh)
        signal = signal - lam[..., None].astype(signal.dtype) * noise
    if head_norm:
        signal = head_rms_norm(signal, norm_weight, eps)
    return signal
