"""Writes into the bounded buffer: the recent ring, eviction, and bank routing.

``write_segment`` is the prefill rule (blocks of new tokens, each block's
evicted tokens filtered to the top candidates by write gate); ``write_one`` is the
decode rule (one token; the oldest ring entry goes straight to both banks).
Both are pure functions of fixed shapes, vectorised over batch rows that may
sit at different positions, with no host synchronisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import exact_bank, summary_bank
from .config import BankConfig, expansion_thresholds, lf_band_dims
from .state import POSITION_DTYPE, BankMetrics, BankState, where_rows


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
    passed = tokens_seen[..., None] >= jnp.asarray(thresholds, POSITION_DTYPE)
    return lo + jnp.sum(passed, axis=-1, dtype=POSITION_DTYPE)


def _ceilings(layout: BankLayout, tokens_seen: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (exact, summary) bank-size ceilings after ``tokens_seen`` tokens (any shape)."""
    cfg = layout.cfg
    return (_ceiling(cfg.min_landmarks_exact, layout.exact_thresholds, tokens_seen),
            _ceiling(cfg.min_landmarks_summary, layout.summary_thresholds, tokens_seen))


def _expand(active: jax.Array, frustrated: jax.Array, ceiling: jax.Array) -> jax.Array:
    """Pressure-gated growth: by the frustrated count, up to the log ceiling."""
    room = jnp.maximum(ceiling - active, 0)
    return active + jnp.where(frustrated > 0, jnp.minimum(frustrated, room), 0)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather along axis 1 with per-row indices idx (B, N)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class Banks(NamedTuple):
    """Both banks' slots, apart from the ring: the carry of the prefill's block loop."""

    exact_k: jax.Array         # (B, Me, Hkv, Dh)
    exact_v: jax.Array
    exact_used: jax.Array      # (B, Me) bool
    exact_last: jax.Array      # (B, Me) LRU stamps
    summary_k: jax.Array       # (B, Ms, Hkv, Dh)
    summary_v: jax.Array
    summary_used: jax.Array    # (B, Ms) bool
    active_exact: jax.Array    # (B,)
    active_summary: jax.Array  # (B,)


def _banks_of(layout: BankLayout, state: BankState) -> Banks:
    ex, su = layout.exact_slice, layout.summary_slice
    return Banks(state.k_buf[:, ex], state.v_buf[:, ex], state.allowed[:, ex],
                 state.mem_last_exact, state.k_buf[:, su], state.v_buf[:, su],
                 state.allowed[:, su], state.active_exact, state.active_summary)


def _assemble(state: BankState, ring, banks: Banks, **fields) -> BankState:
    """Put the ring (k, v, valid) and both banks back into one buffer."""
    k = jnp.concatenate([ring[0], banks.exact_k, banks.summary_k], axis=1)
    v = jnp.concatenate([ring[1], banks.exact_v, banks.summary_v], axis=1)
    allowed = jnp.concatenate([ring[2], banks.exact_used, banks.summary_used], axis=1)
    return state.replace(k_buf=k, v_buf=v, allowed=allowed, mem_last_exact=banks.exact_last,
                         active_exact=banks.active_exact,
                         active_summary=banks.active_summary, **fields)


