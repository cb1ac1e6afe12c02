"""The bounded per-layer state: a pytree of arrays, every leaf with a leading batch axis.

Buffer layout along the slot axis (``Lbuf = W + Me + Ms``)::

    [0, W)            recent window, an exact ring buffer
    [W, W + Me)       exact landmark bank (value-routed, LRU)
    [W + Me, Lbuf)    summary bank (low-frequency-key-routed EMA prototypes)

Keys are stored with RoPE applied. Unlike the reference, positions, ring
index, fill and active bank sizes are per-row arrays, so the states of
different documents (at different positions) stack into one batch with
``jax.tree.map(lambda *a: jnp.concatenate(a), s1, s2)``. The reference's
cached normalised routing targets are not stored: they always equal the
normalised bank contents, so they are recomputed where needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

POSITION_DTYPE = jnp.int32


@struct.dataclass
class BankMetrics:
    """Opt-in activity counters, per batch row (int32)."""

    total_evictions: jax.Array
    tokens_gated_out: jax.Array
    exact_hits: jax.Array
    exact_inserts: jax.Array
    exact_overwrites: jax.Array
    exact_frustrated: jax.Array
    summary_updates: jax.Array
    summary_inserts: jax.Array
    summary_frustrated: jax.Array
    expansions_exact: jax.Array
    expansions_summary: jax.Array

    @classmethod
    def zeros(cls, batch_size: int) -> "BankMetrics":
        names = [f.name for f in cls.__dataclass_fields__.values()]
        return cls(**{n: jnp.zeros((batch_size,), jnp.int32) for n in names})

    def add(self, **increments: jax.Array) -> "BankMetrics":
        """Return a copy with the named counters increased."""
        return self.replace(**{k: getattr(self, k) + v.astype(jnp.int32)
                               for k, v in increments.items()})


@struct.dataclass
class BankState:
    """State of one bounded layer (or, with a leading layer axis, of a layer stack)."""

    k_buf: jax.Array           # (B, Lbuf, Hkv, Dh), RoPE applied
    v_buf: jax.Array           # (B, Lbuf, Hkv, Dh)
    allowed: jax.Array         # (B, Lbuf) bool: slot holds a real entry
    g_recent: jax.Array        # (B, W) float32 write gate of each ring slot
    recent_idx: jax.Array      # (B,) next ring slot to evict once the ring is full
    recent_filled: jax.Array   # (B,) tokens in the ring, <= W
    mem_last_exact: jax.Array  # (B, Me) LRU stamp (position of last touch) per exact slot
    pos: jax.Array             # (B,) absolute position of the next token
    active_exact: jax.Array    # (B,) exact slots in use by routing (dynamic expansion)
    active_summary: jax.Array  # (B,) summary slots in use by routing
    metrics: BankMetrics | None = None

    @property
    def batch_size(self) -> int:
        return self.pos.shape[-1]


def stack_states(*states: BankState) -> BankState:
    """Concatenate states of different documents along the batch axis."""
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *states)


def select_rows(state: BankState, rows) -> BankState:
    """The states of some batch rows (an index, slice or index array)."""
    return jax.tree.map(lambda leaf: leaf[rows], state)


def where_rows(take_new: jax.Array, new: BankState, old: BankState) -> BankState:
    """Per batch row, ``new`` where ``take_new`` (B,) else ``old``."""
    def pick(a, b):
        cond = take_new.reshape(take_new.shape + (1,) * (a.ndim - 1))
        return jnp.where(cond, a, b)
    return jax.tree.map(pick, new, old)
