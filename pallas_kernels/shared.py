"""What the kernels and the library's XLA paths compute the same way.

``MASKED_SCORE`` is the one score given to a masked key everywhere. Finite, so
a tile (or a row) whose keys are all masked keeps a finite running max (no
-inf - -inf); and moderate, because in the Hopper kernel exp2(s * c - m)
contracts to an FMA whose rounding residual scales with |s * c|: at -1e30 it
reached +1e21 and exp2 overflowed to inf (H100, head_dim 64). At -1e6 the
residual is below 0.01, and any real score still outweighs a masked one by
2^(1e5). Routing scores (cosines in [-1, 1]) are masked with it too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_SCORE = -1e6


def head_rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis, in float32, then scaled by ``weight``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        xf = xf * weight.astype(jnp.float32)
    return xf.astype(x.dtype)
