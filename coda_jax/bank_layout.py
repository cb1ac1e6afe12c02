"""The bounded buffer's layout and its fresh states.

``BankLayout`` holds what a bank configuration fixes (the ring, exact and
summary slices of the buffer, the low-frequency band, the expansion
ceilings); ``init_state`` and ``init_layers_state`` build empty states of it,
``state_shapes`` and ``stack_shapes`` their shapes without allocating. The
write rules that fill a state are in :mod:`.bank_writes`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import summary_bank
from .config import BankConfig, expansion_thresholds, lf_band_dims
from .state import POSITION_DTYPE, BankMetrics, BankState


@dataclasses.dataclass(frozen=True, eq=False)
class BankLayout:
    """Static facts derived from the configs: band dims, energy scale, ceilings."""

    cfg: BankConfig
    num_kv_heads: int
    head_dim: int
    lf_dims: np.ndarray
    exact_thresholds: np.ndarray
    summary_thresholds: np.ndarray

    @property
    def energy_scale(self) -> float:
        return math.sqrt(self.head_dim / len(self.lf_dims))

    @property
    def exact_slice(self) -> slice:
        return slice(self.cfg.window, self.cfg.window + self.cfg.num_exact)

    @property
    def summary_slice(self) -> slice:
        return slice(self.cfg.window + self.cfg.num_exact, self.cfg.buffer_len)


@functools.lru_cache(maxsize=256)
def bank_layout(cfg: BankConfig, num_kv_heads: int, head_dim: int,
                rope_interleaved: bool) -> BankLayout:
    int_max = np.iinfo(np.int32).max
    return BankLayout(
        cfg=cfg, num_kv_heads=num_kv_heads, head_dim=head_dim,
        lf_dims=lf_band_dims(head_dim, rope_interleaved, cfg.lf_band),
        exact_thresholds=np.minimum(expansion_thresholds(
            cfg.min_landmarks_exact, cfg.max_landmarks_exact, cfg.expansion_t_max), int_max),
        summary_thresholds=np.minimum(expansion_thresholds(
            cfg.min_landmarks_summary, cfg.max_landmarks_summary, cfg.expansion_t_max), int_max))


def check_state_request(batch_size: int, dtype) -> None:
    """``ValueError`` unless a state of ``batch_size`` rows in ``dtype`` makes sense."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"a state holds keys and values in a floating dtype, got {dtype!r}")


def init_state(layout: BankLayout, batch_size: int, dtype, key: jax.Array | None,
               mem_init: str) -> BankState:
    """A fresh state; ``random_normal`` fills bank slots with N(0, 0.02^2) from ``key``
    (summary keys only on their LF band: Phase-Safe)."""
    cfg = layout.cfg
    shape = (batch_size, cfg.buffer_len, layout.num_kv_heads, layout.head_dim)
    k_buf = jnp.zeros(shape, dtype)
    v_buf = jnp.zeros(shape, dtype)
    if mem_init == "random_normal" and cfg.num_exact + cfg.num_summary > 0:
        if key is None:
            raise ValueError("mem_init='random_normal' needs an explicit PRNG key: "
                             "init_state(..., key=jax.random.key(seed))")
        bank = slice(cfg.window, cfg.buffer_len)
        k_key, v_key = jax.random.split(key)
        bank_shape = (batch_size, cfg.num_exact + cfg.num_summary) + shape[2:]
        k_bank = 0.02 * jax.random.normal(k_key, bank_shape, jnp.float32)
        v_bank = 0.02 * jax.random.normal(v_key, bank_shape, jnp.float32)
        lf_mask = summary_bank.band_mask(layout.lf_dims, layout.head_dim)
        is_summary = (np.arange(bank_shape[1]) >= cfg.num_exact)[:, None, None]
        k_bank = jnp.where(is_summary & ~lf_mask, 0.0, k_bank)
        k_buf = k_buf.at[:, bank].set(k_bank.astype(dtype))
        v_buf = v_buf.at[:, bank].set(v_bank.astype(dtype))
    elif mem_init not in ("random_normal", "zeros"):
        raise ValueError(f"mem_init must be 'zeros' or 'random_normal', got {mem_init!r}")
    vec = lambda value: jnp.full((batch_size,), value, POSITION_DTYPE)  # noqa: E731
    return BankState(
        k_buf=k_buf, v_buf=v_buf,
        allowed=jnp.zeros((batch_size, cfg.buffer_len), jnp.bool_),
        g_recent=jnp.zeros((batch_size, cfg.window), jnp.float32),
        recent_idx=vec(0), recent_filled=vec(0),
        mem_last_exact=jnp.zeros((batch_size, cfg.num_exact), POSITION_DTYPE),
        pos=vec(0),
        active_exact=vec(cfg.min_landmarks_exact if cfg.num_exact > 0 else 0),
        active_summary=vec(cfg.min_landmarks_summary if cfg.num_summary > 0 else 0),
        nonfinite=jnp.zeros((batch_size,), jnp.bool_),
        metrics=BankMetrics.zeros(batch_size) if cfg.collect_metrics else None,
        exact_pos=(None if cfg.max_key_distance is None
                   else jnp.zeros((batch_size, cfg.num_exact), POSITION_DTYPE)))


@functools.partial(jax.jit, static_argnames=("layout", "batch_size", "dtype", "mem_init",
                                             "num_layers"))
def init_layers_state(layout: BankLayout, batch_size: int, dtype, key: jax.Array | None,
                      mem_init: str, num_layers: int) -> BankState:
    """:func:`init_state` of ``num_layers`` layers stacked on a leading axis, layer ``i``
    seeded by ``jax.random.split(key, num_layers)[i]``: one compiled call (op by op,
    a 32-layer state took ~150 ms of dispatch on a GPU, paid by every document read)."""
    if key is None:
        one = init_state(layout, batch_size, dtype, None, mem_init)
        return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_layers,) + leaf.shape), one)
    return jax.vmap(lambda k: init_state(layout, batch_size, dtype, k, mem_init))(
        jax.random.split(key, num_layers))


@functools.lru_cache(maxsize=64)
def state_shapes(layout: BankLayout, batch_size: int, dtype) -> BankState:
    """Shapes and dtypes of a state (``jax.ShapeDtypeStruct`` leaves), without allocating."""
    return jax.eval_shape(lambda: init_state(layout, batch_size, dtype, None, "zeros"))


def stack_shapes(shapes: list[BankState]) -> BankState:
    """Per-layer state shapes -> the stacked state's (a leading layer axis)."""
    return jax.tree.map(lambda *leaves: jax.ShapeDtypeStruct(
        (len(leaves),) + leaves[0].shape, leaves[0].dtype), *shapes)