def _update_banks(layout: BankLayout, banks: Banks, ceilings, exact_fn, summary_fn):
    """Run the bank updates given (None = that bank is absent or gets no
    candidates) and the pressure-gated expansion up to ``ceilings`` (the
    :func:`_ceilings` at this write; None in training, which, as the
    reference, runs on fixed bank sizes). -> (banks, exact update, summary update)."""
    zero = jnp.zeros_like(banks.active_exact)
    if exact_fn is not None:
        exact = exact_fn(mem_k=banks.exact_k, mem_v=banks.exact_v, used=banks.exact_used,
                         last=banks.exact_last, active=banks.active_exact)
    else:
        exact = exact_bank.ExactUpdate(banks.exact_k, banks.exact_v, banks.exact_used,
                                       banks.exact_last, zero, zero, zero, zero, zero)
    if summary_fn is not None:
        summary = summary_fn(mem_k=banks.summary_k, mem_v=banks.summary_v,
                             used=banks.summary_used, active=banks.active_summary)
    else:
        summary = summary_bank.SummaryUpdate(banks.summary_k, banks.summary_v,
                                             banks.summary_used, zero, zero, zero)

    active_exact, active_summary = banks.active_exact, banks.active_summary
    if ceilings is not None:
        active_exact = _expand(active_exact, exact.frustrated, ceilings[0])
        active_summary = _expand(active_summary, summary.frustrated, ceilings[1])
    new = Banks(exact.k, exact.v, exact.used, exact.last, summary.k, summary.v, summary.used,
                active_exact, active_summary)
    return new, exact, summary


class RouteCounts(NamedTuple):
    """What one write did to the banks, per batch row (the metrics' increments)."""

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


def _route_counts(exact, summary, old: Banks, new: Banks) -> RouteCounts:
    return RouteCounts(
        tokens_gated_out=exact.gated_out, exact_hits=exact.hits,
        exact_inserts=exact.inserts, exact_overwrites=exact.overwrites,
        exact_frustrated=exact.frustrated, summary_updates=summary.updates,
        summary_inserts=summary.inserts, summary_frustrated=summary.frustrated,
        expansions_exact=new.active_exact - old.active_exact,
        expansions_summary=new.active_summary - old.active_summary)


def _count_metrics(metrics: BankMetrics | None, counts: RouteCounts,
                   evictions: jax.Array) -> BankMetrics | None:
    if metrics is None:
        return None
    return metrics.add(total_evictions=evictions, **counts._asdict())


class BlockCandidates(NamedTuple):
    """Every block's bank candidates as the two routings take them, batch first:
    the evicted tokens with the highest write gates, best first. Exact rows past
    its candidate count are invalid; summary rows past its count weigh nothing.
    A bank that gets no candidates has None fields."""

    exact_k: jax.Array | None         # (B, n, Ce, Hkv, Dh)
    exact_v: jax.Array | None
    exact_unit: jax.Array | None      # exact_bank.routing_values(exact_v), float32
    exact_gate: jax.Array | None      # (B, n, Ce) float32
    exact_pos: jax.Array | None       # (B, n, Ce) absolute positions
    exact_valid: jax.Array | None     # (B, n, Ce) bool
    summary_k: jax.Array | None       # (B, n, Cs, Hkv, Dh)
    summary_v: jax.Array | None
    summary_unit: jax.Array | None    # summary_bank.routing_keys(summary_k): (..., lf_dim)
    summary_unit_dh: jax.Array | None  # the same on head_dim, 0 off the band (fused kernel)
    summary_weight: jax.Array | None  # (B, n, Cs) float32: the gate, or 0 if it must not count


def _take_blocks(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, S, ...) gathered at idx (n, B, J) -> (B, n, J, ...)."""
    n, b, j = idx.shape
    return _take(x, idx.swapaxes(0, 1).reshape(b, n * j)).reshape(b, n, j, *x.shape[2:])


def _take_per_block(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, S, ...) gathered at idx (n, B, J) -> (n, B, J, ...)."""
    return _take_blocks(x, idx).swapaxes(0, 1)


def _candidate_rows(count: int, fused: bool) -> int:
    """Rows a routing takes for ``count`` candidates: the fused kernel's tiles
    need a power of two of at least 16 (the extra rows are inert)."""
    return max(16, 1 << (count - 1).bit_length()) if fused and count else count


def fusable(layout: BankLayout) -> bool:
    """Whether the fused bank-routing kernel takes this layout: both banks with
    candidates, slot counts and head_dim powers of two of at least 16."""
    cfg = layout.cfg
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    return (pow2(cfg.num_exact) and pow2(cfg.num_summary) and pow2(layout.head_dim)
            and cfg.exact_candidates_per_block > 0 and cfg.summary_candidates_per_block > 0)


