"""Writes into the bounded buffer: the recent ring, eviction, and bank routing.

``write_segment`` is the prefill rule (blocks of new tokens, each block's
evicted tokens filtered to the top candidates by write gate); ``write_one`` is the
decode rule (one token; the oldest ring entry goes straight to both banks).
Both are pure functions of fixed shapes, vectorised over batch rows that may
sit at different positions, with no host synchronisation. The buffer's layout
and its fresh states are in :mod:`.bank_layout`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import exact_bank, summary_bank
from .bank_layout import BankLayout
from .state import POSITION_DTYPE, BankMetrics, BankState, where_rows


def _ceiling(lo: int, thresholds: np.ndarray, tokens_seen: jax.Array) -> jax.Array:
    if thresholds.size == 0:
        return jnp.full_like(tokens_seen, lo)
    passed = tokens_seen[:, None] >= jnp.asarray(thresholds, POSITION_DTYPE)[None, :]
    return lo + jnp.sum(passed, axis=-1, dtype=POSITION_DTYPE)


def _expand(active: jax.Array, frustrated: jax.Array, ceiling: jax.Array) -> jax.Array:
    """Pressure-gated growth: by the frustrated count, up to the log ceiling."""
    room = jnp.maximum(ceiling - active, 0)
    return active + jnp.where(frustrated > 0, jnp.minimum(frustrated, room), 0)


def _any_nonfinite(arrays: tuple[jax.Array, ...], valid: jax.Array | None = None
                   ) -> jax.Array:
    """Per row (B,): whether any of ``arrays`` (B, L, ...) holds a NaN or Inf among
    the ``valid`` (B, L) tokens. Such a value would sit in the banks for good."""
    bad = None
    for a in arrays:
        row = jnp.any(~jnp.isfinite(a), axis=tuple(range(2, a.ndim)))
        bad = row if bad is None else bad | row
    if valid is not None:
        bad = bad & valid
    return jnp.any(bad, axis=1)


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
    exact_pos: jax.Array | None  # (B, Me) token positions (BankState.exact_pos)


def _banks_of(layout: BankLayout, state: BankState) -> Banks:
    ex, su = layout.exact_slice, layout.summary_slice
    return Banks(state.k_buf[:, ex], state.v_buf[:, ex], state.allowed[:, ex],
                 state.mem_last_exact, state.k_buf[:, su], state.v_buf[:, su],
                 state.allowed[:, su], state.active_exact, state.active_summary,
                 state.exact_pos)


def _assemble(state: BankState, ring, banks: Banks, **fields) -> BankState:
    """Put the ring (k, v, valid) and both banks back into one buffer."""
    k = jnp.concatenate([ring[0], banks.exact_k, banks.summary_k], axis=1)
    v = jnp.concatenate([ring[1], banks.exact_v, banks.summary_v], axis=1)
    allowed = jnp.concatenate([ring[2], banks.exact_used, banks.summary_used], axis=1)
    return state.replace(k_buf=k, v_buf=v, allowed=allowed, mem_last_exact=banks.exact_last,
                         active_exact=banks.active_exact,
                         active_summary=banks.active_summary, exact_pos=banks.exact_pos,
                         **fields)


def _update_banks(layout: BankLayout, banks: Banks, pos: jax.Array, exact_fn, summary_fn,
                  training: bool):
    """Run the bank updates given (None = that bank is absent or gets no
    candidates) and the pressure-gated expansion; ``pos`` (B,) is the position
    of the next token before this write. -> (banks, exact update, summary update)."""
    zero = jnp.zeros_like(pos)
    if exact_fn is not None:
        exact = exact_fn(mem_k=banks.exact_k, mem_v=banks.exact_v, used=banks.exact_used,
                         last=banks.exact_last, active=banks.active_exact,
                         mem_pos=banks.exact_pos)
    else:
        exact = exact_bank.ExactUpdate(banks.exact_k, banks.exact_v, banks.exact_used,
                                       banks.exact_last, zero, zero, zero, zero, zero,
                                       banks.exact_pos)
    if summary_fn is not None:
        summary = summary_fn(mem_k=banks.summary_k, mem_v=banks.summary_v,
                             used=banks.summary_used, active=banks.active_summary)
    else:
        summary = summary_bank.SummaryUpdate(banks.summary_k, banks.summary_v,
                                             banks.summary_used, zero, zero, zero)

    active_exact, active_summary = _grown(layout, banks.active_exact, banks.active_summary,
                                          exact.frustrated, summary.frustrated, pos, training)
    new = Banks(exact.k, exact.v, exact.used, exact.last, summary.k, summary.v, summary.used,
                active_exact, active_summary, exact.pos)
    return new, exact, summary


def _grown(layout: BankLayout, active_exact: jax.Array, active_summary: jax.Array,
           exact_frustrated: jax.Array, summary_frustrated: jax.Array, pos: jax.Array,
           training: bool) -> tuple[jax.Array, jax.Array]:
    """Both banks' active sizes after the pressure-gated expansion (none in
    training: as the reference, training runs on fixed bank sizes)."""
    if training:
        return active_exact, active_summary
    cfg = layout.cfg
    return (_expand(active_exact, exact_frustrated, _ceiling(
                cfg.min_landmarks_exact, layout.exact_thresholds, pos)),
            _expand(active_summary, summary_frustrated, _ceiling(
                cfg.min_landmarks_summary, layout.summary_thresholds, pos)))


def _count_metrics(metrics: BankMetrics | None, exact, summary, evictions: jax.Array,
                   grown_exact: jax.Array, grown_summary: jax.Array) -> BankMetrics | None:
    """``metrics`` plus one write's counts: ``exact``/``summary`` are the banks'
    updates (None: that bank is absent, counted as zero)."""
    if metrics is None:
        return None
    zero = jnp.zeros_like(evictions)
    ex = lambda name: zero if exact is None else getattr(exact, name)  # noqa: E731
    su = lambda name: zero if summary is None else getattr(summary, name)  # noqa: E731
    return metrics.add(
        total_evictions=evictions, tokens_gated_out=ex("gated_out"),
        exact_hits=ex("hits"), exact_inserts=ex("inserts"),
        exact_overwrites=ex("overwrites"), exact_frustrated=ex("frustrated"),
        summary_updates=su("updates"), summary_inserts=su("inserts"),
        summary_frustrated=su("frustrated"),
        expansions_exact=grown_exact, expansions_summary=grown_summary)


class Candidates(NamedTuple):
    """The evicted tokens of every block with the highest write gates, best first."""

    k: jax.Array      # (n, B, C, Hkv, Dh)
    v: jax.Array
    v_unit: jax.Array     # exact_bank.routing_values(v)
    k_lf_unit: jax.Array  # summary_bank.routing_keys(k): (n, B, C, Hkv, lf_dim)
    gate: jax.Array   # (n, B, C) float32
    pos: jax.Array    # (n, B, C) absolute positions
    valid: jax.Array  # (n, B, C) bool


def _take_per_block(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, S, ...) gathered at idx (n, B, J) -> (n, B, J, ...)."""
    n, b, j = idx.shape
    flat = _take(x, idx.swapaxes(0, 1).reshape(b, n * j))
    return flat.reshape(b, n, j, *x.shape[2:]).swapaxes(0, 1)


