"""Small building blocks: RoPE (both pairings), the Givens pair rotation, head RMSNorm.

Layout convention everywhere in this package: tokens before heads,
``(B, L, H, Dh)``, as ``jax.nn.dot_product_attention`` and the Pallas kernels use.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.shared import head_rms_norm  # the kernels' epilogue, shared


# HuggingFace rope types rope_inv_freq implements, and the parameters each needs.
ROPE_TYPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_TYPE_PARAMETERS)


def check_rope_scaling(scaling: Any) -> str:
    """The rope type of a HuggingFace ``rope_scaling``/``rope_parameters`` (a dict or
    its items); ``ValueError`` naming it unless :func:`rope_inv_freq` implements
    it with the parameters it needs."""
    params = dict(scaling or ())
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPE_PARAMETERS:
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported types: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    missing = [name for name in ROPE_TYPE_PARAMETERS[kind] if params.get(name) is None]
    if missing:
        raise ValueError(f"RoPE scaling type {kind!r} needs {', '.join(missing)}; "
                         f"got {sorted(params)}")
    return kind


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, base: float,
                  scaling: tuple[tuple[str, Any], ...] | None = None) -> np.ndarray:
    """Inverse frequencies ``base ** (-2i / head_dim)`` of the rotary pairs, float32.

    ``scaling`` is a HuggingFace ``rope_scaling``/``rope_parameters`` dict as a
    tuple of items; the ``default``, ``linear`` and ``llama3`` types are known.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)
    params = dict(scaling or ())
    kind = check_rope_scaling(params)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        context = params["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) & ~(wavelen > context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise AssertionError(f"check_rope_scaling accepted {kind!r}")  # unreachable


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for integer positions of any shape -> ``positions.shape + (Dh/2,)``.

    Angles are formed in float32 (as the reference and transformers do).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate each feature pair of ``x`` (..., Dh) by the angle whose cos/sin are given.

    ``cos``/``sin`` broadcast against ``x[..., : Dh // 2]``. Pairs are
    ``(2i, 2i+1)`` when ``interleaved`` (the reference's default) and
    ``(i, i + Dh/2)`` otherwise (Llama/Qwen convention). Computed in the wider
    of x's dtype and float32, returned in x's dtype.
    """
    dtype = x.dtype
    half = x.shape[-1] // 2
    # (a, b) -> (a cos - b sin, b cos + a sin) as x * cos + partner * sin, with
    # partner = (-b, a) a flip of the pair axis: elementwise, so XLA makes one
    # loop fusion; joining the halves with a stack or concatenate instead ran at
    # half the memory bandwidth on an H100.
    pair_axis = -1 if interleaved else -2
    pairs = x.astype(jnp.promote_types(dtype, jnp.float32)).reshape(
        *x.shape[:-1], *((half, 2) if interleaved else (2, half)))
    sign = jnp.array([-1.0, 1.0], pairs.dtype).reshape((2,) if interleaved else (2, 1))
    cos, sin = jnp.expand_dims(cos, pair_axis), jnp.expand_dims(sin, pair_axis)
    out = pairs * cos + jnp.flip(pairs, pair_axis) * sign * sin
    return out.reshape(x.shape).astype(dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, *,
               interleaved: bool, tables: tuple[jax.Array, jax.Array] | None = None
               ) -> jax.Array:
    """RoPE for ``x`` (B, L, H, Dh) at integer ``positions`` (B, L) or (L,);
    ``tables``: their :func:`rope_tables`, when the caller has them already."""
    cos, sin = rope_tables(positions, inv_freq) if tables is None else tables
    return rotate_pairs(x, cos[..., None, :], sin[..., None, :], interleaved=interleaved)


def givens_rotate(q: jax.Array, theta: jax.Array) -> jax.Array:
    """The noise query: rotate every interleaved pair of head h by ``theta[h, i]``.

    q: (..., H, Dh); theta: (H, Dh/2). The reference always pairs (2i, 2i+1)
    here, whatever the RoPE pairing, and so do we.
    """
    theta = theta.astype(jnp.float32)
    return rotate_pairs(q, jnp.cos(theta), jnp.sin(theta), interleaved=True)


def einsum_f32(spec: str, *operands: jax.Array) -> jax.Array:
    """einsum accumulating in float32; low-precision operands stay low-precision
    on accelerators, and are widened on CPU, whose dot has no bf16 x bf16 -> f32."""
    if jax.default_backend() == "cpu":
        operands = tuple(o.astype(jnp.promote_types(o.dtype, jnp.float32)) for o in operands)
    return jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)


def materialise(*values: jax.Array) -> tuple[jax.Array, ...]:
    """Compute small decisions (routing indices, gates) once, before the writes using them.

    Without this barrier XLA may fuse a whole producer chain (a projection
    rewritten as multiply-reduce, a normalise-dot-argmax) into the buffer writes
    that consume it and recompute it for every written element.
    """
    return jax.lax.optimization_barrier(values)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / max(||x||, eps)`` over the last axis (``torch.nn.functional.normalize``)."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    return xf / jnp.maximum(norm, eps)


class HeadwiseRMSNorm(nnx.Module):
    """RMSNorm across head_dim, applied per (batch, token, head), with a learned scale."""

    def __init__(self, head_dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((head_dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return head_rms_norm(x, self.weight[...], self.eps)