def _block_candidates(layout: BankLayout, *, stream: tuple[jax.Array, jax.Array, jax.Array],
                      first: jax.Array, evicted: jax.Array, source, pos0: jax.Array,
                      block_size: int, fused: bool) -> BlockCandidates | None:
    """Rank every block's evicted tokens by write gate (ties to the older token)
    and gather its candidates for both banks at once.

    ``stream`` = (k, v, gate) of [ring | segment]; ``first`` (n, B) the stream
    position of each block's first evicted token and ``evicted`` (n, B) how
    many; ``source`` maps stream positions to indices into the stream; ``pos0``
    (B,) the absolute position of stream position 0.
    """
    cfg = layout.cfg
    n_exact = min(cfg.exact_candidates_per_block, block_size) if cfg.num_exact else 0
    n_summary = min(cfg.summary_candidates_per_block, block_size) if cfg.num_summary else 0
    if n_exact == n_summary == 0:
        return None
    rows_e, rows_s = _candidate_rows(n_exact, fused), _candidate_rows(n_summary, fused)
    take = min(max(rows_e, rows_s), block_size)
    stream_k, stream_v, stream_g = stream
    ev_valid = jnp.arange(block_size) < evicted[..., None]                 # (n, B, T)
    ev_g = _take_per_block(stream_g, source(first[..., None] + jnp.arange(block_size)))
    rank = jnp.argsort(jnp.where(ev_valid, -ev_g, jnp.inf), axis=-1, stable=True)[..., :take]
    cand_stream = first[..., None] + rank
    by_row = lambda a: a.swapaxes(0, 1)  # noqa: E731  (n, B, ...) -> (B, n, ...)
    k = _take_blocks(stream_k, source(cand_stream))
    v = _take_blocks(stream_v, source(cand_stream))
    g = by_row(jnp.take_along_axis(ev_g, rank, axis=-1))
    pos = by_row(pos0[None, :, None] + cand_stream)
    valid = by_row(jnp.arange(take) < evicted[..., None])

    def rows(x, n):  # the first n candidates, inert rows appended past the block
        x = x[:, :, :n]
        pad = [(0, 0), (0, 0), (0, n - x.shape[2])] + [(0, 0)] * (x.ndim - 3)
        return jnp.pad(x, pad) if n > x.shape[2] else x

    exact, summary = (None,) * 6, (None,) * 5
    if n_exact:
        ev = rows(v, rows_e)
        exact = (rows(k, rows_e), ev, exact_bank.routing_values(ev), rows(g, rows_e),
                 rows(pos, rows_e), rows(valid, rows_e) & (jnp.arange(rows_e) < n_exact))
    if n_summary:
        sk, sg = rows(k, rows_s), rows(g, rows_s)
        counts = rows(valid, rows_s) & (jnp.arange(rows_s) < n_summary)
        if cfg.gated:
            counts = counts & (sg >= cfg.write_gate_threshold_summary)
        unit = summary_bank.routing_keys(sk, layout.lf_dims)
        unit_dh = (jnp.zeros(sk.shape, jnp.float32).at[..., layout.lf_dims].set(unit)
                   if fused else None)
        summary = (sk, rows(v, rows_s), unit, unit_dh, jnp.where(counts, sg, 0.0))
    cand = BlockCandidates(*exact, *summary)
    return jax.lax.stop_gradient(cand) if cfg.detach_evicted else cand


