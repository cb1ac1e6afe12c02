"""Unbounded attention with an O(L) K/V cache: differential (CoDAGQA) and plain GQA.

Both return ``(y, (k, v))`` where k/v hold the whole sequence so far,
``(B, L_total, Hkv, Dh)`` with RoPE applied to k, ready to pass back as
``past_key_value``. Causal masking is aligned to the lower right, so a query
block after a past cache sees the whole past (the reference aligns it to the
upper left, which is wrong when a past is given; see the README).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import kv_cache
from .attention_math import sliding_window_mask
from .config import AttentionConfig, HeadNormMode
from .primitives import materialise
from .projections import AttentionCore

# The (k, v) pair a forward returns and takes back as its past; generation's
# preallocated cache is kv_cache.KVCache.
PastKV = tuple[jax.Array, jax.Array]


class _UnboundedAttention(AttentionCore):
    """Shared forward of the unbounded layers."""

    # Keys a query may see, counting itself (Mistral's sliding window); None = all.
    # Only BaselineGQA sets it. Not part of AttentionConfig, whose fields are
    # hashed into the fingerprint of saved states.
    sliding_window: int | None = None

    def __call__(self, x: jax.Array, *, is_causal: bool = True,
                 attention_mask: jax.Array | None = None,
                 past_key_value: PastKV | None = None) -> tuple[jax.Array, PastKV]:
        """x (B, L, D) -> (y (B, L, D), (k, v) including the past).

        ``attention_mask``: bool (True = attend) or additive float, broadcastable
        to (B, L, L_total); when given, ``is_causal`` is ignored (as in the reference).
        With a ``sliding_window`` W, a query at position p never sees keys at
        ``j <= p - W``, whatever the mask (positions count the past cache).
        """
        self.check_input(x)
        b, length, _ = x.shape
        offset = 0 if past_key_value is None else past_key_value[0].shape[1]
        positions = jnp.broadcast_to(offset + jnp.arange(length), (b, length))
        q = self.project_q(x, positions)
        k, v = self.project_kv(x, positions)
        if past_key_value is not None:
            k = jnp.concatenate([past_key_value[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past_key_value[1].astype(v.dtype), v], axis=1)
        mask = bias = None
        causal = False
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.dtype == jnp.bool_:
                mask = _to_3d(attention_mask)
            else:
                bias = _to_3d(attention_mask)
        elif is_causal:
            causal = True
        if self.sliding_window is not None:
            # An explicit mask: the Pallas kernels take no window, so such calls go
            # to cuDNN or XLA (differential_attention routes any general mask there).
            window = sliding_window_mask(length, k.shape[1], self.sliding_window,
                                         causal=causal)[None]
            mask = window if mask is None else mask & window
            causal = False
        return self.attend(x, q, k, v, mask=mask, bias=bias, causal=causal), (k, v)

    def attend_cache(self, x: jax.Array, positions: jax.Array, write_at: jax.Array,
                     k_all: jax.Array, v_all: jax.Array, layer: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, S, D) at ``positions`` (B, S) after a preallocated cache: -> (y (B, S,
        D), K and V with x's keys and values written).

        ``k_all``/``v_all`` are a model's stacked cache (layers, B, T, Hkv, Dh), of
        which this layer is ``layer``; x's keys and values go to ``write_at`` (B, S)
        (positions outside ``[0, T)`` are dropped: padding). Each query sees the
        cache up to its own position (and within ``sliding_window``).
        """
        q = self.project_q(x, positions)
        k, v = self.project_kv(x, positions)
        decoding = x.shape[1] == 1
        if decoding:  # keep XLA from fusing (recomputing) the projections into the write
            q, k, v = materialise(q, k, v)
        k_all = kv_cache.write(k_all, layer, write_at, k)
        v_all = kv_cache.write(v_all, layer, write_at, v)
        seen = kv_cache.visible_keys(positions, k_all.shape[2], self.sliding_window)
        keys, values = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
        if decoding:  # a key mask: what the decode kernels take
            y = self.attend(x, q, keys, values, key_mask=seen[:, 0], fused=False)
        else:
            y = self.attend(x, q, keys, values, mask=seen)
        return y, k_all, v_all


def _to_3d(mask: jax.Array) -> jax.Array:
    """Accept (Lq, Lk), (B, Lq, Lk) or torch-style (B, 1, Lq, Lk) masks."""
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError("per-head attention masks are not supported; pass (B, 1, Lq, Lk)")
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask[None]
    return mask


class CoDAGQA(_UnboundedAttention):
    """Unbounded differential attention: ``HeadNorm(Attn(q) - lambda * Attn(R_theta q))``.

    Keywords and defaults follow the reference's ``CoDAGQA``; ``head_dim``,
    ``qkv_bias``/``o_bias`` and ``differential`` are additions.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
                 rope_base: float = 10_000.0, lambda_init_bias: float = -6.0,
                 theta_init: float = math.pi / 2, eps: float = 1e-6,
                 head_norm_mode: HeadNormMode = "full", rope_interleaved: bool = True,
                 head_dim: int | None = None, differential: bool = True,
                 qkv_bias: bool = False, o_bias: bool = False,
                 rope_scaling: dict | None = None, qk_norm: bool = False,
                 qk_norm_eps: float = 1e-6, param_dtype=jnp.float32,
                 implementation: str | None = None, rngs: nnx.Rngs):
        cfg = AttentionConfig(embed_dim=embed_dim, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, head_dim=head_dim,
                              rope_base=rope_base, rope_interleaved=rope_interleaved,
                              rope_scaling=rope_scaling, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
                              head_norm_mode=head_norm_mode, eps=eps,
                              differential=differential, qkv_bias=qkv_bias, o_bias=o_bias)
        super().__init__(cfg, lambda_init_bias=lambda_init_bias, theta_init=theta_init,
                         param_dtype=param_dtype,
                         implementation=implementation, rngs=rngs)


class BaselineGQA(_UnboundedAttention):
    """Standard grouped-query attention with RoPE (one attention stream, no head norm).

    ``sliding_window`` W (Mistral's): the query at position i sees keys
    ``i - W < j <= i``; None = every earlier key.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
                 rope_base: float = 10_000.0, rope_interleaved: bool = True,
                 head_dim: int | None = None, qkv_bias: bool = False, o_bias: bool = False,
                 rope_scaling: dict | None = None, qk_norm: bool = False,
                 qk_norm_eps: float = 1e-6, sliding_window: int | None = None,
                 param_dtype=jnp.float32, implementation: str | None = None,
                 rngs: nnx.Rngs):
        if sliding_window is not None and (
                isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got "
                             f"{sliding_window!r}")
        cfg = AttentionConfig(embed_dim=embed_dim, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, head_dim=head_dim,
                              rope_base=rope_base, rope_interleaved=rope_interleaved,
                              rope_scaling=rope_scaling, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
                              head_norm_mode="identity", differential=False,
                              qkv_bias=qkv_bias, o_bias=o_bias)
        super().__init__(cfg, param_dtype=param_dtype, implementation=implementation,
                         rngs=rngs)
        self.sliding_window = sliding_window
