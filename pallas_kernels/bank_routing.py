"""Both bank updates of one prefill block in one Pallas kernel.

The prefill's block loop routes each block's evicted candidates into the exact
bank (value-routed, novelty-filtered, LRU slots) and the summary bank (LF-key
routed EMA prototypes), then grows the banks under pressure. As XLA fusions
that is about ten small kernels per block, each a launch and a CUDA-graph node;
here it is one program per batch row that keeps every decision on chip and
writes the new banks once. The rules are those of ``coda_jax.exact_bank`` and
``coda_jax.summary_bank`` (``update_block``), which are its reference.

Shapes are fixed by the caller (``coda_jax.memory``): bank slots and candidate
rows are powers of two of at least 16 and so is head_dim (the tile matmul's
smallest side); per-row scalars travel in one int32 vector. The matmuls are
one-hot gathers and scatters (exact) and float32 cosine scores (IEEE).
On CPU the kernel runs in Pallas interpret mode (the tests); on GPU through
the portable Triton lowering.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASKED_SCORE = -1e9
STAMP_MIN = -jnp.iinfo(jnp.int32).max
NORM_EPS = 1e-6
META = 16  # length of the per-row int32 vectors in and out
# Per-row inputs (meta_in): active exact, active summary, tokens in the block,
# the two expansion ceilings, the block's index. Outputs (meta_out), in order:
OUT_FIELDS = ("active_exact", "active_summary", "exact_frustrated", "exact_hits",
              "exact_inserts", "exact_overwrites", "gated_out", "summary_frustrated",
              "summary_updates", "summary_inserts")


class RoutingRule(NamedTuple):
    """The static rule: thresholds and switches of ``coda_jax.config.BankConfig``."""

    num_kv_heads: int
    gated: bool
    write_gate_threshold_exact: float
    exact_novelty_threshold: float
    exact_match_threshold: float
    exact_refresh_on_hit: bool
    summary_overwrite_on_insert: bool
    energy_scale: float
    expand: bool  # pressure-gated bank growth (off in training)


def _dot(a, b, contract):
    """a @ b over the given contracting dims, float32 accumulation."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _unit_rows(x):
    """Rows over the last axis divided by max(norm, eps), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True)), NORM_EPS)


def _count(mask):
    return jnp.sum(mask.astype(jnp.int32))


def _cosine_mean(cand_ref, blk, mem_ref, heads, band=None):
    """Cosine of block ``blk``'s candidate units (n, C, H, Dh) with bank rows
    (M, H, Dh), mean over heads -> (C, M); ``band`` (Dh,) bool restricts the
    bank's side to the LF band."""
    total = None
    for h in range(heads):
        mem = mem_ref[:, h, :].astype(jnp.float32)
        if band is not None:
            mem = jnp.where(band[None, :], mem, 0.0)
        part = _dot(cand_ref[blk, :, h, :], _unit_rows(mem), ((1,), (1,)))
        total = part if total is None else total + part
    return total / heads


