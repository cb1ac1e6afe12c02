"""Writes into the bounded buffer: the recent ring, eviction, and bank routing.

``write_block`` is the prefill rule (a block of new tokens at once, evicted
tokens filtered to the top candidates by write gate); ``write_one`` is the
decode rule (one token; the oldest ring entry goes straight to both banks).
Both are pure functions of fixed shapes, vectorised over batch rows that may
sit at different positions, with no host synchronisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import exact_bank, summary_bank
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
        metrics=BankMetrics.zeros(batch_size) if cfg.collect_metrics else None)


@functools.lru_cache(maxsize=64)
def state_shapes(layout: BankLayout, batch_size: int, dtype) -> BankState:
    """Shapes and dtypes of a state (``jax.ShapeDtypeStruct`` leaves), without allocating."""
    return jax.eval_shape(lambda: init_state(layout, batch_size, dtype, None, "zeros"))


def stack_shapes(shapes: list[BankState]) -> BankState:
    """Per-layer state shapes -> the stacked state's (a leading layer axis)."""
    return jax.tree.map(lambda *leaves: jax.ShapeDtypeStruct(
        (len(leaves),) + leaves[0].shape, leaves[0].dtype), *shapes)


def _ceiling(lo: int, thresholds: np.ndarray, tokens_seen: jax.Array) -> jax.Array:
    if thresholds.size == 0:
        return jnp.full_like(tokens_seen, lo)
    passed = tokens_seen[:, None] >= jnp.asarray(thresholds, POSITION_DTYPE)[None, :]
    return lo + jnp.sum(passed, axis=-1, dtype=POSITION_DTYPE)


def _expand(active: jax.Array, frustrated: jax.Array, ceiling: jax.Array) -> jax.Array:
    """Pressure-gated growth: by the frustrated count, up to the log ceiling."""
    room = jnp.maximum(ceiling - active, 0)
    return active + jnp.where(frustrated > 0, jnp.minimum(frustrated, room), 0)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather along axis 1 with per-row indices idx (B, N)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _bank_views(layout: BankLayout, state: BankState):
    ex, su = layout.exact_slice, layout.summary_slice
    return ((state.k_buf[:, ex], state.v_buf[:, ex], state.allowed[:, ex]),
            (state.k_buf[:, su], state.v_buf[:, su], state.allowed[:, su]))


def _assemble(state: BankState, ring, exact, summary, **fields) -> BankState:
    """Put ring and bank segments back into one buffer."""
    k = jnp.concatenate([ring[0], exact.k, summary.k], axis=1)
    v = jnp.concatenate([ring[1], exact.v, summary.v], axis=1)
    allowed = jnp.concatenate([ring[2], exact.used, summary.used], axis=1)
    return state.replace(k_buf=k, v_buf=v, allowed=allowed, mem_last_exact=exact.last,
                         **fields)


def _update_banks(layout: BankLayout, state: BankState, exact_fn, summary_fn,
                  training: bool):
    """Run the bank updates given (None = that bank is absent or gets no
    candidates) and the pressure-gated expansion."""
    cfg = layout.cfg
    (ek, ev, eused), (sk, sv, sused) = _bank_views(layout, state)
    if exact_fn is not None:
        exact = exact_fn(mem_k=ek, mem_v=ev, used=eused, last=state.mem_last_exact,
                         active=state.active_exact)
    else:
        zero = jnp.zeros_like(state.pos)
        exact = exact_bank.ExactUpdate(ek, ev, eused, state.mem_last_exact,
                                       zero, zero, zero, zero, zero)
    if summary_fn is not None:
        summary = summary_fn(mem_k=sk, mem_v=sv, used=sused, active=state.active_summary)
    else:
        zero = jnp.zeros_like(state.pos)
        summary = summary_bank.SummaryUpdate(sk, sv, sused, zero, zero, zero)

    active_exact, active_summary = state.active_exact, state.active_summary
    if not training:  # as the reference: training runs on fixed bank sizes
        active_exact = _expand(active_exact, exact.frustrated, _ceiling(
            cfg.min_landmarks_exact, layout.exact_thresholds, state.pos))
        active_summary = _expand(active_summary, summary.frustrated, _ceiling(
            cfg.min_landmarks_summary, layout.summary_thresholds, state.pos))
    return exact, summary, active_exact, active_summary