def _bank_update_fns(layout: BankLayout, cand, eta_logit: jax.Array):
    """(exact_fn, summary_fn) routing one block's candidates; None where a bank gets none."""
    cfg = layout.cfg
    n_exact = min(cfg.exact_candidates_per_block, cand.gate.shape[-1]) if cfg.num_exact else 0
    n_summary = (min(cfg.summary_candidates_per_block, cand.gate.shape[-1])
                 if cfg.num_summary else 0)

    def exact_fn(**bank):
        return exact_bank.update_block(
            cfg, **bank, cand_k=cand.k[:, :n_exact], cand_v=cand.v[:, :n_exact],
            cand_unit=cand.v_unit[:, :n_exact], cand_pos=cand.pos[:, :n_exact],
            cand_gate=exact_bank.sink_gate(cand.gate[:, :n_exact], cand.pos[:, :n_exact],
                                           cfg.sink_tokens),
            cand_valid=cand.valid[:, :n_exact])

    def summary_fn(**bank):
        g, ok = cand.gate[:, :n_summary], cand.valid[:, :n_summary]
        if cfg.gated:
            ok = ok & (g >= cfg.write_gate_threshold_summary)
        return summary_bank.update_block(
            cfg, **bank, eta_logit=eta_logit, cand_k=cand.k[:, :n_summary],
            cand_v=cand.v[:, :n_summary], cand_unit=cand.k_lf_unit[:, :n_summary],
            weight=jnp.where(ok, g, 0.0),
            lf_dims=layout.lf_dims, energy_scale=layout.energy_scale)

    return (exact_fn if n_exact > 0 else None, summary_fn if n_summary > 0 else None)


