"""Fresh random inputs of differential attention and the error measure, shared by the
kernel and layer tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key: random test inputs drawn on the host
    need no compiled program (on the CPU, compiling ``jax.random`` for each new
    shape cost more than the kernels under test)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def random_attention_inputs(key: jax.Array, *, batch: int, q_len: int, k_len: int,
                            group: int, head_dim: int, dtype):
    """q, q_noise (B, Lq, H, Dh), k, v (B, Lk, Hkv, Dh), lambda (B, Lq, H) in (0, 1)
    and a norm weight near 1 (Dh,); Hkv is 1 for group 8, else 2. Standard normal
    draws of ``host_rng(key)``, rounded to ``dtype``."""
    rng = host_rng(key)
    hkv = 1 if group == 8 else 2
    h, dtype = hkv * group, jnp.dtype(dtype)

    def normal(*shape):
        return rng.standard_normal(shape, np.float32)

    def to(x):
        return jnp.asarray(x.astype(dtype))

    q = to(normal(batch, q_len, h, head_dim))
    qn = to(normal(batch, q_len, h, head_dim))
    k = to(normal(batch, k_len, hkv, head_dim))
    v = to(normal(batch, k_len, hkv, head_dim))
    lam = to(1 / (1 + np.exp(-normal(batch, q_len, h))))
    w = to(1 + 0.3 * normal(head_dim))
    return q, qn, k, v, lam, w


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, with ||b|| floored at an RMS of 1e-3: a gradient that is
    exactly zero (one visible key: softmax is constant) compares on that scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-3 * np.sqrt(b.size)))