def _count_metrics(state, exact, summary, evictions, active_exact, active_summary):
    if state.metrics is None:
        return None
    return state.metrics.add(
        total_evictions=evictions, tokens_gated_out=exact.gated_out,
        exact_hits=exact.hits, exact_inserts=exact.inserts,
        exact_overwrites=exact.overwrites, exact_frustrated=exact.frustrated,
        summary_updates=summary.updates, summary_inserts=summary.inserts,
        summary_frustrated=summary.frustrated,
        expansions_exact=active_exact - state.active_exact,
        expansions_summary=active_summary - state.active_summary)


def write_block(layout: BankLayout, state: BankState, *, k: jax.Array, v: jax.Array,
                gate: jax.Array, count: jax.Array, eta_logit: jax.Array,
                training: bool) -> BankState:
    """Append a block of ``count`` (B,) valid tokens (k/v (B, T, Hkv, Dh), gate (B, T)).

    The ring, in time order, followed by the block forms one stream; its last
    ``W`` tokens become the new ring (re-laid out from slot 0), the tokens
    before them are evicted. The evicted tokens with the highest write gates
    (sorted, ties to the older token) are the bank candidates.
    """
    cfg = layout.cfg
    w = cfg.window
    block = gate.shape[1]
    order = (state.recent_idx[:, None] + jnp.arange(w)[None, :]) % w
    stream_k = jnp.concatenate([_take(state.k_buf[:, :w], order), k.astype(state.k_buf.dtype)], 1)
    stream_v = jnp.concatenate([_take(state.v_buf[:, :w], order), v.astype(state.v_buf.dtype)], 1)
    stream_g = jnp.concatenate([_take(state.g_recent, order), gate.astype(jnp.float32)], 1)

    filled = state.recent_filled[:, None]
    total = state.recent_filled + count
    evicted = jnp.maximum(total - w, 0)
    kept = total - evicted

    def source(s):  # stream position -> index into the concatenated [ring | block]
        return jnp.clip(jnp.where(s < filled, s, w + s - filled), 0, w + block - 1)

    # The ring after the block: stream positions [evicted, evicted + kept).
    keep_pos = evicted[:, None] + jnp.arange(w)[None, :]
    keep_valid = jnp.arange(w)[None, :] < kept[:, None]
    zero_out = lambda x: jnp.where(  # noqa: E731
        keep_valid.reshape(keep_valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))
    ring = (zero_out(_take(stream_k, source(keep_pos))),
            zero_out(_take(stream_v, source(keep_pos))),
            keep_valid)
    g_recent = zero_out(_take(stream_g, source(keep_pos)))

    n_exact = min(cfg.exact_candidates_per_block if cfg.num_exact else 0, block)
    n_summary = min(cfg.summary_candidates_per_block if cfg.num_summary else 0, block)
    num_cand = max(n_exact, n_summary)

    exact_fn = summary_fn = None
    if num_cand > 0:
        # Evicted tokens are stream positions [0, evicted); at most `block` of them.
        ev_pos = jnp.arange(block)[None, :]
        ev_valid = ev_pos < evicted[:, None]
        ev_src = source(ev_pos)
        ev_g = _take(stream_g, ev_src)
        rank = jnp.argsort(jnp.where(ev_valid, -ev_g, jnp.inf), axis=-1, stable=True)[:, :num_cand]
        cand_idx = _take(ev_src, rank)
        cand_k, cand_v, cand_g = (_take(stream_k, cand_idx), _take(stream_v, cand_idx),
                                  _take(ev_g, rank))
        if cfg.detach_evicted:
            cand_k, cand_v, cand_g = jax.lax.stop_gradient((cand_k, cand_v, cand_g))
        cand_pos = state.pos[:, None] - filled + rank
        cand_valid = jnp.arange(num_cand)[None, :] < evicted[:, None]
        if n_exact > 0:
            def exact_fn(**bank):
                return exact_bank.update_block(
                    cfg, **bank, cand_k=cand_k[:, :n_exact], cand_v=cand_v[:, :n_exact],
                    cand_pos=cand_pos[:, :n_exact], cand_gate=cand_g[:, :n_exact],
                    cand_valid=cand_valid[:, :n_exact])
        if n_summary > 0:
            def summary_fn(**bank):
                g, ok = cand_g[:, :n_summary], cand_valid[:, :n_summary]
                if cfg.gated:
                    ok = ok & (g >= cfg.write_gate_threshold_summary)
                return summary_bank.update_block(
                    cfg, **bank, eta_logit=eta_logit, cand_k=cand_k[:, :n_summary],
                    cand_v=cand_v[:, :n_summary], weight=jnp.where(ok, g, 0.0),
                    lf_dims=layout.lf_dims, energy_scale=layout.energy_scale)
    exact, summary, active_exact, active_summary = _update_banks(
        layout, state, exact_fn, summary_fn, training)

    return _assemble(
        state, ring, exact, summary, g_recent=g_recent,
        recent_idx=jnp.zeros_like(state.recent_idx), recent_filled=kept.astype(POSITION_DTYPE),
        pos=state.pos + count.astype(POSITION_DTYPE),
        active_exact=active_exact, active_summary=active_summary,
        metrics=_count_metrics(state, exact, summary, evicted, active_exact, active_summary))