def _route_kernel(meta_ref, eta_ref, band_ref, ek_ref, ev_ref, eused_ref, elast_ref,
                  sk_ref, sv_ref, sused_ref, cek_ref, cev_ref, ceu_ref, cgate_ref, cpos_ref,
                  cvalid_ref, csk_ref, csv_ref, csu_ref, cw_ref,
                  ek_out, ev_out, eused_out, elast_out, sk_out, sv_out, sused_out, meta_out,
                  *, rule: RoutingRule):
    i32 = jnp.int32
    heads = rule.num_kv_heads
    e_active, s_active, count, blk = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[5]
    run = count > 0  # a row with nothing in this block keeps its banks bit for bit

    # ---- exact bank: route on value cosine, insert novel candidates (free or
    # inactive slots first, then least recently used), refresh or touch hits.
    me = ek_ref.shape[0]
    e_slots = jax.lax.broadcasted_iota(i32, (me,), 0)
    used = eused_ref[...] != 0
    last = elast_ref[...]
    inactive = e_slots >= e_active
    scores = _cosine_mean(ceu_ref, blk, ev_ref, heads)
    scores = jnp.where((inactive | ~used)[None, :], MASKED_SCORE, scores)
    best_score = jnp.max(scores, axis=1)
    best_idx = jnp.argmax(scores, axis=1).astype(i32)
    any_used = jnp.max(used.astype(i32)) > 0

    valid = cvalid_ref[blk, :] != 0
    keep = valid & (cgate_ref[blk, :] >= rule.write_gate_threshold_exact) if rule.gated else valid
    novel = ~any_used | (best_score < rule.exact_novelty_threshold)
    hit = any_used & (best_score >= rule.exact_match_threshold)
    novel_keep = novel & keep
    novel_rank = jnp.cumsum(novel_keep.astype(i32)) - 1
    novel_cap = novel_keep & (novel_rank < e_active)

    # The n-th slot in insertion order, by pairwise ranking (a stable sort).
    rank_key = jnp.where(used & ~inactive, last, STAMP_MIN)
    earlier = ((rank_key[None, :] < rank_key[:, None])
               | ((rank_key[None, :] == rank_key[:, None]) & (e_slots[None, :] < e_slots[:, None])))
    position = jnp.sum(earlier.astype(i32), axis=1)
    nth = jnp.clip(novel_rank, 0, me - 1)
    assigned = jnp.argmax((position[None, :] == nth[:, None]).astype(i32), axis=1).astype(i32)

    idx = jnp.where(novel_cap, assigned, best_idx)
    touch = keep & (~novel | novel_cap)
    overwrite = keep & (novel_cap | hit) if rule.exact_refresh_on_hit else novel_cap
    onehot = idx[:, None] == e_slots[None, :]                              # (C, Me)
    touched = onehot & touch[:, None]
    new_stamp = jnp.max(jnp.where(touched, cpos_ref[blk, :][:, None], STAMP_MIN), axis=0)
    new_last = jnp.where(jnp.max(touched.astype(i32), axis=0) > 0, new_stamp, last)
    written = jnp.max((onehot & overwrite[:, None]).astype(i32), axis=0) > 0
    for mem_ref, cand_ref, out_ref in ((ek_ref, cek_ref, ek_out), (ev_ref, cev_ref, ev_out)):
        dtype = mem_ref.dtype
        hot = onehot.astype(dtype)
        write = overwrite.astype(dtype)[:, None]
        for h in range(heads):
            mem = mem_ref[:, h, :]
            old = _dot(hot, mem, ((1,), (0,))).astype(dtype)               # mem[idx]
            delta = write * (cand_ref[blk, :, h, :].astype(dtype) - old)
            new = mem + _dot(hot, delta, ((0,), (0,))).astype(dtype)      # summed per slot
            out_ref[:, h, :] = jnp.where(run, new, mem)
    eused_out[...] = jnp.where(run, used | written, used).astype(i32)
    elast_out[...] = jnp.where(run, new_last, last)

    # ---- summary bank: route on LF-key cosine, move each hit slot toward the
    # gate-weighted mean of its candidates (EMA; LF key band only).
    ms = sk_ref.shape[0]
    s_slots = jax.lax.broadcasted_iota(i32, (ms,), 0)
    s_used = sused_ref[...] != 0
    s_inactive = s_slots >= s_active
    band = band_ref[...] != 0
    s_scores = _cosine_mean(csu_ref, blk, sk_ref, heads, band)
    s_idx = jnp.argmax(jnp.where(s_inactive[None, :], MASKED_SCORE, s_scores), axis=1)
    weighted = (s_idx[:, None] == s_slots[None, :]).astype(jnp.float32) * cw_ref[blk, :][:, None]
    mass = jnp.sum(weighted, axis=0)                                       # (Ms,)
    hit_slot = mass > 0
    new_slot = hit_slot & ~s_used
    denom = jnp.maximum(mass, 1e-6)[:, None]
    blend = run & hit_slot[:, None]
    for h in range(heads):
        eta = eta_ref[h]
        if rule.summary_overwrite_on_insert:
            eta = jnp.where(new_slot, 1.0, eta)[:, None]
        k_old, v_old = sk_ref[:, h, :], sv_ref[:, h, :]
        k32, v32 = k_old.astype(jnp.float32), v_old.astype(jnp.float32)
        avg_k = _dot(weighted, csk_ref[blk, :, h, :].astype(jnp.float32), ((0,), (0,))) / denom
        avg_v = _dot(weighted, csv_ref[blk, :, h, :].astype(jnp.float32), ((0,), (0,))) / denom
        k_lf = k32 + eta * (avg_k * rule.energy_scale - k32)
        new_k = jnp.where(band[None, :], k_lf, k32).astype(k_old.dtype)
        new_v = (v32 + eta * (avg_v - v32)).astype(v_old.dtype)
        sk_out[:, h, :] = jnp.where(blend, new_k, k_old)
        sv_out[:, h, :] = jnp.where(blend, new_v, v_old)
    s_used_new = s_used | hit_slot
    sused_out[...] = jnp.where(run, s_used_new, s_used).astype(i32)

    # ---- counters and pressure-gated growth
    e_frustrated = _count(novel_keep & ~novel_cap)
    incoming = jnp.max((hit_slot & ~s_inactive).astype(i32)) > 0
    s_frustrated = ((jnp.min((s_used_new | s_inactive).astype(i32)) > 0) & incoming).astype(i32)
    new_e_active, new_s_active = e_active, s_active
    if rule.expand:
        def grow(active, frustrated, ceiling):
            room = jnp.maximum(ceiling - active, 0)
            return active + jnp.where(frustrated > 0, jnp.minimum(frustrated, room), 0)
        new_e_active = grow(e_active, e_frustrated, meta_ref[3])
        new_s_active = grow(s_active, s_frustrated, meta_ref[4])
    values = (jnp.where(run, new_e_active, e_active), jnp.where(run, new_s_active, s_active),
              e_frustrated, _count(hit & keep), _count(novel_cap), _count(overwrite),
              _count(valid & ~keep), s_frustrated, _count(hit_slot), _count(new_slot))
    lane = jax.lax.broadcasted_iota(i32, (META,), 0)
    out = jnp.zeros((META,), i32)
    for i, value in enumerate(values):  # counters of a skipped row are zero
        value = value if i < 2 else jnp.where(run, value, 0)
        out = jnp.where(lane == i, value, out)
    meta_out[...] = out


