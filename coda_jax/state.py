"""The bounded per-layer state: a pytree of arrays, every leaf with a leading batch axis.

Buffer layout along the slot axis (``Lbuf = W + Me + Ms``)::

    [0, W)            recent window, an exact ring buffer
    [W, W + Me)       exact landmark bank (value-routed, LRU)
    [W + Me, Lbuf)    summary bank (low-frequency-key-routed EMA prototypes)

Keys are stored with RoPE applied. Unlike the reference, positions, ring
index, fill and active bank sizes are per-row arrays, so the states of
different documents (at different positions) stack into one batch. The
reference's cached normalised routing targets are not stored: they always
equal the normalised bank contents, so they are recomputed where needed.

Axes: one layer's state has leaves ``(B, ...)``; a model's state stacks its
layers' states, ``(layers, B, ...)``. Every leaf has the same leading axes as
``pos``, so the batch axis is always ``pos.ndim - 1`` (:func:`batch_axis`), and
the row helpers here (:func:`concat_rows`, :func:`select_rows`,
:func:`where_rows`) work on both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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
    nonfinite: jax.Array       # (B,) bool: a NaN or Inf reached this row's buffer
    metrics: BankMetrics | None = None

    @property
    def batch_size(self) -> int:
        return self.pos.shape[-1]

    @property
    def num_layers(self) -> int | None:
        """Layers of a model's stacked state; None for one layer's state."""
        return self.pos.shape[0] if self.pos.ndim == 2 else None


def batch_axis(state: BankState) -> int:
    """The batch axis of every leaf: 0 for a layer's state, 1 for a model's stack."""
    if not isinstance(state, BankState):
        raise TypeError(f"expected a BankState, got {type(state).__name__}")
    return state.pos.ndim - 1


def concat_rows(*states: BankState) -> BankState:
    """Concatenate the rows of states of different documents (layer or model
    states alike) into one batch, in the order given."""
    if not states:
        raise ValueError("concat_rows needs at least one state")
    axes = {batch_axis(s) for s in states}
    layers = {s.num_layers for s in states}
    if len(axes) != 1 or len(layers) != 1:
        raise ValueError("concat_rows cannot mix layer states and model states, or models "
                         f"of different depths (layers: {sorted(map(str, layers))})")
    if len({jax.tree.structure(s) for s in states}) != 1:
        raise ValueError("concat_rows needs states of one structure (with or without metrics)")
    axis = axes.pop()
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=axis), *states)


# The name of earlier releases (it concatenates rows; it does not stack).
stack_states = concat_rows


def select_rows(state: BankState, rows) -> BankState:
    """The states of some batch rows: an index (kept as a batch of one), a
    slice, or an index array; layer or model states alike."""
    axis = batch_axis(state)
    if isinstance(rows, (int, np.integer)):
        batch = state.batch_size
        if not -batch <= rows < batch:
            raise IndexError(f"row {rows} is out of range for a batch of {batch}")
        rows = slice(rows % batch, rows % batch + 1)
    index = (slice(None),) * axis + (rows,)
    return jax.tree.map(lambda leaf: leaf[index], state)


def where_rows(take_new: jax.Array, new, old, *, axis: int | None = None):
    """Per batch row, ``new`` where ``take_new`` (B,) else ``old``.

    The batch axis is :func:`batch_axis` for states, else ``axis`` (default 0).
    """
    if axis is None:
        axis = batch_axis(new) if isinstance(new, BankState) else 0

    def pick(a, b):
        cond = take_new.reshape((1,) * axis + take_new.shape + (1,) * (a.ndim - axis - 1))
        return jnp.where(cond, a, b)
    return jax.tree.map(pick, new, old)