def _route_xla(layout: BankLayout, eta_logit: jax.Array, banks: Banks,
               blocks: BlockCandidates | None, i: jax.Array, count: jax.Array, ceilings
               ) -> tuple[Banks, RouteCounts]:
    """Route block ``i``'s candidates into both banks (XLA); rows with no token
    in the block (``count`` (B,) == 0) keep their banks bit for bit."""
    cfg = layout.cfg
    cand = jax.tree.map(lambda a: a[:, i], blocks)
    exact_fn = summary_fn = None
    if cand is not None and cand.exact_k is not None:
        def exact_fn(**bank):
            return exact_bank.update_block(
                cfg, **bank, cand_k=cand.exact_k, cand_v=cand.exact_v,
                cand_unit=cand.exact_unit, cand_pos=cand.exact_pos,
                cand_gate=cand.exact_gate, cand_valid=cand.exact_valid)
    if cand is not None and cand.summary_k is not None:
        def summary_fn(**bank):
            return summary_bank.update_block(
                cfg, **bank, eta_logit=eta_logit, cand_k=cand.summary_k,
                cand_v=cand.summary_v, cand_unit=cand.summary_unit,
                weight=cand.summary_weight, lf_dims=layout.lf_dims,
                energy_scale=layout.energy_scale)
    new, exact, summary = _update_banks(layout, banks, ceilings, exact_fn, summary_fn)
    run = count > 0
    counts = jax.tree.map(lambda c: jnp.where(run, c, 0), _route_counts(exact, summary, banks, new))
    return where_rows(run, new, banks), counts


def _route_pallas(layout: BankLayout, eta_logit: jax.Array, banks: Banks,
                  blocks: BlockCandidates, i: jax.Array, count: jax.Array, ceilings
                  ) -> tuple[Banks, RouteCounts]:
    """:func:`_route_xla` as one Pallas kernel (``pallas_kernels.bank_routing``)."""
    from pallas_kernels.bank_routing import META, OUT_FIELDS, RoutingRule, route_block

    cfg = layout.cfg
    rule = RoutingRule(
        num_kv_heads=layout.num_kv_heads, gated=cfg.gated,
        write_gate_threshold_exact=cfg.write_gate_threshold_exact,
        exact_novelty_threshold=cfg.exact_novelty_threshold,
        exact_match_threshold=cfg.exact_match_threshold,
        exact_refresh_on_hit=cfg.exact_refresh_on_hit,
        summary_overwrite_on_insert=cfg.summary_overwrite_on_insert,
        energy_scale=layout.energy_scale, expand=ceilings is not None)
    zero = jnp.zeros_like(count)
    ceil_e, ceil_s = (zero, zero) if ceilings is None else ceilings
    lanes = [banks.active_exact, banks.active_summary, count, ceil_e, ceil_s, zero + i]
    meta = jnp.stack(lanes + [zero] * (META - len(lanes)), axis=1).astype(jnp.int32)
    heads = layout.num_kv_heads
    eta = jax.nn.sigmoid(eta_logit.astype(jnp.float32))
    eta = jnp.pad(eta, (0, _candidate_rows(heads, True) - heads))
    band = jnp.asarray(summary_bank.band_mask(layout.lf_dims, layout.head_dim), jnp.int32)
    as_int = lambda m: m.astype(jnp.int32)  # noqa: E731
    exact, summary, out = route_block(
        rule, meta, eta, band,
        (banks.exact_k, banks.exact_v, as_int(banks.exact_used), banks.exact_last),
        (banks.summary_k, banks.summary_v, as_int(banks.summary_used)),
        (blocks.exact_k, blocks.exact_v, blocks.exact_unit, blocks.exact_gate,
         blocks.exact_pos.astype(jnp.int32), as_int(blocks.exact_valid)),
        (blocks.summary_k, blocks.summary_v, blocks.summary_unit_dh, blocks.summary_weight))
    field = {name: out[:, j].astype(POSITION_DTYPE) for j, name in enumerate(OUT_FIELDS)}
    new = Banks(exact[0], exact[1], exact[2] != 0, exact[3].astype(banks.exact_last.dtype),
                summary[0], summary[1], summary[2] != 0, field["active_exact"],
                field["active_summary"])
    counts = RouteCounts(
        tokens_gated_out=field["gated_out"], exact_hits=field["exact_hits"],
        exact_inserts=field["exact_inserts"], exact_overwrites=field["exact_overwrites"],
        exact_frustrated=field["exact_frustrated"], summary_updates=field["summary_updates"],
        summary_inserts=field["summary_inserts"],
        summary_frustrated=field["summary_frustrated"],
        expansions_exact=new.active_exact - banks.active_exact,
        expansions_summary=new.active_summary - banks.active_summary)
    return new, counts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _route_fused(layout: BankLayout, eta_logit, banks, blocks, i, count, ceilings):
    """The Pallas routing; its gradient is the XLA routing's (recomputed)."""
    return _route_pallas(layout, eta_logit, banks, blocks, i, count, ceilings)


