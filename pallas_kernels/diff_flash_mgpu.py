"""Fused differential flash attention forward for Hopper (Pallas Mosaic GPU).

One CTA owns ``block_q`` query positions of one head and runs three
warpgroups, FlashAttention-3 style:

* warpgroup 2 streams the K/V tiles of the head's KV group into shared memory
  with TMA, ``stages`` tiles ahead;
* warpgroup 0 runs the signal stream (``q``) and warpgroup 1 the noise stream
  (``q_noise``) over the *same* shared-memory tiles, each with its own online
  softmax on wgmma accumulators. A schedule barrier makes the two take turns on
  the tensor cores, so one's softmax hides under the other's matmuls.

K and V are read from memory once for both streams. At the end the noise
warpgroup hands its normalised output to the signal warpgroup through shared
memory, which applies ``signal - lambda * noise`` and the head RMSNorm in
registers and writes the result once.

Supported here: bf16/fp16, head_dim 64 or 128, causal aligned to the lower
right (Lq <= Lk) or not causal, and an optional additive key bias (B, Lk): 0 for
a visible key, ``MASKED_SCORE`` for a masked one (the bank's unused slots, and
the padding that ``diff_flash.diff_flash_attention`` adds to reach whole tiles).
The memory warpgroup streams the bias tile with K/V. A row that sees no key
outputs zeros and log-sum-exp +inf, as the portable kernel does. The residuals
(o1, o2, log2-sum-exp2 per row) have the portable kernel's layout, so either
backward serves.

Written against the jax 0.11 Mosaic GPU API; traced and lowered for CUDA in the
CPU tests, run only on a Hopper GPU (the ``gpu`` tests).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .shared import MASKED_SCORE

LOG2E = math.log2(math.e)


class MosaicConfig(NamedTuple):
    """Static choices of one call."""

    block_q: int
    block_kv: int
    stages: int
    causal: bool
    head_norm: bool
    eps: float
    heavy_first: bool = True  # causal: launch the longest query tiles first (less tail)
    offset: int | None = None  # query i sits at key i + offset; None: Lk - Lq of the inputs


def heavy_first_pays(q_len: int) -> bool:
    """Measured on an H100 (benchmarks/results/tune_mosaic_h100.json, in git history
    at 2d86af9; NOTES.md lists it): longest tiles first gains 2% at L=8192 and 1% at
    32768 but loses 20% at 2048."""
    return q_len >= 4096


def load_fragment(plgpu, ref, layout):
    """``plgpu.load`` across versions: jax 0.11 takes the ref alone (an index is
    deprecated), jax 0.10 (the CPU test machines, which lower the kernel for
    CUDA without running it) requires an index."""
    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:
        return plgpu.load(ref, (), layout=layout)


def causal_key_tiles(q_base, q_block: int, offset: int, kv_block: int):
    """Key tiles of a causal query tile whose first row is ``q_base`` (row i sees
    keys j <= i + offset): ``(unmasked, steps)``: tiles below ``unmasked`` are
    visible to every row (no mask), tiles from there to ``steps`` need the mask."""
    kv = jnp.array(kv_block, jnp.int32)
    return lax.div(q_base + offset, kv), pl.cdiv(q_base + q_block + offset, kv)


def swizzled_tiles(plgpu):
    """Shared-memory layout of every wgmma operand tile: 8x64 tiles, 128-byte swizzle."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def stream_kv_tiles(plgpu, kv_refs, kv_smem, loaded, consumed, *, batch, kv_head,
                    block: int, stages: int, steps) -> None:
    """The memory warpgroup of the forward and dq kernels: TMA the first ``steps``
    K/V tiles of one KV head into a ring of ``stages`` shared-memory slots. Each
    ref is refilled as soon as its own ``consumed`` barrier says both compute
    warpgroups are done with its slot (K frees a slot before V does). A (B, Lk)
    ref after K and V (the key bias) is streamed tile by tile alongside and
    refilled after V's barrier. ``steps`` is a Python int (static loop bounds)
    or, when causal, a traced count (>= 1)."""
    plgpu.set_max_registers(40, action="decrease")

    def fetch(step, slot, ref, smem, barrier):
        keys = pl.ds(step * block, block)
        tile = (batch, keys, kv_head) if len(ref.shape) == 4 else (batch, keys)
        plgpu.copy_gmem_to_smem(ref.at[tile], smem.at[slot], barrier.at[slot])

    tiles = list(zip(kv_refs, kv_smem, loaded))
    for i in range(stages):
        for tile in tiles:
            pl.when(i < steps)(functools.partial(fetch, i, i, *tile))

    @pl.loop(0, steps - stages)
    def _(step):
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        for i, tile in enumerate(tiles):
            if i < len(consumed):
                plgpu.barrier_wait(consumed[i].at[slot])
            fetch(step + stages, slot, *tile)


