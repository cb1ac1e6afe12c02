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
:func:`where_rows`) work on both. They work on any state that names the batch
axis of each of its leaves with a ``row_axes()`` method, such as the unbounded
models' ``kv_cache.KVCache``.
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
    mem_last_exact: jax.Array  # (B, Me) per exact slot: LRU stamp (position of last touch),
    #                            or its token's gate key under exact_eviction="gate"
    pos: jax.Array             # (B,) absolute position of the next token
    active_exact: jax.Array    # (B,) exact slots in use by routing (dynamic expansion)
    active_summary: jax.Array  # (B,) summary slots in use by routing
    nonfinite: jax.Array       # (B,) bool: a NaN or Inf reached this row's buffer
    metrics: BankMetrics | None = None
    # (B, Me) int32: the position of the token each exact slot holds; kept only under
    # BankConfig.max_key_distance, which reads it (None otherwise).
    exact_pos: jax.Array | None = None

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


def tree_bytes(tree) -> int:
    """Bytes of every leaf of ``tree``: arrays, or shapes (``jax.ShapeDtypeStruct``,
    ``jax.eval_shape``'s) of a state or of weights."""
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def row_axes(state):
    """The batch axis of each leaf of ``state``, as a tree of ints of its structure:
    :func:`batch_axis` for every leaf of a ``BankState``, else the state's own
    ``row_axes()`` (a ``KVCache``: keys and values (layers, B, ...), lengths (B,))."""
    if isinstance(state, BankState):
        axis = batch_axis(state)
        return jax.tree.map(lambda _: axis, state)
    own = getattr(state, "row_axes", None)
    if not callable(own):
        raise TypeError(f"expected a BankState or a KVCache, got {type(state).__name__}")
    return own()


def concat_rows(*states):
    """Concatenate the rows of states of different documents (layer or model
    states alike, or KV caches of one max_length) into one batch, in the order given."""
    if not states:
        raise ValueError("concat_rows needs at least one state")
    if not all(isinstance(s, BankState) for s in states):
        return _concat_other(states)
    axes = {batch_axis(s) for s in states}
    layers = {s.num_layers for s in states}
    if len(axes) != 1 or len(layers) != 1:
        raise ValueError("concat_rows cannot mix layer states and model states, or models "
                         f"of different depths (layers: {sorted(map(str, layers))})")
    if len({jax.tree.structure(s) for s in states}) != 1:
        raise ValueError("concat_rows needs states of one structure (with or without metrics)")
    axis = axes.pop()
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=axis), *states)


def _concat_other(states):
    """:func:`concat_rows` of states that are not ``BankState`` (KV caches)."""
    kinds = {type(s).__name__ for s in states}
    if len(kinds) != 1:
        raise ValueError(f"concat_rows cannot mix kinds of state ({', '.join(sorted(kinds))})")
    if len({jax.tree.structure(s) for s in states}) != 1:
        raise ValueError("concat_rows needs states of one structure")
    axes = row_axes(states[0])
    for ax, *leaves in zip(jax.tree.leaves(axes), *map(jax.tree.leaves, states)):
        others = {leaf.shape[:ax] + leaf.shape[ax + 1:] for leaf in leaves}
        if len(others) != 1 or len({leaf.dtype for leaf in leaves}) != 1:
            shapes = sorted({(tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves})
            raise ValueError("concat_rows needs states that differ only in their rows (one "
                             f"depth, max_length and dtype); got leaves {shapes}")
    return jax.tree.map(lambda ax, *leaves: jnp.concatenate(leaves, axis=ax), axes, *states)


def widen_buffers(state):
    """For a decode loop: on a CPU, (a bounded ``state`` whose K/V buffers are a
    16-bit float, with them in float32; that dtype); else (``state``, None).

    XLA's CPU backend writes a slot into a 16-bit float buffer by converting the
    whole buffer to float32 and back; a loop over a widened state writes in place.
    Its steps take the dtype as ``storage_dtype`` and round what they write to it,
    so :func:`narrow_buffers` gives back what the loop on ``state`` itself would.
    """
    dtype = state.k_buf.dtype if isinstance(state, BankState) else None
    if (dtype is None or dtype.itemsize != 2 or not jnp.issubdtype(dtype, jnp.floating)
            or jax.default_backend() != "cpu"):
        return state, None
    return state.replace(k_buf=state.k_buf.astype(jnp.float32),
                         v_buf=state.v_buf.astype(jnp.float32)), dtype


def narrow_buffers(state, dtype):
    """:func:`widen_buffers` undone: the K/V buffers back in ``dtype`` (None: as is)."""
    if dtype is None:
        return state
    return state.replace(k_buf=state.k_buf.astype(dtype), v_buf=state.v_buf.astype(dtype))


# The name of earlier releases (it concatenates rows; it does not stack).
stack_states = concat_rows


def select_rows(state, rows):
    """The states of some batch rows: an index (kept as a batch of one), a
    slice, or an index array; layer or model states (or KV caches) alike."""
    axes = row_axes(state)
    if isinstance(rows, (int, np.integer)):
        batch = state.batch_size
        if not -batch <= rows < batch:
            raise IndexError(f"row {rows} is out of range for a batch of {batch}")
        rows = slice(rows % batch, rows % batch + 1)
    return jax.tree.map(lambda axis, leaf: leaf[(slice(None),) * axis + (rows,)], axes, state)


def where_rows(take_new: jax.Array, new, old, *, axis: int | None = None):
    """Per batch row, ``new`` where ``take_new`` (B,) else ``old``.

    The batch axis is :func:`row_axes` for states (``BankState``, ``KVCache``),
    else ``axis`` (default 0) for every leaf.
    """
    if axis is not None or not (isinstance(new, BankState) or hasattr(new, "row_axes")):
        axes = jax.tree.map(lambda _: 0 if axis is None else axis, new)
    else:
        axes = row_axes(new)

    def pick(axis, a, b):
        cond = take_new.reshape((1,) * axis + take_new.shape + (1,) * (a.ndim - axis - 1))
        return jnp.where(cond, a, b)
    return jax.tree.map(pick, axes, new, old)
