"""Backward kernels of the fused differential attention for Hopper (Pallas Mosaic GPU).

Given the upstream gradients of the two streams (do1 for the signal, do2 for the
noise, after the epilogue's own gradient), their log2-sum-exp2 rows and
``delta = rowsum(do * o)``, two kernels recompute the probabilities tile by tile:

* ``dq``: one CTA per (head, query tile); warpgroup 0 runs the signal stream,
  warpgroup 1 the noise stream over the same K/V tiles, which warpgroup 2
  streams in with TMA (the forward's layout). dS = P * (dP - delta), dq = dS K.
* ``dkv``: one CTA per (query head, key tile); the K/V tile stays in shared
  memory while warpgroup 2 streams the query-side tiles of both streams; each
  compute warpgroup accumulates its stream's dK = dS^T Q and dV = P^T dO.
  The per-(stream, query head) partials are summed over each KV group by XLA.

Causal masking is lower-right aligned (Lq <= Lk), as in the forward; the loops
skip tiles no query can see and mask only the diagonal ones.

Written against the jax 0.11 Mosaic GPU API; lowered for CUDA in the CPU tests,
checked against the portable backward on an H100 (the ``gpu`` tests). No key
mask: ``diff_flash_attention`` uses it for unmasked whole-tile calls (H100, L=8192:
forward+backward 0.92x of two cuDNN calls, against 0.25x with the portable
backward; benchmarks/results/NOTES.md).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .diff_flash_mgpu import (LOG2E, causal_key_tiles, load_fragment, stream_kv_tiles,
                              swizzled_tiles)

BLOCK = 64  # query and key tile of both kernels (the dkv kernel stages outputs in q slots)


def causal_query_tiles(kv_base, kv_block: int, offset: int, q_block: int, n_q: int):
    """Query tiles that see a causal key tile whose first key is ``kv_base`` (row i
    sees keys j <= i + offset): ``(first, full)``: tiles below ``first`` see none
    of it, tiles from ``first`` to ``full`` need the mask, tiles from ``full`` on
    see all of it."""
    qb = jnp.array(q_block, jnp.int32)
    first = lax.div(jnp.maximum(kv_base - offset, 0), qb)
    full = jnp.minimum(pl.cdiv(jnp.maximum(kv_base + kv_block - 1 - offset, 0), qb), n_q)
    return first, full


def _tile_iota(plgpu, dim: int) -> jax.Array:
    """Row (0) or column (1) index of a (BLOCK, BLOCK) tile, in the wgmma layout."""
    return plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), dim, layout=plgpu.Layout.WGMMA)


def mosaic_backward(q, qn, k, v, do1, do2, lse1, lse2, delta1, delta2, *, causal: bool,
                    stages: int = 2):
    """-> dq, dq_noise (B, Lq, H, Dh) in q's dtype, dk, dv (B, Lk, Hkv, Dh) float32.

    lse and delta are (B, H, Lq) float32; lse in log2 units of the scaled scores.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    args = (q, qn, k, v, do1, do2, lse1, lse2, delta1, delta2)
    b, _, lk, _, dh, group, _, _ = _Dims.of(args)
    hkv = k.shape[2]
    dq, dqn = _dq_call(plgpu, args, causal=causal, stages=stages)
    dk_parts, dv_parts = _dkv_call(plgpu, args, causal=causal, stages=stages)

    def fold(parts):  # (2, B, Lk, H, Dh) per stream and query head -> (B, Lk, Hkv, Dh)
        parts = parts.astype(jnp.float32).reshape(2, b, lk, hkv, group, dh)
        return parts.sum(axis=(0, 4))

    return dq, dqn, fold(dk_parts), fold(dv_parts)