def route_block(rule: RoutingRule, meta: jax.Array, eta: jax.Array, band: jax.Array,
                exact: tuple[jax.Array, ...], summary: tuple[jax.Array, ...],
                exact_cand: tuple[jax.Array, ...], summary_cand: tuple[jax.Array, ...],
                *, interpret: bool | None = None):
    """Route one block's candidates into both banks, for every batch row at once.

    meta (B, META) int32 (active exact, active summary, tokens in the block,
    exact and summary expansion ceilings, the block's index i); eta (>= Hkv,)
    float32 = sigmoid(summary_eta_logit); band (Dh,) int32, 1 on the LF band.
    exact = (k, v (B, Me, Hkv, Dh), used (B, Me) int32, last (B, Me) int32);
    summary = (k, v (B, Ms, Hkv, Dh), used (B, Ms) int32). The candidates of
    every block of the segment (block i is routed): exact_cand = (k, v
    (B, n, Ce, Hkv, Dh), value units float32 (same shape), gate float32, pos
    int32, valid int32 (B, n, Ce)); summary_cand = (k, v (B, n, Cs, Hkv, Dh),
    LF key units float32 on the whole head_dim (0 off the band), weight
    float32 (B, n, Cs)). Returns (exact (k, v, used, last), summary
    (k, v, used), meta_out (B, META) int32 ordered as ``OUT_FIELDS``).
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch = meta.shape[0]

    def per_row(x):  # one batch row per program
        return pl.BlockSpec((None, *x.shape[1:]), lambda b, n=x.ndim - 1: (b,) + (0,) * n)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda b, n=x.ndim: (0,) * n)

    rows = (meta, *exact, *summary, *exact_cand, *summary_cand)
    args = (meta, eta, band, *exact, *summary, *exact_cand, *summary_cand)
    specs = [per_row(meta), whole(eta), whole(band)] + [per_row(x) for x in rows[1:]]
    outs = (*exact, *summary, meta)
    out = pl.pallas_call(
        functools.partial(_route_kernel, rule=rule), grid=(batch,), in_specs=specs,
        out_specs=[per_row(x) for x in outs],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="bank_routing")(*args)
    return tuple(out[:4]), tuple(out[4:7]), out[7]
