"""Exact landmark bank: value-routed, novelty-filtered, LRU slots of evicted tokens.

Routing compares normalised *values* (RoPE-free) with the bank's values,
averaged over KV heads. A kept candidate whose best match is below the
novelty threshold is inserted (free slot first, then least recently used);
one at or above the match threshold is a hit (refreshed if
``exact_refresh_on_hit``). Every function works on whole batches with fixed
shapes; per-row quantities (active size, fill) are arrays. We follow the
reference's PyTorch path, including where its prefill and decode rules differ.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.shared import MASKED_SCORE

from .config import BankConfig
from .primitives import einsum_f32, l2_normalize, materialise

STAMP_MAX = jnp.iinfo(jnp.int32).max
STAMP_MIN = -STAMP_MAX
GATE_KEY_SCALE = 1 << 24  # a write gate in [0, 1] as an integer slot key
SINK_GATE = 2.0  # an attention sink's gate (sink_tokens): above any write gate's


def sink_gate(gate: jax.Array, pos: jax.Array, sink_tokens: int) -> jax.Array:
    """``gate`` with the tokens at positions below ``sink_tokens`` given :data:`SINK_GATE`."""
    return jnp.where(pos < sink_tokens, SINK_GATE, gate) if sink_tokens else gate


def gate_key(gate: jax.Array) -> jax.Array:
    """``exact_eviction="gate"``: the key a slot keeps (in the state's LRU stamps,
    ``mem_last_exact``) for the write gate of the token it holds."""
    return jnp.round(jnp.clip(gate, 0.0, SINK_GATE) * GATE_KEY_SCALE).astype(jnp.int32)


class ExactUpdate(NamedTuple):
    k: jax.Array            # (B, Me, Hkv, Dh)
    v: jax.Array
    used: jax.Array         # (B, Me) bool
    last: jax.Array         # (B, Me) LRU stamps
    frustrated: jax.Array   # (B,) int32: novel tokens that found no free slot
    hits: jax.Array         # (B,) int32 kept candidates that matched a slot
    inserts: jax.Array      # (B,) int32 novel candidates written
    overwrites: jax.Array   # (B,) int32 slot writes (inserts + refreshes)
    gated_out: jax.Array    # (B,) int32 candidates below the write-gate threshold
    pos: jax.Array | None = None  # (B, Me) each slot's token position (given mem_pos)


class ExactSlotWrite(NamedTuple):
    """Decode's write of one token per row: the slot it goes to and that slot's
    contents after the write (the rest of the bank is unchanged), so the caller
    scatters one slot into the state instead of rewriting the bank."""

    idx: jax.Array          # (B,) the slot
    k: jax.Array            # (B, Hkv, Dh) the slot's key after the write
    v: jax.Array
    used: jax.Array         # (B, Me) bool
    last: jax.Array         # (B, Me) LRU stamps
    frustrated: jax.Array   # (B,) int32, as ExactUpdate
    hits: jax.Array
    inserts: jax.Array
    overwrites: jax.Array
    gated_out: jax.Array
    pos: jax.Array | None = None  # (B, Me) each slot's token position (given mem_pos)


def routing_values(v: jax.Array) -> jax.Array:
    """What exact routing compares: values normalised per head, float32."""
    return l2_normalize(v)


def value_scores(cand_unit: jax.Array, mem_v: jax.Array) -> jax.Array:
    """Cosine similarity of candidate and bank values, mean over KV heads.

    cand_unit (B, T, Hkv, Dh) from :func:`routing_values`, mem_v (B, M, Hkv, Dh)
    -> (B, T, M), float32.
    """
    scores = jnp.einsum("bthd,bmhd->btm", cand_unit, routing_values(mem_v))
    return scores / cand_unit.shape[2]


def _keep(cfg: BankConfig, gate: jax.Array, valid: jax.Array) -> jax.Array:
    if not cfg.gated:
        return valid
    return valid & (gate >= cfg.write_gate_threshold_exact)


def _write_slots(mem: jax.Array, onehot: jax.Array, idx: jax.Array, write: jax.Array,
                 cand: jax.Array) -> jax.Array:
    """``mem[idx] += write * (cand - mem[idx])`` for every token, summed per slot.

    The delta form (as the reference's scatter_add) keeps a non-writing token
    from undoing a write to the same slot and lets gradients reach both the
    old slot and the candidate.
    """
    old = jnp.take_along_axis(mem, idx[:, :, None, None], axis=1)
    delta = write[:, :, None, None].astype(mem.dtype) * (cand.astype(mem.dtype) - old)
    contrib = einsum_f32("btm,bthd->bmhd", onehot.astype(mem.dtype), delta)
    return mem + contrib.astype(mem.dtype)


def nth_in_stable_order(key: jax.Array, n: jax.Array) -> jax.Array:
    """``argsort(key, stable=True)[n]`` per row: key (B, M), n (B, T) -> (B, T).

    Ranks by pairwise comparison instead of sorting: with M bank slots that is
    one small fused kernel, where a sort is its own kernel launch.
    """
    slots = jnp.arange(key.shape[-1])
    earlier = ((key[:, None, :] < key[:, :, None])
               | ((key[:, None, :] == key[:, :, None]) & (slots[None, :] < slots[:, None])))
    position = jnp.sum(earlier, axis=-1, dtype=jnp.int32)                # (B, M) a permutation
    return jnp.argmax(position[:, None, :] == n[:, :, None], axis=-1)


def update_block(cfg: BankConfig, *, mem_k: jax.Array, mem_v: jax.Array, used: jax.Array,
                 last: jax.Array, active: jax.Array, cand_k: jax.Array, cand_v: jax.Array,
                 cand_unit: jax.Array, cand_pos: jax.Array, cand_gate: jax.Array,
                 cand_valid: jax.Array, mem_pos: jax.Array | None = None) -> ExactUpdate:
    """Route T candidates (sorted by gate, descending) into the bank at once (prefill);
    ``cand_unit`` is ``routing_values(cand_v)``. With ``mem_pos`` (B, M), the slots'
    token positions, the update's ``pos`` gives them after it (a slot written by
    several candidates at once: the latest)."""
    num_slots = mem_k.shape[1]
    slots = jnp.arange(num_slots)
    inactive = slots[None, :] >= active[:, None]                         # (B, M)

    scores = value_scores(cand_unit, mem_v)
    scores = jnp.where((inactive | ~used)[:, None, :], MASKED_SCORE, scores)
    best_score = jnp.max(scores, axis=-1)
    best_idx = jnp.argmax(scores, axis=-1)
    any_used = jnp.any(used, axis=-1)[:, None]

    keep = _keep(cfg, cand_gate, cand_valid)
    novel = ~any_used | (best_score < cfg.exact_novelty_threshold)
    hit = any_used & (best_score >= cfg.exact_match_threshold)
    novel_keep = novel & keep

    # Insertion order: empty or inactive slots first (by index), then used
    # active slots by stamp. Inactive slots rank first as in the reference's
    # PyTorch prefill path (its comment says otherwise; its code does this).
    rank_key = jnp.where(used & ~inactive, last, STAMP_MIN)
    novel_rank = jnp.cumsum(novel_keep.astype(jnp.int32), axis=-1) - 1
    novel_cap = novel_keep & (novel_rank < active[:, None])
    assigned = nth_in_stable_order(rank_key, jnp.clip(novel_rank, 0, num_slots - 1))

    by_gate = cfg.exact_eviction == "gate"
    if by_gate:
        # Candidates come by gate, descending, and take slots by key, ascending: those
        # that beat their slot's key are a prefix.
        stamp = gate_key(cand_gate)
        novel_cap = novel_cap & (stamp > jnp.take_along_axis(rank_key, assigned, axis=-1))
    else:
        stamp = cand_pos

    idx = jnp.where(novel_cap, assigned, best_idx)
    touch = keep & (~novel | novel_cap)
    if cfg.exact_refresh_on_hit:
        overwrite = keep & (novel_cap | hit)
    else:
        overwrite = novel_cap
    idx, touch, overwrite = materialise(idx, touch, overwrite)

    onehot = idx[:, :, None] == slots[None, None, :]                      # (B, T, M)
    touched = onehot & touch[:, :, None]
    new_stamp = jnp.max(jnp.where(touched, stamp[:, :, None], STAMP_MIN), axis=1)
    if by_gate:  # a slot given a new token takes its key; a matched one keeps the larger
        inserted = jnp.any(onehot & novel_cap[:, :, None], axis=1)
        new_stamp = jnp.maximum(new_stamp, jnp.where(inserted, STAMP_MIN, last))
    last = jnp.where(jnp.any(touched, axis=1), new_stamp, last).astype(last.dtype)

    mem_k = _write_slots(mem_k, onehot, idx, overwrite, cand_k)
    mem_v = _write_slots(mem_v, onehot, idx, overwrite, cand_v)
    written = onehot & overwrite[:, :, None]                              # (B, T, M)
    used = used | jnp.any(written, axis=1)
    if mem_pos is not None:
        mem_pos = jnp.where(jnp.any(written, axis=1), jnp.max(
            jnp.where(written, cand_pos[:, :, None], STAMP_MIN), axis=1), mem_pos)

    count = lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32)  # noqa: E731
    return ExactUpdate(
        k=mem_k, v=mem_v, used=used, last=last,
        frustrated=count(novel_keep & ~novel_cap), hits=count(hit & keep),
        inserts=count(novel_cap), overwrites=count(overwrite),
        gated_out=count(cand_valid & ~keep),
        pos=None if mem_pos is None else mem_pos.astype(cand_pos.dtype))


def update_one(cfg: BankConfig, *, mem_k: jax.Array, mem_v: jax.Array, used: jax.Array,
               last: jax.Array, active: jax.Array, k: jax.Array, v: jax.Array,
               pos: jax.Array, gate: jax.Array, valid: jax.Array,
               mem_pos: jax.Array | None = None) -> ExactSlotWrite:
    """Route one evicted token per row (decode): k/v (B, Hkv, Dh), pos/gate/valid (B,).
    The slot's new contents are ``old + write * (cand - old)``, as
    :func:`_write_slots` computes them for the whole bank, bit for bit. With
    ``mem_pos`` (B, M), the slots' token positions, the write's ``pos`` gives them
    after it."""
    num_slots = mem_k.shape[1]
    slots = jnp.arange(num_slots)
    active_slot = slots[None, :] < active[:, None]

    scores = value_scores(routing_values(v[:, None]), mem_v)[:, 0]        # (B, M)
    scores = jnp.where(active_slot & used, scores, MASKED_SCORE)
    best_score = jnp.max(scores, axis=-1)
    best_idx = jnp.argmax(scores, axis=-1)
    any_used = jnp.any(used & active_slot, axis=-1)

    keep = _keep(cfg, gate, valid)
    novel = ~any_used | (best_score < cfg.exact_novelty_threshold)
    hit = any_used & (best_score >= cfg.exact_match_threshold)

    free = ~used & active_slot
    free_exists = jnp.any(free, axis=-1)
    lru_idx = jnp.argmin(jnp.where(used & active_slot, last, STAMP_MAX), axis=-1)
    insert_idx = jnp.where(free_exists, jnp.argmax(free, axis=-1), lru_idx)
    by_gate = cfg.exact_eviction == "gate"
    stamp = gate_key(gate) if by_gate else pos
    if by_gate:  # a novel token replaces the lowest-gate slot only if its gate is higher
        lowest = jnp.take_along_axis(last, lru_idx[:, None], axis=-1)[:, 0]
        refused = novel & ~free_exists & (stamp <= lowest)
        novel, keep = novel & ~refused, keep & ~refused
    idx = jnp.where(novel, insert_idx, best_idx)
    overwrite = (novel | hit if cfg.exact_refresh_on_hit else novel) & keep
    idx, keep, overwrite = materialise(idx, keep, overwrite)

    onehot = idx[:, None] == slots[None, :]                               # (B, M)
    new_stamp = stamp[:, None]
    if by_gate:  # a slot given a new token takes its key; a matched one keeps the larger
        new_stamp = jnp.where(novel[:, None], new_stamp, jnp.maximum(new_stamp, last))
    last = jnp.where(onehot & keep[:, None], new_stamp, last).astype(last.dtype)
    rows = jnp.arange(idx.shape[0])

    def slot_after(mem: jax.Array, cand: jax.Array) -> jax.Array:
        old = mem[rows, idx]
        return old + overwrite[:, None, None].astype(mem.dtype) * (cand.astype(mem.dtype) - old)

    written = onehot & overwrite[:, None]
    used = used | written
    if mem_pos is not None:
        mem_pos = jnp.where(written, pos[:, None].astype(mem_pos.dtype), mem_pos)
    as_int = lambda m: m.astype(jnp.int32)  # noqa: E731
    return ExactSlotWrite(
        idx=idx, k=slot_after(mem_k, k), v=slot_after(mem_v, v), used=used, last=last,
        frustrated=as_int(novel & keep & ~free_exists), hits=as_int(hit & keep),
        inserts=as_int(novel & keep), overwrites=as_int(overwrite),
        gated_out=as_int(valid & ~keep), pos=mem_pos)
