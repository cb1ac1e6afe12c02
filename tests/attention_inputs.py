"""Fresh random inputs of differential attention and the error measure, shared by the
kernel and layer tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_attention_inputs(key: jax.Array, *, batch: int, q_len: int, k_len: int,
                            group: int, head_dim: int, dtype):
    """q, q_noise (B, Lq, H, Dh), k, v (B, Lk, Hkv, Dh), lambda (B, Lq, H) in (0, 1)
    and a norm weight near 1 (Dh,); Hkv is 1 for group 8, else 2."""
    keys = jax.random.split(key, 6)
    hkv = 1 if group == 8 else 2
    h, dtype = hkv * group, jnp.dtype(dtype)
    q = jax.random.normal(keys[0], (batch, q_len, h, head_dim), dtype)
    qn = jax.random.normal(keys[1], (batch, q_len, h, head_dim), dtype)
    k = jax.random.normal(keys[2], (batch, k_len, hkv, head_dim), dtype)
    v = jax.random.normal(keys[3], (batch, k_len, hkv, head_dim), dtype)
    lam = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, q_len, h))).astype(dtype)
    w = (1 + 0.3 * jax.random.normal(keys[5], (head_dim,))).astype(dtype)
    return q, qn, k, v, lam, w


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, with ||b|| floored at an RMS of 1e-3: a gradient that is
    exactly zero (one visible key: softmax is constant) compares on that scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-3 * np.sqrt(b.size)))