def _route_fused_fwd(layout, *args):
    return _route_pallas(layout, *args), args


def _route_fused_bwd(layout, args, cotangent):
    eta_logit, banks, blocks, i, count, ceilings = args
    _, vjp = jax.vjp(lambda e, b, c: _route_xla(layout, e, b, c, i, count, ceilings),
                     eta_logit, banks, blocks)
    return (*vjp(cotangent), None, None, None)


_route_fused.defvjp(_route_fused_fwd, _route_fused_bwd)


def write_segment(layout: BankLayout, state: BankState, *, k: jax.Array, v: jax.Array,
                  gate: jax.Array, lengths: jax.Array, block_size: int,
                  eta_logit: jax.Array, training: bool, unroll: int | bool,
                  fused: bool = False
                  ) -> tuple[BankState, tuple[jax.Array, jax.Array, jax.Array]]:
    """Append a segment of whole blocks (k/v (B, L, Hkv, Dh), gate (B, L)) whose
    first ``lengths`` (B,) tokens are valid, block by block.

    The ring, in time order, followed by the segment forms one stream. After
    each block the ring holds the stream's last ``W`` tokens so far; the
    tokens that left it in that block are evicted, and those with the highest
    write gates (sorted, ties to the older token) are that block's bank
    candidates. Eviction depends on the stream alone, so every block's
    candidates and ring are gathered at once; only the bank routing, which
    reads the banks left by the previous block, runs block by block.

    Returns the state after the segment and, per block, the buffer it
    attends to: (k (B, n, Lbuf, Hkv, Dh), v, allowed (B, n, Lbuf)), with the
    ring in time order. A row with no valid tokens keeps its state bit for bit.
    ``fused`` routes each block with the Pallas kernel where the layout allows
    (:func:`fusable`); the result is the same.
    """
    cfg = layout.cfg
    fused = fused and fusable(layout)
    w = cfg.window
    length = gate.shape[1]
    n_blocks = length // block_size
    dtype = state.k_buf.dtype
    order = (state.recent_idx[:, None] + jnp.arange(w)[None, :]) % w
    stream_k = jnp.concatenate([_take(state.k_buf[:, :w], order), k.astype(dtype)], 1)
    stream_v = jnp.concatenate([_take(state.v_buf[:, :w], order), v.astype(dtype)], 1)
    stream_g = jnp.concatenate([_take(state.g_recent, order), gate.astype(jnp.float32)], 1)

    filled0 = state.recent_filled
    lengths = lengths.astype(POSITION_DTYPE)
    starts = jnp.arange(n_blocks + 1, dtype=POSITION_DTYPE)[:, None] * block_size
    streamed = filled0[None] + jnp.minimum(starts, lengths[None])   # (n+1, B) tokens so far
    ring_start = jnp.maximum(streamed - w, 0)                        # first stream pos in ring

    def source(s):  # stream positions (n, B, J) -> index into [ring | segment]
        f = filled0[None, :, None]
        return jnp.clip(jnp.where(s < f, s, w + s - f), 0, w + length - 1)

    def ring_at(b):  # the ring after `b` blocks: (k, v, g, valid), each (n, B, W, ...)
        slots = ring_start[b][..., None] + jnp.arange(w)
        valid = jnp.arange(w) < (streamed[b] - ring_start[b])[..., None]
        src = source(slots)
        zero = lambda x: jnp.where(  # noqa: E731
            valid.reshape(valid.shape + (1,) * (x.ndim - 3)), x, jnp.zeros((), x.dtype))
        return (zero(_take_per_block(stream_k, src)), zero(_take_per_block(stream_v, src)),
                zero(_take_per_block(stream_g, src)), valid)

    blocks = _block_candidates(
        layout, stream=(stream_k, stream_v, stream_g), first=ring_start[:-1],
        evicted=ring_start[1:] - ring_start[:-1], source=source, pos0=state.pos - filled0,
        block_size=block_size, fused=fused)
    counts = streamed[1:] - streamed[:-1]                             # (n, B) tokens per block
    seen_before = state.pos[None] + (streamed[:-1] - filled0[None])   # tokens before each block
    ceilings = None if training else _ceilings(layout, seen_before)
    route = _route_fused if fused else _route_xla

    def body(carry, inputs):
        banks, metrics = carry
        i, count, n_evicted, ceiling = inputs
        new, route_counts = route(layout, eta_logit, banks, blocks, i, count, ceiling)
        return (new, _count_metrics(metrics, route_counts, n_evicted)), banks

    (banks, metrics), seen = jax.lax.scan(
        body, (_banks_of(layout, state), state.metrics),
        (jnp.arange(n_blocks, dtype=jnp.int32), counts, ring_start[1:] - ring_start[:-1],
         ceilings), unroll=unroll)

    ring_k, ring_v, ring_g, ring_valid = ring_at(slice(n_blocks, n_blocks + 1))
    new = _assemble(
        state, (ring_k[0], ring_v[0], ring_valid[0]), banks, g_recent=ring_g[0],
        recent_idx=jnp.zeros_like(state.recent_idx),
        recent_filled=(streamed[-1] - ring_start[-1]).astype(POSITION_DTYPE),
        pos=state.pos + lengths, metrics=metrics)
    new = where_rows(lengths > 0, new, state)

    seen_k, seen_v, _, seen_valid = ring_at(slice(0, n_blocks))
    by_row = lambda a: a.swapaxes(0, 1)  # noqa: E731  (n, B, ...) -> (B, n, ...)
    views = (jnp.concatenate([by_row(seen_k), by_row(seen.exact_k), by_row(seen.summary_k)], 2),
             jnp.concatenate([by_row(seen_v), by_row(seen.exact_v), by_row(seen.summary_v)], 2),
             jnp.concatenate([by_row(seen_valid), by_row(seen.exact_used),
                              by_row(seen.summary_used)], 2))
    return new, views


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

    banks = _banks_of(layout, state)
    new, exact, summary = _update_banks(
        layout, banks, None if training else _ceilings(layout, state.pos),
        exact_fn if cfg.num_exact else None, summary_fn if cfg.num_summary else None)

    ring = (state.k_buf[:, :w].at[rows, slot].set(k.astype(state.k_buf.dtype)),
            state.v_buf[:, :w].at[rows, slot].set(v.astype(state.v_buf.dtype)),
            state.allowed[:, :w].at[rows, slot].set(True))
    return _assemble(
        state, ring, new,
        g_recent=state.g_recent.at[rows, slot].set(gate.astype(jnp.float32)),
        recent_idx=jnp.where(full, (state.recent_idx + 1) % w, state.recent_idx),
        recent_filled=jnp.minimum(state.recent_filled + 1, w).astype(POSITION_DTYPE),
        pos=state.pos + 1,
        metrics=_count_metrics(state.metrics, _route_counts(exact, summary, banks, new),
                               full.astype(jnp.int32)))