def _look_ahead(ring_g: jax.Array, seg_g: jax.Array, filled: jax.Array, lengths: jax.Array,
                ahead: int) -> tuple[jax.Array, jax.Array]:
    """``write_gate_lookahead``: every gate raised to the largest of the next ``ahead``
    tokens' gates that this segment brings. ring_g (B, W), in time order, its first
    ``filled`` valid and already raised by the gates seen before; seg_g (B, L), its
    first ``lengths`` valid."""
    length = seg_g.shape[1]
    valid = jnp.arange(length)[None, :] < lengths[:, None]
    masked = jnp.where(valid, seg_g, -jnp.inf)
    padded = jnp.pad(masked, ((0, 0), (0, ahead)), constant_values=-jnp.inf)
    ahead_max = functools.reduce(jnp.maximum, [padded[:, j:j + length]
                                               for j in range(1, ahead + 1)])
    seg_g = jnp.where(valid, jnp.maximum(seg_g, ahead_max), seg_g)
    # Ring token r (logical position r < filled) looks ahead into the segment's
    # tokens 0 .. r + ahead - filled: a prefix maximum.
    prefix = jax.lax.cummax(masked, axis=1)
    last = jnp.arange(ring_g.shape[1])[None, :] + ahead - filled[:, None]
    reach = jnp.where(last >= 0, jnp.take_along_axis(prefix, jnp.clip(last, 0, length - 1),
                                                     axis=1), -jnp.inf)
    return jnp.maximum(ring_g, reach), seg_g