def mosaic_blocks(head_dim: int) -> tuple[int, int]:
    """(block_q, block_kv) per head_dim: the shapes that fit 227 KB of shared memory
    with two K/V stages and keep both accumulators in registers."""
    return 64, (256 if head_dim <= 64 else 128)


def mosaic_supported(q: jax.Array, k: jax.Array, *, causal: bool) -> bool:
    """Whether this call can run on the Hopper kernel (else the portable one).
    Ragged lengths are padded to whole tiles and masked by the caller."""
    if jax.default_backend() != "gpu":
        return False
    if getattr(jax.devices()[0], "compute_capability", "") != "9.0":
        return False
    lq, dh = q.shape[1], q.shape[3]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and dh in (64, 128)
            and (not causal or lq <= k.shape[1]))


def mosaic_forward(cfg: MosaicConfig, q: jax.Array, qn: jax.Array, k: jax.Array,
                   v: jax.Array, lam_bhl: jax.Array, w: jax.Array,
                   key_bias: jax.Array | None = None, *, residuals: bool):
    """o (B, Lq, H, Dh) and, with ``residuals``, (o1, o2, lse1, lse2).

    Lq must be a multiple of ``block_q`` and Lk of ``block_kv``. lam_bhl is
    lambda laid out (B, H, Lq) float32; w the norm weight (Dh,) float32;
    key_bias (B, Lk) float32, 0 or ``MASKED_SCORE``. lse is log2-sum-exp2 of the
    scaled scores per (B, H, Lq) row.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    offset = lk - lq if cfg.offset is None else cfg.offset
    key_masked = key_bias is not None
    dtype = q.dtype
    block_q, block_kv = cfg.block_q, cfg.block_kv
    n_kv = lk // block_kv
    stages = max(1, min(cfg.stages, n_kv))
    score_to_log2 = dh ** -0.5 * LOG2E  # softmax scale folded into exp2's argument
    wgmma_rows = plgpu.Layout.WGMMA.reduce(1)
    wgmma_cols = plgpu.Layout.WGMMA.reduce(0)

    def kernel(q_ref, qn_ref, k_ref, v_ref, lam_ref, w_ref, bias_ref, o_ref, res_refs, scoped):
        smem, loaded, consumed, turn, noise_ready = scoped
        qo_smem2, k_smem, v_smem, lse_smem2, lam_smem, w_smem, bias_smem = smem
        k_loaded, v_loaded, q_loaded, epi_loaded, bias_loaded = loaded
        k_consumed, v_consumed = consumed
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        q_tile = lax.axis_index("q_seq")
        if cfg.causal and cfg.heavy_first:
            q_tile = lq // block_q - 1 - q_tile
        q_base = q_tile * block_q
        rows = pl.ds(q_base, block_q)
        if cfg.causal:  # keys beyond the last row's position are never needed
            unmasked, kv_steps = causal_key_tiles(q_base, block_q, offset, block_kv)
            # Padded query rows (past Lq) would reach past the last key tile.
            kv_steps = jnp.minimum(kv_steps, n_kv)
        else:  # a Python int: Mosaic wants static loop bounds, not a constant array
            kv_steps = n_kv

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]

            @pl.when(wg == 0)
            def _():
                plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], qo_smem2.at[0],
                                        q_loaded.at[0])
                plgpu.copy_gmem_to_smem(lam_ref.at[batch, head, rows], lam_smem,
                                        epi_loaded.at[0])
                plgpu.copy_gmem_to_smem(w_ref, w_smem, epi_loaded.at[1])

            @pl.when(wg == 1)
            def _():
                plgpu.copy_gmem_to_smem(qn_ref.at[batch, rows, head], qo_smem2.at[1],
                                        q_loaded.at[1])

            plgpu.barrier_wait(q_loaded.at[wg])
            m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), wgmma_rows)
            l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), wgmma_rows)
            acc = plgpu.layout_cast(jnp.full((block_q, dh), 0, jnp.float32),
                                    plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_loaded.at[0])  # kv_steps >= 1 always
            pl.when(wg == 1)(take_turn)

            def kv_step_body(step, carry, diagonal: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(step, jnp.array(stages, step.dtype))

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), jnp.float32))
                if key_masked:  # read before k_consumed: that frees the slot's bias too
                    plgpu.barrier_wait(bias_loaded.at[slot])
                    bias = load_fragment(plgpu, bias_smem.at[slot], wgmma_cols)
                    s = s + lax.broadcast_in_dim(bias, s.shape, [1])
                plgpu.barrier_arrive(k_consumed.at[slot])
                if diagonal:  # the causal boundary crosses this tile
                    q_pos = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0,
                                                   layout=plgpu.Layout.WGMMA)
                    k_pos = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                                   layout=plgpu.Layout.WGMMA)
                    s = jnp.where(q_pos + (q_base + offset) >= k_pos + step * block_kv,
                                  s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * score_to_log2)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * score_to_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_wait(turn)  # tensor cores free

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = step + 1

                    @pl.when(nxt < kv_steps)
                    def _():
                        plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.array(stages,
                                                                             nxt.dtype))])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            if cfg.causal:
                # Tiles wholly at or before the first row's position need no mask.
                carry = lax.fori_loop(0, unmasked, functools.partial(kv_step_body,
                                                                     diagonal=False), carry)
                carry = lax.fori_loop(unmasked, kv_steps, functools.partial(kv_step_body,
                                                                            diagonal=True), carry)
            else:
                carry = lax.fori_loop(0, kv_steps, functools.partial(kv_step_body,
                                                                     diagonal=False), carry)
            acc, m_i, l_i = carry
            pl.when(wg == 0)(take_turn)
            lse = m_i + jnp.log(l_i) * LOG2E
            if key_masked:
                # A row whose running max is still at the bias level saw only masked
                # keys (real scores cannot come near it): zeros, and lse +inf.
                seen = m_i > MASKED_SCORE * score_to_log2 * 0.5
                inv_l = jnp.where(seen, 1.0 / l_i, 0.0)
                lse = jnp.where(seen, lse, jnp.inf)
            else:  # every row sees key 0 (causal, Lq <= Lk), so l_i > 0
                inv_l = 1.0 / l_i
            out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])

            def write(value, dst):
                qo_smem[...] = value.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(qo_smem, dst.at[batch, rows, head])

            def write_lse(dst):
                lse_smem = lse_smem2.at[wg]
                lse_smem[...] = lse
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(lse_smem, dst.at[batch, head, rows])

            @pl.when(wg == 1)
            def _noise():
                qo_smem[...] = out.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_arrive(noise_ready)
                if residuals:
                    plgpu.copy_smem_to_gmem(qo_smem, res_refs[1].at[batch, rows, head])
                    write_lse(res_refs[3])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 0)
            def _signal():
                if residuals:
                    write(out, res_refs[0])
                    write_lse(res_refs[2])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.barrier_wait(noise_ready)
                noise = load_fragment(plgpu, qo_smem2.at[1], plgpu.Layout.WGMMA)
                plgpu.barrier_wait(epi_loaded.at[0])
                lam = load_fragment(plgpu, lam_smem, wgmma_rows)
                o = out - lax.broadcast_in_dim(lam, out.shape, [0]) * noise.astype(jnp.float32)
                if cfg.head_norm:
                    mean_sq = (o * o).sum(axis=1) * (1.0 / dh)
                    o = o * lax.broadcast_in_dim(lax.rsqrt(mean_sq + cfg.eps), o.shape, [0])
                    plgpu.barrier_wait(epi_loaded.at[1])
                    weight = load_fragment(plgpu, w_smem, wgmma_cols)
                    o = o * lax.broadcast_in_dim(weight, o.shape, [1])
                write(o, o_ref)
                plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 2)(functools.partial(
            stream_kv_tiles, plgpu, (k_ref, v_ref, bias_ref)[:2 + key_masked],
            (k_smem, v_smem, bias_smem), (k_loaded, v_loaded, bias_loaded),
            (k_consumed, v_consumed), batch=batch,
            kv_head=lax.div(head, jnp.array(group, head.dtype)),
            block=block_kv, stages=stages, steps=kv_steps))

    def entry(*refs):
        q_ref, qn_ref, k_ref, v_ref, lam_ref, w_ref, *refs = refs
        bias_ref = refs.pop(0) if key_masked else None
        o_ref, *res_refs = refs
        tiled = swizzled_tiles(plgpu)
        smem = [
            plgpu.SMEM((2, block_q, dh), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, dh), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, dh), dtype, transforms=tiled),
            plgpu.SMEM((2, block_q), jnp.float32) if residuals else None,
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.SMEM((dh,), jnp.float32),
            plgpu.SMEM((stages, block_kv), jnp.float32) if key_masked else None,
        ]
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, qn_ref, k_ref, v_ref, lam_ref, w_ref, bias_ref, o_ref,
                                   res_refs, scoped),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=stages) if key_masked else None),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=1),
            collective_axes="wg",
        )

    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if residuals:
        out_type += [jax.ShapeDtypeStruct(q.shape, dtype)] * 2
        out_type += [jax.ShapeDtypeStruct((b, h, lq), jnp.float32)] * 2
    outs = plgpu.kernel(
        entry, out_type=out_type, grid=(h, lq // block_q, b),
        grid_names=("heads", "q_seq", "batch"), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, qn, k, v, lam_bhl, w, *([key_bias] if key_masked else []))
    return tuple(outs) if residuals else outs[0]
