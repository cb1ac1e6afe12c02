"""Summary bank: EMA prototypes routed by the low-frequency band of the keys.

Routing is cosine similarity on the LF key band (averaged over KV heads);
the update is a Phase-Safe EMA: only the LF band of a prototype key is blended
(scaled by ``energy_scale = sqrt(Dh / lf_dim)``), the high-frequency band stays
zero; values are blended whole. ``eta = sigmoid(summary_eta_logit)`` per KV
head; a slot's first write replaces it outright when
``summary_overwrite_on_insert``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.shared import MASKED_SCORE

from .config import BankConfig
from .primitives import l2_normalize, materialise


class SummaryUpdate(NamedTuple):
    k: jax.Array           # (B, Ms, Hkv, Dh)
    v: jax.Array
    used: jax.Array        # (B, Ms) bool
    frustrated: jax.Array  # (B,) int32: all active slots full and data still arriving
    updates: jax.Array     # (B,) int32 slots blended this call
    inserts: jax.Array     # (B,) int32 slots written for the first time


class SummarySlotWrite(NamedTuple):
    """Decode's blend of one token per row: the slot routed to and its contents
    after the blend (the other slots are unchanged)."""

    idx: jax.Array         # (B,) the slot
    k: jax.Array           # (B, Hkv, Dh) the slot's key after the blend
    v: jax.Array
    used: jax.Array        # (B, Ms) bool
    frustrated: jax.Array  # (B,) int32, as SummaryUpdate
    updates: jax.Array
    inserts: jax.Array


def band_mask(lf_dims: np.ndarray, head_dim: int) -> np.ndarray:
    """Boolean (head_dim,) mask of the LF band (static, host-side)."""
    return np.isin(np.arange(head_dim), lf_dims)


def routing_keys(k: jax.Array, lf_dims: np.ndarray) -> jax.Array:
    """What summary routing compares: the LF key band normalised per head, float32."""
    return l2_normalize(k[..., lf_dims])


def lf_scores(cand_unit: jax.Array, mem_k: jax.Array, lf_dims: np.ndarray) -> jax.Array:
    """Cosine similarity of the LF key bands, mean over KV heads -> (B, T, Ms) float32;
    cand_unit is :func:`routing_keys` of the candidates."""
    scores = jnp.einsum("bthd,bmhd->btm", cand_unit, routing_keys(mem_k, lf_dims))
    return scores / cand_unit.shape[2]


def _route(cand_unit, mem_k, active, lf_dims) -> jax.Array:
    scores = lf_scores(cand_unit, mem_k, lf_dims)
    inactive = jnp.arange(mem_k.shape[1])[None, :] >= active[:, None]
    return jnp.argmax(jnp.where(inactive[:, None, :], MASKED_SCORE, scores), axis=-1)


def _blend(mem_k, mem_v, target_k, target_v, eta, lf_mask, energy_scale):
    """EMA step toward the targets on the LF key band and the whole value, in float32.

    ``eta`` broadcasts to the slots' (B, Ms, Hkv, 1), or (B, Hkv, 1) with one slot per
    row; eta == 0 leaves a slot unchanged.
    """
    k32, v32 = mem_k.astype(jnp.float32), mem_v.astype(jnp.float32)
    k_lf = k32 + eta * (target_k * energy_scale - k32)
    new_k = jnp.where(lf_mask, k_lf, k32).astype(mem_k.dtype)
    new_v = (v32 + eta * (target_v - v32)).astype(mem_v.dtype)
    return new_k, new_v


def _frustrated(used: jax.Array, active: jax.Array, incoming: jax.Array) -> jax.Array:
    """All active slots in use (vacuously true with none) while data still arrives."""
    inactive = jnp.arange(used.shape[1])[None, :] >= active[:, None]
    return (jnp.all(used | inactive, axis=-1) & incoming).astype(jnp.int32)


def update_block(cfg: BankConfig, *, mem_k: jax.Array, mem_v: jax.Array, used: jax.Array,
                 active: jax.Array, eta_logit: jax.Array, cand_k: jax.Array,
                 cand_v: jax.Array, cand_unit: jax.Array, weight: jax.Array,
                 lf_dims: np.ndarray, energy_scale: float) -> SummaryUpdate:
    """Blend T weighted candidates (prefill): each slot moves toward the
    gate-weighted mean of the candidates routed to it. ``cand_unit`` is
    ``routing_keys(cand_k)``; ``weight`` (B, T) is 0 for candidates that must
    not count (gated out or padding)."""
    num_slots = mem_k.shape[1]
    idx = materialise(_route(cand_unit, mem_k, active, lf_dims))[0]          # (B, T)
    onehot = (idx[:, :, None] == jnp.arange(num_slots)).astype(jnp.float32)  # (B, T, Ms)
    weighted = onehot * weight[:, :, None].astype(jnp.float32)
    count = jnp.sum(weighted, axis=1)                                       # (B, Ms)
    sum_k = jnp.einsum("btm,bthd->bmhd", weighted, cand_k.astype(jnp.float32))
    sum_v = jnp.einsum("btm,bthd->bmhd", weighted, cand_v.astype(jnp.float32))
    denom = jnp.maximum(count, 1e-6)[:, :, None, None]
    avg_k, avg_v = sum_k / denom, sum_v / denom

    hit_slot = count > 0
    new_slot = hit_slot & ~used
    eta = jax.nn.sigmoid(eta_logit.astype(jnp.float32))[None, None, :, None]   # (1,1,Hkv,1)
    if cfg.summary_overwrite_on_insert:
        eta = jnp.where(new_slot[:, :, None, None], 1.0, eta)
    new_k, new_v = _blend(mem_k, mem_v, avg_k, avg_v, eta, band_mask(lf_dims, mem_k.shape[-1]),
                          energy_scale)
    new_k = jnp.where(hit_slot[:, :, None, None], new_k, mem_k)
    new_v = jnp.where(hit_slot[:, :, None, None], new_v, mem_v)
    used = used | hit_slot

    incoming = jnp.any(hit_slot & (jnp.arange(num_slots)[None, :] < active[:, None]), axis=-1)
    count_of = lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32)  # noqa: E731
    return SummaryUpdate(k=new_k, v=new_v, used=used,
                         frustrated=_frustrated(used, active, incoming),
                         updates=count_of(hit_slot), inserts=count_of(new_slot))


def update_one(cfg: BankConfig, *, mem_k: jax.Array, mem_v: jax.Array, used: jax.Array,
               active: jax.Array, eta_logit: jax.Array, k: jax.Array, v: jax.Array,
               gate: jax.Array, valid: jax.Array, lf_dims: np.ndarray,
               energy_scale: float) -> SummarySlotWrite:
    """Blend one evicted token per row (decode) into the slot it routes to; the
    write gate scales eta. The slot's new contents are :func:`_blend`'s for it."""
    num_slots = mem_k.shape[1]
    keep = valid & (gate >= cfg.write_gate_threshold_summary) if cfg.gated else valid
    idx = _route(routing_keys(k[:, None], lf_dims), mem_k, active, lf_dims)[:, 0]  # (B,)
    onehot = idx[:, None] == jnp.arange(num_slots)[None, :]                 # (B, Ms)

    eta = jax.nn.sigmoid(eta_logit.astype(jnp.float32))[None, :]           # (1, Hkv)
    if cfg.gated:
        eta = eta * gate[:, None].astype(jnp.float32)
    is_new = ~jnp.any(onehot & used, axis=-1)
    if cfg.summary_overwrite_on_insert:
        eta = jnp.where(is_new[:, None], 1.0, eta)
    eta = (eta * keep[:, None])[..., None]                                  # (B, Hkv, 1)
    eta, keep, is_new = materialise(eta, keep, is_new)

    rows = jnp.arange(idx.shape[0])
    new_k, new_v = _blend(mem_k[rows, idx], mem_v[rows, idx], k.astype(jnp.float32),
                          v.astype(jnp.float32), eta,
                          band_mask(lf_dims, mem_k.shape[-1]), energy_scale)
    used = used | (onehot & keep[:, None])
    as_int = lambda m: m.astype(jnp.int32)  # noqa: E731
    return SummarySlotWrite(idx=idx, k=new_k, v=new_v, used=used,
                         frustrated=_frustrated(used, active, keep),
                         updates=as_int(keep), inserts=as_int(keep & is_new))