def write_one(layout: BankLayout, state: BankState, *, k: jax.Array, v: jax.Array,
              gate: jax.Array, eta_logit: jax.Array, training: bool) -> BankState:
    """Append one token per row (k/v (B, Hkv, Dh), gate (B,)).

    While the ring has room the token takes the next free slot; once full it
    replaces the oldest entry, which is routed into both banks first.
    """
    cfg = layout.cfg
    w = cfg.window
    batch = gate.shape[0]
    rows = jnp.arange(batch)
    full = state.recent_filled >= w
    slot = jnp.where(full, state.recent_idx, state.recent_filled)

    ev = state.recent_idx
    ev_k, ev_v, ev_g = state.k_buf[rows, ev], state.v_buf[rows, ev], state.g_recent[rows, ev]
    if cfg.detach_evicted:
        ev_k, ev_v, ev_g = jax.lax.stop_gradient((ev_k, ev_v, ev_g))
    ev_pos = state.pos - w

    def exact_fn(**bank):
        return exact_bank.update_one(cfg, **bank, k=ev_k, v=ev_v, pos=ev_pos, gate=ev_g,
                                     valid=full)

    def summary_fn(**bank):
        return summary_bank.update_one(cfg, **bank, eta_logit=eta_logit, k=ev_k, v=ev_v,
                                       gate=ev_g, valid=full, lf_dims=layout.lf_dims,
                                       energy_scale=layout.energy_scale)

    exact, summary, active_exact, active_summary = _update_banks(
        layout, state, exact_fn if cfg.num_exact else None,
        summary_fn if cfg.num_summary else None, training)

    ring = (state.k_buf[:, :w].at[rows, slot].set(k.astype(state.k_buf.dtype)),
            state.v_buf[:, :w].at[rows, slot].set(v.astype(state.v_buf.dtype)),
            state.allowed[:, :w].at[rows, slot].set(True))
    return _assemble(
        state, ring, exact, summary,
        g_recent=state.g_recent.at[rows, slot].set(gate.astype(jnp.float32)),
        recent_idx=jnp.where(full, (state.recent_idx + 1) % w, state.recent_idx),
        recent_filled=jnp.minimum(state.recent_filled + 1, w).astype(POSITION_DTYPE),
        pos=state.pos + 1,
        active_exact=active_exact, active_summary=active_summary,
        metrics=_count_metrics(state, exact, summary, full.astype(jnp.int32),
                               active_exact, active_summary))