def write_segment(layout: BankLayout, state: BankState, *, k: jax.Array, v: jax.Array,
                  gate: jax.Array, lengths: jax.Array, block_size: int,
                  eta_logit: jax.Array, training: bool, unroll: int | bool
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
    attends to: (k (B, n, Lbuf, Hkv, Dh), v, allowed (B, n, Lbuf), the exact
    slots' token positions (B, n, Me) or None without ``exact_pos``), with the
    ring in time order. A row with no valid tokens keeps its state bit for bit.
    """
    cfg = layout.cfg
    w = cfg.window
    length = gate.shape[1]
    n_blocks = length // block_size
    dtype = state.k_buf.dtype
    order = (state.recent_idx[:, None] + jnp.arange(w)[None, :]) % w
    stream_k = jnp.concatenate([_take(state.k_buf[:, :w], order), k.astype(dtype)], 1)
    stream_v = jnp.concatenate([_take(state.v_buf[:, :w], order), v.astype(dtype)], 1)
    filled0 = state.recent_filled
    lengths = lengths.astype(POSITION_DTYPE)
    ring_g = _take(state.g_recent, order)
    seg_g = gate.astype(jnp.float32)
    if cfg.write_gate_lookahead:
        ring_g, seg_g = _look_ahead(ring_g, seg_g, filled0, lengths, cfg.write_gate_lookahead)
    stream_g = jnp.concatenate([ring_g, seg_g], 1)
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

    num_cand = max(min(cfg.exact_candidates_per_block if cfg.num_exact else 0, block_size),
                   min(cfg.summary_candidates_per_block if cfg.num_summary else 0, block_size))
    evicted = ring_start[1:] - ring_start[:-1]                        # (n, B), <= block_size
    cand = None
    if num_cand > 0:
        ev_pos = ring_start[:-1][..., None] + jnp.arange(block_size)   # (n, B, T)
        ev_valid = jnp.arange(block_size) < evicted[..., None]
        ev_g = _take_per_block(stream_g, source(ev_pos))
        # Sinks (cfg.sink_tokens) rank first; the exact bank sees their sink gate.
        ev_abs = (state.pos - filled0)[None, :, None] + ev_pos
        rank = jnp.argsort(jnp.where(ev_valid, -exact_bank.sink_gate(ev_g, ev_abs,
                                                                     cfg.sink_tokens), jnp.inf),
                           axis=-1, stable=True)[..., :num_cand]
        cand_stream = ring_start[:-1][..., None] + rank
        cand_src = source(cand_stream)
        cand_k, cand_v = _take_per_block(stream_k, cand_src), _take_per_block(stream_v, cand_src)
        # Routing's normalised candidates for every block at once, not per block.
        cand = Candidates(
            k=cand_k, v=cand_v, v_unit=exact_bank.routing_values(cand_v),
            k_lf_unit=summary_bank.routing_keys(cand_k, layout.lf_dims),
            gate=jnp.take_along_axis(ev_g, rank, axis=-1),
            pos=(state.pos - filled0)[None, :, None] + cand_stream,
            valid=jnp.arange(num_cand) < evicted[..., None])
        if cfg.detach_evicted:
            cand = jax.lax.stop_gradient(cand)

    counts = streamed[1:] - streamed[:-1]                             # (n, B) tokens per block
    pos_before = state.pos[None] + (streamed[:-1] - filled0[None])

    def body(carry, inputs):
        banks, metrics = carry
        block_cand, count, n_evicted, pos = inputs
        exact_fn, summary_fn = (_bank_update_fns(layout, block_cand, eta_logit)
                                if block_cand is not None else (None, None))
        new, exact, summary = _update_banks(layout, banks, pos, exact_fn, summary_fn, training)
        new_metrics = _count_metrics(metrics, exact, summary, n_evicted,
                                     new.active_exact - banks.active_exact,
                                     new.active_summary - banks.active_summary)
        # Rows with nothing in this block keep their banks bit for bit.
        return where_rows(count > 0, (new, new_metrics), (banks, metrics), axis=0), banks

    (banks, metrics), seen = jax.lax.scan(
        body, (_banks_of(layout, state), state.metrics), (cand, counts, evicted, pos_before),
        unroll=unroll)

    ring_k, ring_v, ring_g, ring_valid = ring_at(slice(n_blocks, n_blocks + 1))
    new = _assemble(
        state, (ring_k[0], ring_v[0], ring_valid[0]), banks, g_recent=ring_g[0],
        recent_idx=jnp.zeros_like(state.recent_idx),
        recent_filled=(streamed[-1] - ring_start[-1]).astype(POSITION_DTYPE),
        pos=state.pos + lengths, metrics=metrics,
        nonfinite=state.nonfinite | _any_nonfinite(
            (k, v, gate[..., None, None]),
            jnp.arange(length)[None, :] < lengths[:, None]))
    new = where_rows(lengths > 0, new, state)

    seen_k, seen_v, _, seen_valid = ring_at(slice(0, n_blocks))
    by_row = lambda a: a.swapaxes(0, 1)  # noqa: E731  (n, B, ...) -> (B, n, ...)
    views = (jnp.concatenate([by_row(seen_k), by_row(seen.exact_k), by_row(seen.summary_k)], 2),
             jnp.concatenate([by_row(seen_v), by_row(seen.exact_v), by_row(seen.summary_v)], 2),
             jnp.concatenate([by_row(seen_valid), by_row(seen.exact_used),
                              by_row(seen.summary_used)], 2),
             None if seen.exact_pos is None else by_row(seen.exact_pos))
    return new, views


class SlotWrites(NamedTuple):
    """The K/V slots one decode write changes: ``at`` (B, n) and their contents
    (B, n, Hkv, Dh) in the buffers' dtype (a held row's: what its slots held)."""

    at: jax.Array
    k: jax.Array
    v: jax.Array


def _slot_contents(buf: jax.Array, rows: jax.Array, at: jax.Array, new: jax.Array,
                   hold: jax.Array | None, storage_dtype) -> jax.Array:
    """What each row's slots ``at`` (B, n) of ``buf`` (B, S, ...) are to hold: ``new``
    (B, n, ...) rounded to ``storage_dtype`` (None: the buffer's), or for rows
    ``hold`` (B,) what they held."""
    new = new.astype(storage_dtype or buf.dtype).astype(buf.dtype)
    if hold is not None:
        new = jnp.where(hold.reshape((-1,) + (1,) * (new.ndim - 1)), buf[rows[:, None], at], new)
    return new


def write_one(layout: BankLayout, state: BankState, *, k: jax.Array, v: jax.Array,
              gate: jax.Array, eta_logit: jax.Array, training: bool,
              hold: jax.Array | None = None, storage_dtype=None) -> BankState:
    """Append one token per row (k/v (B, Hkv, Dh), gate (B,)).

    While the ring has room the token takes the next free slot; once full it
    replaces the oldest entry, which is routed into both banks first. Each
    write is a scatter of one slot per row (the ring's, the exact bank's, the
    summary bank's) into the state's buffers: a decode step reads the banks to
    route but writes only the slots it changes.

    ``hold`` (B,) bool marks rows whose state stays as it was (a row of
    ``generate`` that has stopped): their slots are written back with what they
    held and their other fields keep their values. The result equals
    ``where_rows(hold, state, written)`` without a select over every row's buffers.

    ``storage_dtype`` rounds the written keys and values to that dtype first: a
    state widened for a decode loop (:func:`~coda_jax.state.widen_buffers`) then
    holds exactly what the state in ``storage_dtype`` would.
    """
    writes, state = route_one(layout, state, k=k, v=v, gate=gate, eta_logit=eta_logit,
                              training=training, hold=hold, storage_dtype=storage_dtype)
    rows = jnp.arange(writes.at.shape[0])[:, None]
    return state.replace(k_buf=state.k_buf.at[rows, writes.at].set(writes.k),
                         v_buf=state.v_buf.at[rows, writes.at].set(writes.v))


def write_one_in_stack(layout: BankLayout, stack: BankState, index: jax.Array, **write
                       ) -> BankState:
    """:func:`write_one` (same keywords) on layer ``index`` of a stacked state (L, B,
    ...): of that layer's K/V buffers only the written slots change in ``stack``.
    A loop over layers whose output is each layer's whole new state copies every
    slot of every layer once a token (on a CPU, most of a decode step's time)."""
    layer = jax.tree.map(lambda whole: whole[index], stack)
    writes, layer = route_one(layout, layer, **write)
    rows = jnp.arange(writes.at.shape[0])[:, None]
    no_kv = dict(k_buf=None, v_buf=None)
    placed = jax.tree.map(lambda whole, part: whole.at[index].set(part),
                          stack.replace(**no_kv), layer.replace(**no_kv))
    return placed.replace(k_buf=stack.k_buf.at[index, rows, writes.at].set(writes.k),
                          v_buf=stack.v_buf.at[index, rows, writes.at].set(writes.v))


def route_one(layout: BankLayout, state: BankState, *, k: jax.Array, v: jax.Array,
              gate: jax.Array, eta_logit: jax.Array, training: bool,
              hold: jax.Array | None = None, storage_dtype=None
              ) -> tuple[SlotWrites, BankState]:
    """:func:`write_one`'s routing: (the K/V slots it writes, the state with every
    other field written; its K/V buffers as they were). With ``storage_dtype`` the
    routing reads the buffers in that dtype, so it computes what it would on a
    state kept in it."""
    cfg = layout.cfg
    w = cfg.window
    batch = gate.shape[0]
    rows = jnp.arange(batch)
    full = state.recent_filled >= w
    slot = jnp.where(full, state.recent_idx, state.recent_filled)
    stored = (lambda a: a) if storage_dtype is None else (  # noqa: E731
        lambda a: a.astype(storage_dtype))

    ev = state.recent_idx
    ev_k, ev_v = stored(state.k_buf[rows, ev]), stored(state.v_buf[rows, ev])
    ev_g = state.g_recent[rows, ev]
    if cfg.detach_evicted:
        ev_k, ev_v, ev_g = jax.lax.stop_gradient((ev_k, ev_v, ev_g))
    ev_pos = state.pos - w

    # Every slot this token changes (the ring's, then the exact and summary banks'),
    # routed from the buffers as they were, then written by one scatter per buffer
    # whose slots and contents depend on the reads: a write between the reads cost a
    # copy of the buffers per step (docs/results.md, the decode profile).
    slots, new_k, new_v = [slot], [k], [v]
    allowed = state.allowed.at[rows, slot].set(True)
    zero = jnp.zeros_like(state.pos)
    exact = summary = None
    last, exact_pos = state.mem_last_exact, state.exact_pos
    if cfg.num_exact:
        ex = layout.exact_slice
        exact = exact_bank.update_one(
            cfg, mem_k=stored(state.k_buf[:, ex]), mem_v=stored(state.v_buf[:, ex]),
            used=state.allowed[:, ex],
            last=last, active=state.active_exact, k=ev_k, v=ev_v, pos=ev_pos,
            gate=exact_bank.sink_gate(ev_g, ev_pos, cfg.sink_tokens), valid=full,
            mem_pos=state.exact_pos)
        slots.append(ex.start + exact.idx)
        new_k.append(exact.k)
        new_v.append(exact.v)
        allowed = allowed.at[:, ex].set(exact.used)
        last, exact_pos = exact.last, exact.pos
    if cfg.num_summary:
        su = layout.summary_slice
        summary = summary_bank.update_one(
            cfg, mem_k=stored(state.k_buf[:, su]), mem_v=stored(state.v_buf[:, su]),
            used=state.allowed[:, su],
            active=state.active_summary, eta_logit=eta_logit, k=ev_k, v=ev_v, gate=ev_g,
            valid=full, lf_dims=layout.lf_dims, energy_scale=layout.energy_scale)
        slots.append(su.start + summary.idx)
        new_k.append(summary.k)
        new_v.append(summary.v)
        allowed = allowed.at[:, su].set(summary.used)
    at = jnp.stack(slots, axis=1)                                       # (B, writes)
    writes = SlotWrites(at, *(_slot_contents(buf, rows, at, jnp.stack(new, axis=1), hold,
                                             storage_dtype)
                              for buf, new in ((state.k_buf, new_k), (state.v_buf, new_v))))
    active_exact, active_summary = _grown(
        layout, state.active_exact, state.active_summary,
        zero if exact is None else exact.frustrated,
        zero if summary is None else summary.frustrated, state.pos, training)

    g_recent = state.g_recent.at[rows, slot].set(gate.astype(jnp.float32))
    for back in range(1, cfg.write_gate_lookahead + 1):  # the new gate raises those before it
        before = (slot - back) % w
        seen = back <= state.recent_filled
        g_recent = g_recent.at[rows, before].max(
            jnp.where(seen, gate.astype(jnp.float32), -jnp.inf))
    metrics = _count_metrics(state.metrics, exact, summary, full.astype(jnp.int32),
                             active_exact - state.active_exact,
                             active_summary - state.active_summary)
    small = dict(
        allowed=allowed, mem_last_exact=last, exact_pos=exact_pos,
        active_exact=active_exact, active_summary=active_summary, g_recent=g_recent,
        recent_idx=jnp.where(full, (state.recent_idx + 1) % w, state.recent_idx),
        recent_filled=jnp.minimum(state.recent_filled + 1, w).astype(POSITION_DTYPE),
        pos=state.pos + 1,
        nonfinite=state.nonfinite | _any_nonfinite((k[:, None], v[:, None],
                                                    gate[:, None, None, None])),
        metrics=metrics)
    if hold is not None:  # held rows: every field as it was (their slots were rewritten)
        small = {name: where_rows(hold, getattr(state, name), value, axis=0)
                 for name, value in small.items()}
    return writes, state.replace(**small)
