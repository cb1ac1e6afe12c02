"""The parameters of one attention layer and the per-token maps built from them.

``AttentionCore`` owns q/k/v/o projections and, for differential attention,
the Givens angles ``theta``, the cancellation gate ``lambda_proj`` and the head
norm. Every attention layer derives from it, so parameter names match the
reference's (``q_proj``, ``theta``, ``head_norm.weight``...), and weight
conversion and the arithmetic live in one place.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention_math import differential_attention, resolve_implementation
from .config import AttentionConfig
from .primitives import (HeadwiseRMSNorm, apply_rope, givens_rotate, rope_inv_freq,
                         rope_tables)


def linear(cfg_in: int, cfg_out: int, *, bias: bool, param_dtype, rngs: nnx.Rngs,
            kernel_init=None, bias_init=None) -> nnx.Linear:
    # torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    bound = 1.0 / math.sqrt(cfg_in)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(cfg_in, cfg_out, use_bias=bias, param_dtype=param_dtype,
                      kernel_init=kernel_init or uniform, bias_init=bias_init or uniform,
                      rngs=rngs)


# Columns of joined input kernels come in multiples of this (aligned rows for the GPU's
# matrix units; the zero columns are under 1 MB a layer at the 7B shape).
JOIN_ALIGN = 128


def join_linears(linears: list[nnx.Linear], *, align: int = 1
                 ) -> tuple[jax.Array, jax.Array]:
    """The kernels of ``linears`` (same input) side by side (D, N) and their biases
    (N,) (zeros where one has none), N padded with zero columns to a multiple of
    ``align``: what :func:`joined_products` takes."""
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
    bias = jnp.concatenate([jnp.zeros((lin.out_features,), kernel.dtype) if lin.bias is None
                            else lin.bias[...].astype(kernel.dtype) for lin in linears])
    pad = -kernel.shape[1] % align
    return jnp.pad(kernel, ((0, 0), (0, pad))), jnp.pad(bias, (0, pad))


def joined_products(x: jax.Array, linears: list[nnx.Linear],
                    joined: tuple[jax.Array, jax.Array]) -> list[jax.Array]:
    """Each of ``linears`` applied to x (..., D), from one product with their
    :func:`join_linears` ``joined``."""
    kernel, bias = joined
    dtype = jnp.result_type(x, kernel)
    y = x.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)
    ends = np.cumsum([lin.out_features for lin in linears])
    return [y[..., end - lin.out_features:end] for lin, end in zip(linears, ends)]


class AttentionCore(nnx.Module):
    """Projections of one (differential) GQA layer; see :class:`AttentionConfig`."""

    def __init__(self, cfg: AttentionConfig, *, lambda_init_bias: float = -6.0,
                 theta_init: float = math.pi / 2, param_dtype=jnp.float32,
                 implementation: str | None = None, rngs: nnx.Rngs):
        resolve_implementation(implementation)  # validate early
        self.attn_cfg = cfg
        # How attention is computed (not part of the model's identity):
        # None = the Pallas kernels on GPU, XLA otherwise.
        self.implementation = implementation
        h, hkv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        self.q_proj = linear(d, h * dh, bias=cfg.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = linear(d, hkv * dh, bias=cfg.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.v_proj = linear(d, hkv * dh, bias=cfg.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = linear(h * dh, d, bias=cfg.o_bias, param_dtype=param_dtype, rngs=rngs)
        if cfg.differential:
            self.theta = nnx.Param(jnp.full((h, dh // 2), theta_init, param_dtype))
            self.lambda_proj = linear(d, h, bias=True, param_dtype=param_dtype, rngs=rngs,
                                       bias_init=nnx.initializers.constant(lambda_init_bias))
        else:
            self.theta = None
            self.lambda_proj = None
        if cfg.qk_norm:
            self.q_norm = HeadwiseRMSNorm(dh, eps=cfg.qk_norm_eps, param_dtype=param_dtype)
            self.k_norm = HeadwiseRMSNorm(dh, eps=cfg.qk_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        if cfg.head_norm_mode == "full":
            self.head_norm = HeadwiseRMSNorm(dh, eps=cfg.eps, param_dtype=param_dtype)
        else:
            self.head_norm = None

    @property
    def embed_dim(self) -> int:
        return self.attn_cfg.embed_dim

    @property
    def num_heads(self) -> int:
        return self.attn_cfg.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.attn_cfg.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.attn_cfg.head_dim

    @property
    def inv_freq(self):
        return rope_inv_freq(self.attn_cfg.head_dim, self.attn_cfg.rope_base,
                             self.attn_cfg.rope_scaling)

    def check_input(self, x: jax.Array, *, what: str = "x") -> jax.Array:
        """x, after a ``ValueError`` unless it is a floating (batch, length,
        embed_dim) array with rows."""
        if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
            raise ValueError(f"{what} must be an array of shape (batch, length, embed_dim="
                             f"{self.attn_cfg.embed_dim}), got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.attn_cfg.embed_dim:
            raise ValueError(
                f"{what} must have shape (batch, length, embed_dim={self.attn_cfg.embed_dim}), "
                f"got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{what} must hold floating-point activations, got {x.dtype} "
                             "(token ids go to a model's embedding, not to a layer)")
        if x.shape[0] == 0:
            raise ValueError(f"{what} has an empty batch (shape {tuple(x.shape)})")
        return x

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RoPE's (cos, sin) tables at integer ``positions`` (B, L), each (B, L, Dh/2):
        what :meth:`project_q` and :meth:`project_kv` take as ``rope``."""
        return rope_tables(positions, self.inv_freq)

    def project_q(self, x: jax.Array, positions: jax.Array,
                  rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """RoPE'd queries (B, L, H, Dh) for tokens at integer ``positions`` (B, L)
        (``rope``: their tables from :meth:`rope`, else computed here)."""
        return self.rope_queries(self.q_proj(x), positions, rope)

    def rope_queries(self, q: jax.Array, positions: jax.Array,
                     rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """:meth:`project_q` from ``q_proj``'s output (B, L, H * Dh)."""
        b, length, _ = q.shape
        q = q.reshape(b, length, self.attn_cfg.num_heads, self.attn_cfg.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, positions, self.inv_freq, interleaved=self.attn_cfg.rope_interleaved,
                          tables=rope)

    def project_kv(self, x: jax.Array, positions: jax.Array,
                   rope: tuple[jax.Array, jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """RoPE'd keys and raw values, each (B, L, Hkv, Dh) (``rope`` as for
        :meth:`project_q`)."""
        return self.rope_keys_values(self.k_proj(x), self.v_proj(x), positions, rope)

    def rope_keys_values(self, k: jax.Array, v: jax.Array, positions: jax.Array,
                         rope: tuple[jax.Array, jax.Array] | None = None
                         ) -> tuple[jax.Array, jax.Array]:
        """:meth:`project_kv` from ``k_proj``'s and ``v_proj``'s outputs (B, L, Hkv * Dh)."""
        b, length, _ = k.shape
        shape = (b, length, self.attn_cfg.num_kv_heads, self.attn_cfg.head_dim)
        k = k.reshape(shape)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = apply_rope(k, positions, self.inv_freq, interleaved=self.attn_cfg.rope_interleaved,
                       tables=rope)
        return k, v.reshape(shape)

    def input_linears(self) -> list[nnx.Linear]:
        """The projections of the layer's input, in the order :meth:`joined_inputs`
        joins them: q, k, v, then the cancellation gate's (differential attention)."""
        gate = [] if self.lambda_proj is None else [self.lambda_proj]
        return [self.q_proj, self.k_proj, self.v_proj, *gate]

    def joined_inputs(self) -> tuple[jax.Array, jax.Array]:
        """:func:`join_linears` of :meth:`input_linears`, padded to ``JOIN_ALIGN``
        columns. One product of a decode step's token with these reads each weight
        once as a matrix product, where separate products at batch 1 are vector-matrix
        products that XLA may run as slower multiply-reduce loops, one launch each.
        Joining copies the weights: ``generate`` joins them once, before its token loop."""
        return join_linears(self.input_linears(), align=JOIN_ALIGN)

    def input_products(self, x: jax.Array,
                       joined: tuple[jax.Array, jax.Array] | None = None) -> list[jax.Array]:
        """Each :meth:`input_linears` projection of x (B, L, D): from one product with
        ``joined`` (:meth:`joined_inputs`), else one product each."""
        linears = self.input_linears()
        if joined is None:
            return [lin(x) for lin in linears]
        return joined_products(x, linears, joined)

    def cancellation_gate(self, x: jax.Array) -> jax.Array | None:
        """lambda = sigmoid(lambda_proj(x)) per token and head (B, L, H), float32;
        None without differential attention."""
        if not self.attn_cfg.differential:
            return None
        return self.gate_of(self.lambda_proj(x))

    @staticmethod
    def gate_of(logits: jax.Array) -> jax.Array:
        """A gate from its projection's output: sigmoid in float32."""
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    def mix_heads(self, q: jax.Array, k: jax.Array, v: jax.Array, lam: jax.Array | None, *,
                  mask: jax.Array | None = None, bias: jax.Array | None = None,
                  causal: bool = False, key_mask: jax.Array | None = None,
                  fused: bool = True) -> jax.Array:
        """Per-head output ``HeadNorm(Attn(q) - lam * Attn(R_theta q))`` -> (B, L, H, Dh).

        ``fused=False`` (single-token decode, where a flash kernel has nothing
        to tile) takes XLA, or the Pallas decode kernel when ``"pallas"`` is chosen.
        """
        cfg = self.attn_cfg
        q_noise = givens_rotate(q, self.theta[...]) if cfg.differential else None
        implementation = resolve_implementation(self.implementation)
        return differential_attention(
            q, k, v, q_noise=q_noise, lam=lam, mask=mask, bias=bias, causal=causal,
            key_mask=key_mask,
            norm_weight=None if self.head_norm is None else self.head_norm.weight[...],
            head_norm=self.head_norm is not None, eps=cfg.eps,
            implementation=implementation if fused or implementation == "pallas" else "xla")

    def merge_heads(self, heads: jax.Array, dtype) -> jax.Array:
        """o_proj of per-head outputs (B, L, H, Dh) -> (B, L, D) in ``dtype``."""
        b, length = heads.shape[:2]
        y = self.o_proj(heads.reshape(b, length,
                                      self.attn_cfg.num_heads * self.attn_cfg.head_dim))
        return y.astype(dtype)

    def attend(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, *,
               mask: jax.Array | None = None, bias: jax.Array | None = None,
               causal: bool = False, key_mask: jax.Array | None = None,
               fused: bool = True) -> jax.Array:
        """Differential (or plain) attention of x's queries q over k/v, then o_proj -> (B, L, D)."""
        heads = self.mix_heads(q, k, v, self.cancellation_gate(x), mask=mask, bias=bias,
                               causal=causal, key_mask=key_mask, fused=fused)
        return self.merge_heads(heads, x.dtype)
