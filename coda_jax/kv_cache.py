"""A preallocated K/V cache for the unbounded model kinds, and its prefill and decode.

The unbounded kinds (``attention="gqa"`` or ``"coda"``) keep every past key and
value. For generation they keep them in a :class:`KVCache` of fixed capacity
``max_length`` (Gemma's cache idea: a pytree of arrays, no Python ints), so
prefill and decode compile once per shape rather than once per length, like
the bounded state. Each row fills its own prefix ``[0, lengths[row])``: rows
of one batch may be at different positions, and the row helpers of
:mod:`coda_jax.state` (``concat_rows``, ``select_rows``, ``where_rows``) act
on caches as on bounded states.

The functions here take the model (a ``CausalLM``) as an argument; the model
dispatches to them by its kind (see ``CausalLM.prefill_segment``,
``decode_step``, ``check_state``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .state import POSITION_DTYPE, tree_bytes


@struct.dataclass
class KVCache:
    """Every layer's keys and values so far, in a buffer of ``max_length`` positions.

    Positions ``[0, lengths[row])`` of a row are filled; the rest are zeros,
    never seen by a query. ``lengths`` above ``max_length`` marks a row that
    overflowed (only the pure functions can get there; the checked entry
    points refuse first).
    """

    k: jax.Array          # (layers, B, max_length, Hkv, Dh), RoPE applied
    v: jax.Array          # (layers, B, max_length, Hkv, Dh)
    lengths: jax.Array    # (B,) int32: positions filled, the position of the next token
    nonfinite: jax.Array  # (B,) bool: a NaN or Inf reached this row

    @classmethod
    def zeros(cls, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
              head_dim: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache (every row at position 0)."""
        shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch_size,), POSITION_DTYPE),
                   nonfinite=jnp.zeros((batch_size,), jnp.bool_))

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[-1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache (every leaf)."""
        return tree_bytes(self)

    def row_axes(self) -> "KVCache":
        """The batch axis of each leaf (a tree of ints of this structure), for the
        row helpers of :mod:`coda_jax.state`."""
        return KVCache(k=1, v=1, lengths=0, nonfinite=0)


def cache_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int,
                batch_size: int = 1, dtype=jnp.bfloat16) -> int:
    """Bytes of a :class:`KVCache` of this shape (keys, values, lengths and flags)."""
    kv = 2 * num_layers * batch_size * max_length * num_kv_heads * head_dim
    return int(kv * jnp.dtype(dtype).itemsize + batch_size * (4 + 1))


# ---------------------------------------------------------------- pieces
def visible_keys(positions: jax.Array, max_length: int, window: int | None) -> jax.Array:
    """Which cache positions (B, S, max_length) the queries at ``positions`` (B, S)
    see: every key up to their own (``j <= p``), and with a sliding ``window`` W
    only ``p - W < j`` (Mistral's)."""
    keys = jnp.arange(max_length, dtype=positions.dtype)[None, None, :]
    seen = keys <= positions[..., None]
    if window is not None:
        seen = seen & (keys > positions[..., None] - window)
    return seen


def write(buffer: jax.Array, layer: jax.Array, positions: jax.Array, new: jax.Array
          ) -> jax.Array:
    """``buffer`` (layers, B, T, ...) with ``new`` (B, S, ...) written into ``layer``
    at per-row ``positions`` (B, S); positions outside ``[0, T)`` are dropped."""
    rows = jnp.arange(new.shape[0])[:, None]
    return buffer.at[layer, rows, positions].set(new.astype(buffer.dtype), mode="drop")


def _run_layers(model: Any, tokens: jax.Array, positions: jax.Array, write_at: jax.Array,
                cache: KVCache, *, remat: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hidden states (B, S, D) of ``tokens`` at ``positions`` after the cache, and
    the cache's K and V with their keys and values written at ``write_at``.

    The whole cache is the loop's carry, written in place one layer at a time
    (scanning it as per-layer inputs and outputs would copy it every call).
    """
    h = model.embed(tokens)

    def body(carry, inputs):
        h, k_all, v_all = carry
        layer, index = inputs
        out, k_all, v_all = layer.self_attn.attend_cache(
            layer.input_layernorm(h), positions, write_at, k_all, v_all, index)
        return (layer.mlp_residual(h + out), k_all, v_all), None

    indices = jnp.arange(cache.num_layers)
    (h, k, v), _ = jax.lax.scan(jax.checkpoint(body) if remat else body,
                                (h, cache.k, cache.v), (model.layers, indices))
    return h, k, v


def _finish(model: Any, h: jax.Array, cache: KVCache, k: jax.Array, v: jax.Array,
            added: jax.Array, bad: jax.Array) -> tuple[jax.Array, KVCache]:
    """Logits of ``h`` and the cache after ``added`` (B,) tokens per row, the rows
    ``bad`` (B,) flagged. Rows that overflowed get NaN logits."""
    lengths = cache.lengths + added
    overflow = lengths > cache.max_length
    logits = jnp.where(overflow[:, None, None], jnp.nan, model.logits(h))
    return logits, KVCache(k=k, v=v, lengths=lengths, nonfinite=cache.nonfinite | bad)


def _nonfinite_rows(h: jax.Array, valid: jax.Array) -> jax.Array:
    """Rows (B,) whose valid new hidden states (B, S, D) hold a NaN or Inf (a
    non-finite key or value always gets there: a token sees its own)."""
    return jnp.any(~jnp.isfinite(h) & valid[..., None], axis=(1, 2))


# ---------------------------------------------------------------- pure functions
def prefill_segment(model: Any, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
                    last_only: bool = False, remat: bool = False
                    ) -> tuple[jax.Array, KVCache]:
    """One segment of ``tokens`` (B, S), the first ``lengths`` (B,) of each row
    valid, read into the cache after each row's filled prefix: -> (logits
    (B, S, V), or (B, 1, V) at each row's last valid token with ``last_only``;
    the cache). Padding is neither written nor counted. All queries of the
    segment attend in one call over the whole cache."""
    seg = tokens.shape[1]
    offsets = jnp.arange(seg, dtype=POSITION_DTYPE)[None, :]
    positions = cache.lengths[:, None] + offsets
    valid = offsets < lengths[:, None]
    write_at = jnp.where(valid, positions, cache.max_length)  # padding: dropped
    h, k, v = _run_layers(model, tokens, positions, write_at, cache, remat=remat)
    bad = _nonfinite_rows(h, valid)
    if last_only:
        last = jnp.clip(lengths - 1, 0, seg - 1)
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)
    return _finish(model, h, cache, k, v, lengths.astype(POSITION_DTYPE), bad)


def decode_step(model: Any, token: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row (B, 1) at position ``lengths[row]``: -> (logits (B, 1, V),
    the cache one position longer). Pure: what generation scans over."""
    positions = cache.lengths[:, None]
    h, k, v = _run_layers(model, token, positions, positions, cache)
    bad = _nonfinite_rows(h, jnp.ones(token.shape, jnp.bool_))
    return _finish(model, h, cache, k, v, jnp.ones_like(cache.lengths), bad)


# ---------------------------------------------------------------- host checks
def check_cache(cache: Any, *, num_layers: int, batch_size: int, num_kv_heads: int,
                head_dim: int, kind: str) -> None:
    """``ValueError`` unless ``cache`` is a :class:`KVCache` of this model and batch."""
    if not isinstance(cache, KVCache):
        raise ValueError(f"expected this model's KVCache (attention={kind!r} keeps a K/V "
                         "cache: model.init_state(batch, dtype, max_length=...)), got "
                         f"{type(cache).__name__}")
    batch = int(batch_size)
    max_length = cache.k.shape[2] if cache.k.ndim == 5 else "max_length"
    want = (num_layers, batch, max_length, num_kv_heads, head_dim)
    shapes = [tuple(cache.k.shape), tuple(cache.v.shape)]
    rows = [tuple(cache.lengths.shape), tuple(cache.nonfinite.shape)]
    if shapes != [want, want] or rows != [(batch,), (batch,)]:
        raise ValueError(f"KV cache does not match this model ({num_layers} layers, batch "
                         f"{batch}, {num_kv_heads} KV heads of {head_dim}): got k "
                         f"{shapes[0]}, v {shapes[1]}, lengths {rows[0]}; expected k and v "
                         f"(layers, batch, max_length, heads, head_dim) = {want}")
    if cache.k.dtype != cache.v.dtype:
        raise ValueError(f"KV cache keys and values differ in dtype: {cache.k.dtype} and "
                         f"{cache.v.dtype}")


def check_room(cache: KVCache, needed, *, what: str) -> None:
    """``ValueError`` unless every row has room for ``needed`` (B,) more tokens
    (reads the cache's lengths back to the host)."""
    filled = np.asarray(cache.lengths, np.int64)
    needed = np.broadcast_to(np.asarray(needed, np.int64), filled.shape)
    room = cache.max_length - filled
    short = np.flatnonzero(needed > room)
    if short.size:
        row = int(short[0])
        raise ValueError(
            f"{what} does not fit the KV cache: row {row} has {int(filled[row])} of "
            f"max_length={cache.max_length} positions filled, room for {max(int(room[row]), 0)} "
            f"more, and needs {int(needed[row])} ({short.size} row(s) short); make the "
            "cache with a larger max_length")


# ---------------------------------------------------------------- generation
def hold_rows(cache: KVCache, held: jax.Array) -> KVCache:
    """``cache`` with the rows ``held`` (B,) bool moved past its end, so that a
    decode step on it drops their writes (no copy of the cache is made)."""
    return cache.replace(lengths=jnp.where(held, cache.max_length, cache.lengths))


def release_rows(held: jax.Array, before: KVCache, after: KVCache) -> KVCache:
    """After a decode step on :func:`hold_rows`'s cache: the held rows as they were
    ``before`` it (their keys and values were never written), the others as
    ``after`` it. Exactly ``where_rows(~held, after, before)``, without
    rewriting the whole cache every token."""
    return after.replace(lengths=jnp.where(held, before.lengths, after.lengths),
                         nonfinite=jnp.where(held, before.nonfinite, after.nonfinite))