class _Dims(NamedTuple):
    """Shape facts of one backward call (args as passed to ``mosaic_backward``)."""

    b: int
    lq: int
    lk: int
    h: int
    dh: int
    group: int
    offset: int
    dtype: Any

    @classmethod
    def of(cls, args) -> _Dims:
        (b, lq, h, dh), (lk, hkv) = args[0].shape, args[2].shape[1:3]
        return cls(b, lq, lk, h, dh, h // hkv, lk - lq, args[0].dtype)


def _dq_call(plgpu, args, *, causal: bool, stages: int):
    b, lq, lk, h, dh, group, offset, dtype = _Dims.of(args)
    n_kv = lk // BLOCK
    stages = max(1, min(stages, n_kv))
    to_log2 = dh ** -0.5 * LOG2E
    rows_layout = plgpu.Layout.WGMMA.reduce(1)

    def kernel(q_ref, qn_ref, k_ref, v_ref, do1_ref, do2_ref, lse1_ref, lse2_ref, d1_ref,
               d2_ref, dq1_ref, dq2_ref, scoped):
        smem, loaded, consumed = scoped
        q_smem2, do_smem2, k_smem, v_smem, lse_smem2, delta_smem2 = smem
        k_loaded, v_loaded, q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
        k_consumed, v_consumed = consumed
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        q_base = lax.axis_index("q_seq") * BLOCK
        rows = pl.ds(q_base, BLOCK)
        if causal:
            unmasked, kv_steps = causal_key_tiles(q_base, BLOCK, offset, BLOCK)
        else:
            kv_steps = n_kv

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            streams = ((q_ref, do1_ref, lse1_ref, d1_ref), (qn_ref, do2_ref, lse2_ref, d2_ref))
            for w, refs in enumerate(streams):
                @pl.when(wg == w)
                def _(w=w, refs=refs):
                    q_r, do_r, lse_r, d_r = refs
                    plgpu.copy_gmem_to_smem(q_r.at[batch, rows, head], q_smem2.at[w],
                                            q_loaded.at[w])
                    plgpu.copy_gmem_to_smem(do_r.at[batch, rows, head], do_smem2.at[w],
                                            do_loaded.at[w])
                    plgpu.copy_gmem_to_smem(lse_r.at[batch, head, rows], lse_smem2.at[w],
                                            lse_loaded.at[w])
                    plgpu.copy_gmem_to_smem(d_r.at[batch, head, rows], delta_smem2.at[w],
                                            delta_loaded.at[w])

            for barrier in (q_loaded, do_loaded, lse_loaded, delta_loaded):
                plgpu.barrier_wait(barrier.at[wg])
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            lse = load_fragment(plgpu, lse_smem2.at[wg], rows_layout)
            delta = load_fragment(plgpu, delta_smem2.at[wg], rows_layout)
            dq_acc = plgpu.layout_cast(jnp.full((BLOCK, dh), 0, jnp.float32),
                                       plgpu.Layout.WGMMA)

            def step_body(step, dq_acc, masked: bool):
                slot = lax.rem(step, jnp.array(stages, step.dtype))
                plgpu.barrier_wait(k_loaded.at[slot])

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                p = jnp.exp2(s * to_log2 - lax.broadcast_in_dim(lse, s.shape, [0]))
                if masked:
                    q_pos = _tile_iota(plgpu, 0)
                    k_pos = _tile_iota(plgpu, 1)
                    p = jnp.where(q_pos + (q_base + offset) >= k_pos + step * BLOCK, p, 0.0)
                plgpu.barrier_wait(v_loaded.at[slot])

                def grad_p(acc_ref):
                    plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                dp = pl.run_scoped(grad_p, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                plgpu.barrier_arrive(v_consumed.at[slot])
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

                def grad_q(acc_ref):
                    plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

                dq_acc = pl.run_state(grad_q)(plgpu.ACC.init(dq_acc))
                plgpu.barrier_arrive(k_consumed.at[slot])
                return dq_acc

            if causal:
                dq_acc = lax.fori_loop(0, unmasked, functools.partial(step_body, masked=False),
                                       dq_acc)
                dq_acc = lax.fori_loop(unmasked, kv_steps,
                                       functools.partial(step_body, masked=True), dq_acc)
            else:
                dq_acc = lax.fori_loop(0, kv_steps, functools.partial(step_body, masked=False),
                                       dq_acc)
            q_smem[...] = (dq_acc * dh ** -0.5).astype(dtype)
            plgpu.commit_smem()
            for w, dst in enumerate((dq1_ref, dq2_ref)):
                pl.when(wg == w)(functools.partial(
                    plgpu.copy_smem_to_gmem, q_smem2.at[w], dst.at[batch, rows, head]))
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 2)(functools.partial(
            stream_kv_tiles, plgpu, (k_ref, v_ref), (k_smem, v_smem), (k_loaded, v_loaded),
            (k_consumed, v_consumed), batch=batch,
            kv_head=lax.div(head, jnp.array(group, head.dtype)),
            block=BLOCK, stages=stages, steps=kv_steps))

    def entry(*refs):
        tiled = swizzled_tiles(plgpu)
        smem = [plgpu.SMEM((2, BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((2, BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((stages, BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((stages, BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((2, BLOCK), jnp.float32),
                plgpu.SMEM((2, BLOCK), jnp.float32)]
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages))
            + (plgpu.Barrier(num_barriers=2),) * 4,
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            collective_axes="wg")

    return plgpu.kernel(
        entry, out_type=[jax.ShapeDtypeStruct((b, lq, h, dh), dtype)] * 2,
        grid=(h, lq // BLOCK, b), grid_names=("heads", "q_seq", "batch"), num_threads=3,
        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)


def _dkv_call(plgpu, args, *, causal: bool, stages: int):
    b, lq, lk, h, dh, group, offset, dtype = _Dims.of(args)
    n_q = lq // BLOCK
    stages = max(1, min(stages, n_q))
    to_log2 = dh ** -0.5 * LOG2E
    cols_layout = plgpu.Layout.WGMMA.reduce(0)

    def kernel(q_ref, qn_ref, k_ref, v_ref, do1_ref, do2_ref, lse1_ref, lse2_ref, d1_ref,
               d2_ref, dk_ref, dv_ref, scoped):
        smem, loaded, consumed = scoped
        q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem = smem
        kv_loaded, q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        kv_base = lax.axis_index("kv_seq") * BLOCK
        keys = pl.ds(kv_base, BLOCK)
        if causal:
            first, full = causal_query_tiles(kv_base, BLOCK, offset, BLOCK, n_q)
        else:
            first, full = 0, 0

        def slot_of(step):
            return lax.rem(step - first, jnp.array(stages, jnp.int32))

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            plgpu.barrier_wait(kv_loaded.at[0])
            plgpu.barrier_wait(kv_loaded.at[1])
            zeros = jnp.full((BLOCK, dh), 0, jnp.float32)
            dk_acc = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
            dv_acc = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)

            def step_body(step, carry, masked: bool):
                dk_acc, dv_acc = carry
                slot = slot_of(step)
                at = wg * stages + slot
                q_tile, do_tile = q_smem.at[wg, slot], do_smem.at[wg, slot]
                plgpu.barrier_wait(q_loaded.at[at])
                plgpu.barrier_wait(lse_loaded.at[at])

                def scores_t(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, q_tile.transpose((1, 0)))
                    return acc_ref[...]

                s_t = pl.run_scoped(scores_t, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                lse = load_fragment(plgpu, lse_smem.at[wg, slot], cols_layout)
                p_t = jnp.exp2(s_t * to_log2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                if masked:
                    k_pos = _tile_iota(plgpu, 0)
                    q_pos = _tile_iota(plgpu, 1)
                    p_t = jnp.where(k_pos + kv_base <= q_pos + (step * BLOCK + offset),
                                    p_t, 0.0)
                plgpu.barrier_wait(do_loaded.at[at])

                def values_and_grad_p(refs):  # two wgmmas, one wait
                    dv_acc_ref, dp_t_ref = refs
                    plgpu.wgmma(dv_acc_ref, p_t.astype(dtype), do_tile)
                    plgpu.wgmma(dp_t_ref, v_smem, do_tile.transpose((1, 0)))

                zeros_t = plgpu.layout_cast(jnp.full((BLOCK, BLOCK), 0, jnp.float32),
                                            plgpu.Layout.WGMMA)
                dv_acc, dp_t = pl.run_state(values_and_grad_p)(
                    (plgpu.ACC.init(dv_acc), plgpu.ACC.init(zeros_t)))
                plgpu.barrier_wait(delta_loaded.at[at])
                delta = load_fragment(plgpu, delta_smem.at[wg, slot], cols_layout)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))

                def grad_k(acc_ref):
                    plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_tile)

                dk_acc = pl.run_state(grad_k)(plgpu.ACC.init(dk_acc))
                plgpu.barrier_arrive(consumed.at[at])
                return dk_acc, dv_acc

            carry = (dk_acc, dv_acc)
            if causal:
                carry = lax.fori_loop(first, full, functools.partial(step_body, masked=True),
                                      carry)
            carry = lax.fori_loop(full, n_q, functools.partial(step_body, masked=False), carry)
            dk_acc, dv_acc = carry
            # The stream's own first q/do slots are free now: stage the outputs there.
            out_k, out_v = q_smem.at[wg, 0], do_smem.at[wg, 0]
            out_k[...] = (dk_acc * dh ** -0.5).astype(dtype)
            out_v[...] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_k, dk_ref.at[wg, batch, keys, head])
            plgpu.copy_smem_to_gmem(out_v, dv_ref.at[wg, batch, keys, head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.array(group, head.dtype))
            plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem, kv_loaded.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem, kv_loaded.at[1])
            streams = ((q_ref, do1_ref, lse1_ref, d1_ref), (qn_ref, do2_ref, lse2_ref, d2_ref))

            def fetch(step, slot):
                rows = pl.ds(step * BLOCK, BLOCK)
                for w, (q_r, do_r, lse_r, d_r) in enumerate(streams):
                    at = w * stages + slot
                    plgpu.copy_gmem_to_smem(q_r.at[batch, rows, head], q_smem.at[w, slot],
                                            q_loaded.at[at])
                    plgpu.copy_gmem_to_smem(do_r.at[batch, rows, head], do_smem.at[w, slot],
                                            do_loaded.at[at])
                    plgpu.copy_gmem_to_smem(lse_r.at[batch, head, rows], lse_smem.at[w, slot],
                                            lse_loaded.at[at])
                    plgpu.copy_gmem_to_smem(d_r.at[batch, head, rows],
                                            delta_smem.at[w, slot], delta_loaded.at[at])

            for i in range(stages):
                pl.when(first + i < n_q)(functools.partial(fetch, first + i, i))

            @pl.loop(first, n_q - stages)
            def _(step):
                slot = slot_of(step)
                plgpu.barrier_wait(consumed.at[slot])
                plgpu.barrier_wait(consumed.at[stages + slot])
                fetch(step + stages, slot)

    def entry(*refs):
        tiled = swizzled_tiles(plgpu)
        smem = [plgpu.SMEM((2, stages, BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((2, stages, BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((BLOCK, dh), dtype, transforms=tiled),
                plgpu.SMEM((2, stages, BLOCK), jnp.float32),
                plgpu.SMEM((2, stages, BLOCK), jnp.float32)]
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), smem,
            (plgpu.Barrier(num_barriers=2),) + (plgpu.Barrier(num_barriers=2 * stages),) * 4,
            plgpu.Barrier(num_arrivals=1, num_barriers=2 * stages),
            collective_axes="wg")

    parts = jax.ShapeDtypeStruct((2, b, lk, h, dh), dtype)
    return plgpu.kernel(
        entry, out_type=[parts, parts], grid=(h, lk // BLOCK, b),
        grid_names=("heads", "kv_seq", "batch"), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
