"""CoDA-GQA-L: bounded-memory differential attention (the reference's CoDAGQALandmarkPerf2).

``prefill`` runs a ``lax.scan`` over fixed-size blocks (a ragged tail is padded
and masked) and ``step`` decodes one token; both are jit-compiled once per
shape and never synchronise with the host. See ``bank_writes.py`` for the write rules.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from . import bank_layout, bank_writes, runner
from .config import (AttentionConfig, BankConfig, ExactEviction, HeadNormMode, LfBand, MemInit,
                     WritePolicy)
from .primitives import apply_rope, materialise
from .projections import AttentionCore, join_linears, joined_products, linear
from .state import POSITION_DTYPE, BankState, tree_bytes


class CoDAGQALandmark(AttentionCore):
    """Bounded differential attention over ``[recent W | exact Me | summary Ms]`` slots.

    Keywords and defaults are the reference's. Additions: ``head_dim`` (when it
    is not ``embed_dim // num_heads``, as in Qwen3), ``qkv_bias``/``o_bias``,
    ``differential`` (False: lambda fixed at 0 and no noise stream, i.e. plain
    GQA over the same bounded buffer), ``lf_band`` (``"reference"``: key dims
    ``[Dh/2:]`` as the reference; ``"frequency"``: the slowest RoPE pairs under
    either pairing), ``write_gate_lookahead`` (0 as the reference; N: a token's write
    gate, when it is evicted, is the largest of its own and the next N tokens'),
    ``exact_eviction`` (``"lru"`` as the reference; ``"gate"``: a novel token replaces
    the exact slot of lowest write gate, if its own is higher), ``sink_tokens`` (0 as
    the reference; N: a document's first N tokens stay in the exact bank for good,
    with ``exact_eviction="gate"``), ``max_key_distance`` (None as the reference; N:
    exact-bank keys more than N positions before the query are read as if exactly N
    away, for documents longer than the model's training positions) and
    ``implementation`` (``"xla"``, ``"cudnn"``, ``"pallas"`` or None: Pallas on GPU, XLA
    elsewhere).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, window: int,
                 num_landmarks_exact: int, num_landmarks_summary: int,
                 rope_base: float = 10_000.0, lambda_init_bias: float = -6.0,
                 theta_init: float = math.pi / 2,
                 write_policy: WritePolicy = "gated", write_gate_init_bias: float = -2.0,
                 write_gate_threshold_exact: float = 0.10,
                 write_gate_threshold_summary: float = 0.05,
                 exact_match_threshold: float = 0.90, exact_novelty_threshold: float = 0.70,
                 exact_refresh_on_hit: bool = False, exact_candidates_per_block: int = 8,
                 summary_eta_init_logit: float = -3.0, summary_candidates_per_block: int = 64,
                 summary_overwrite_on_insert: bool = True,
                 min_landmarks_exact: int | None = None, max_landmarks_exact: int | None = None,
                 min_landmarks_summary: int | None = None,
                 max_landmarks_summary: int | None = None,
                 expansion_t_max: int = 1_000_000, mem_init: MemInit = "random_normal",
                 mask_unused_memory: bool = True, detach_evicted: bool = True,
                 eps: float = 1e-6, collect_metrics: bool = False,
                 head_norm_mode: HeadNormMode = "full", rope_interleaved: bool = True,
                 head_dim: int | None = None, differential: bool = True,
                 lf_band: LfBand = "reference", write_gate_lookahead: int = 0,
                 exact_eviction: ExactEviction = "lru", sink_tokens: int = 0,
                 max_key_distance: int | None = None, qkv_bias: bool = False, o_bias: bool = False,
                 rope_scaling: dict | None = None, qk_norm: bool = False,
                 qk_norm_eps: float = 1e-6, param_dtype=jnp.float32,
                 implementation: str | None = None, rngs: nnx.Rngs):
        attn_cfg = AttentionConfig(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, rope_base=rope_base, rope_interleaved=rope_interleaved,
            rope_scaling=rope_scaling, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
            head_norm_mode=head_norm_mode, eps=eps, differential=differential,
            qkv_bias=qkv_bias, o_bias=o_bias)
        self.bank_cfg = BankConfig(
            window=window, num_landmarks_exact=num_landmarks_exact,
            num_landmarks_summary=num_landmarks_summary, write_policy=write_policy,
            write_gate_threshold_exact=write_gate_threshold_exact,
            write_gate_threshold_summary=write_gate_threshold_summary,
            exact_match_threshold=exact_match_threshold,
            exact_novelty_threshold=exact_novelty_threshold,
            exact_refresh_on_hit=exact_refresh_on_hit,
            exact_candidates_per_block=exact_candidates_per_block,
            summary_candidates_per_block=summary_candidates_per_block,
            summary_overwrite_on_insert=summary_overwrite_on_insert,
            min_landmarks_exact=min_landmarks_exact, max_landmarks_exact=max_landmarks_exact,
            min_landmarks_summary=min_landmarks_summary,
            max_landmarks_summary=max_landmarks_summary, expansion_t_max=expansion_t_max,
            mem_init=mem_init, mask_unused_memory=mask_unused_memory,
            detach_evicted=detach_evicted, collect_metrics=collect_metrics, lf_band=lf_band,
            write_gate_lookahead=write_gate_lookahead, exact_eviction=exact_eviction,
            sink_tokens=sink_tokens, max_key_distance=max_key_distance)
        super().__init__(attn_cfg, lambda_init_bias=lambda_init_bias, theta_init=theta_init,
                         param_dtype=param_dtype, implementation=implementation, rngs=rngs)
        self.write_proj = linear(
            embed_dim, 1, bias=True, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.initializers.zeros,
            bias_init=nnx.initializers.constant(write_gate_init_bias))
        self.summary_eta_logit = nnx.Param(
            jnp.full((num_kv_heads,), summary_eta_init_logit, param_dtype))

    # ------------------------------------------------------------------ state
    @property
    def layout(self) -> bank_layout.BankLayout:
        return bank_layout.bank_layout(self.bank_cfg, self.num_kv_heads, self.head_dim,
                                  self.attn_cfg.rope_interleaved)

    @property
    def window(self) -> int:
        return self.bank_cfg.window

    def init_state(self, batch_size: int, dtype=jnp.float32, *, key: jax.Array | None = None,
                   mem_init: MemInit | None = None) -> BankState:
        """A fresh state for ``batch_size`` documents; ``key`` seeds ``random_normal`` banks.

        ``mem_init`` overrides the layer's (the reference's trainer uses ``"zeros"``).
        """
        bank_layout.check_state_request(batch_size, dtype)
        return bank_layout.init_state(self.layout, int(batch_size), dtype, key,
                                 mem_init or self.bank_cfg.mem_init)

    def cache_bytes(self, *, batch_size: int, dtype=jnp.bfloat16) -> int:
        """Bytes of the whole state (every leaf) for ``batch_size`` documents."""
        shapes = bank_layout.state_shapes(self.layout, int(batch_size), jnp.dtype(dtype))
        return tree_bytes(shapes)

    def check_room(self, state: BankState, needed, *, what: str) -> None:
        """A bounded state has room for any number of tokens (see ``runner.Runnable``)."""

    def check_state(self, state: BankState, batch_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first leaf whose shape does not fit this layer."""
        if not isinstance(state, BankState):
            raise ValueError(f"expected a BankState, got {type(state).__name__}")
        batch = state.batch_size if batch_size is None else batch_size
        expected = bank_layout.state_shapes(self.layout, int(batch), jnp.dtype(state.k_buf.dtype))
        exp_leaves = jax.tree_util.tree_leaves_with_path(expected)
        got_leaves = jax.tree.leaves(state)
        if len(exp_leaves) != len(got_leaves):
            raise ValueError(
                "state does not match this layer: "
                f"collect_metrics={self.bank_cfg.collect_metrics} and max_key_distance="
                f"{self.bank_cfg.max_key_distance}, but the state "
                f"{'has' if state.metrics is not None else 'lacks'} metrics and "
                f"{'has' if state.exact_pos is not None else 'lacks'} exact_pos")
        for (path, exp), got in zip(exp_leaves, got_leaves):
            if tuple(exp.shape) != tuple(got.shape):
                name = jax.tree_util.keystr(path)
                raise ValueError(
                    f"state does not match this layer: {name} has shape {tuple(got.shape)}, "
                    f"expected {tuple(exp.shape)} (window={self.window}, "
                    f"exact={self.bank_cfg.num_exact}, summary={self.bank_cfg.num_summary}, "
                    f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                    f"batch={batch})")

    # --------------------------------------------------------------- compute
    def write_gate_logit(self, x: jax.Array) -> jax.Array:
        """The write gate before its sigmoid, per token of x (B, L, D) -> (B, L),
        float32: what a supervised gate loss trains (``train/steps.py``)."""
        return self.write_proj(x)[..., 0].astype(jnp.float32)

    def _write_gate(self, x: jax.Array) -> jax.Array:
        return self._write_gate_of(self.write_proj(x))

    def _write_gate_of(self, logits: jax.Array) -> jax.Array:
        """The write gate (B, L) from ``write_proj``'s output (B, L, 1)."""
        if not self.bank_cfg.gated:
            return jnp.ones(logits.shape[:-1], jnp.float32)
        return self.gate_of(logits[..., 0])

    def input_linears(self) -> list[nnx.Linear]:
        """q, k, v, the cancellation gate's projection, then the write gate's."""
        return [*super().input_linears(), self.write_proj]

    def _gates(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array]:
        """(lambda (B, L, H) or None, write gate (B, L)), float32. With both
        projections present, one matmul reads the prompt once instead of twice."""
        if self.lambda_proj is None or not self.bank_cfg.gated:
            return self.cancellation_gate(x), self._write_gate(x)
        gates = [self.lambda_proj, self.write_proj]
        lam, write = joined_products(x, gates, join_linears(gates))
        return self.gate_of(lam), self.gate_of(write[..., 0])

    def _near_keys(self, keys: jax.Array, exact_pos: jax.Array | None, query_pos: jax.Array
                   ) -> jax.Array:
        """``keys`` (B, ..., Lbuf, Hkv, Dh) of a buffer whose exact slots hold tokens at
        ``exact_pos`` (B, ..., Me), read from ``query_pos`` (B, ...): with
        ``max_key_distance``, each exact key farther away than that is rotated forward
        to that distance (RoPE's rotations compose: rotating a key at position p by d
        gives it at p + d); ``keys`` unchanged otherwise."""
        limit = self.bank_cfg.max_key_distance
        if limit is None or exact_pos is None:
            return keys
        exact = self.layout.exact_slice
        shift = jnp.maximum(query_pos[..., None] - limit - exact_pos, 0)

        def moved(keys):
            turned = apply_rope(keys[..., exact, :, :], shift, self.inv_freq,
                                interleaved=self.attn_cfg.rope_interleaved)
            return jnp.concatenate([keys[..., :exact.start, :, :], turned,
                                    keys[..., exact.stop:, :, :]], axis=-3)

        # Documents shorter than the limit (most) skip the copy of the keys.
        return jax.lax.cond(jnp.any(shift > 0), moved, lambda keys: keys, keys)

    def _visible(self, allowed: jax.Array) -> jax.Array:
        """Key mask of buffer slots (B, ..., S): the used ones, or every slot when
        ``mask_unused_memory=False``."""
        return allowed if self.bank_cfg.mask_unused_memory else jnp.ones_like(allowed)

    @staticmethod
    def segment_positions(pos: jax.Array, length: int) -> jax.Array:
        """Positions (B, L) of a segment of ``length`` tokens read into a state at
        ``pos`` (B,): a row's valid tokens sit at pos, pos + 1, ..."""
        return pos[:, None] + jnp.arange(length, dtype=POSITION_DTYPE)[None, :]

    def segment_projections(self, x: jax.Array, state: BankState,
                            rope: tuple[jax.Array, jax.Array] | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None,
                                       jax.Array]:
        """(q, k, v, lambda, write gate) of a whole segment at once (large matmuls,
        fewer kernels per block); ``rope``: the tables of its
        :meth:`segment_positions` (:meth:`rope`), else computed here."""
        positions = self.segment_positions(state.pos, x.shape[1])
        q = self.project_q(x, positions, rope)
        k, v = self.project_kv(x, positions, rope)
        lam, write_gate = self._gates(x)
        return q, k, v, lam, write_gate

    # ------------------------------------------------- pure functions (runner.py)
    @property
    def output_dim(self) -> int:
        return self.embed_dim

    def prefill_segment(self, x: jax.Array, lengths: jax.Array, state: BankState, *,
                        block_size: int, training: bool, unroll: int | bool,
                        last_only: bool = False,
                        rope: tuple[jax.Array, jax.Array] | None = None
                        ) -> tuple[jax.Array, BankState]:
        """One segment of whole blocks x (B, L, D), its first ``lengths`` (B,) tokens
        valid: -> (y (B, L, D), or (B, 1, D) at each row's last valid token with
        ``last_only``; the state after it). ``rope`` as for
        :meth:`segment_projections`. Pure: what training differentiates."""
        batch, seg_len, _ = x.shape
        n_blocks = seg_len // block_size
        q, k, v, lam, write_gate = self.segment_projections(x, state, rope)
        # The bank writes never read attention outputs: write the whole
        # segment first, keeping the buffer each block saw; then every block's
        # attention is one batched call (one kernel launch, the full GPU).
        before = state.pos
        state, (seen_k, seen_v, seen_allowed, seen_exact_pos) = bank_writes.write_segment(
            self.layout, state, k=k, v=v, gate=write_gate, lengths=lengths,
            block_size=block_size, eta_logit=self.summary_eta_logit[...], training=training,
            unroll=unroll)

        # One attention row per (document, block): [buffer it saw | its block],
        # lower-right causal, unused slots and padding masked.
        rows = batch * n_blocks
        as_rows = lambda a: a.reshape(rows, -1, *a.shape[3:])  # noqa: E731  (B, n, T, ...)
        by_block = lambda a: a.reshape(batch, n_blocks, block_size, *a.shape[2:])  # noqa: E731
        valid = jnp.arange(seg_len)[None, :] < lengths[:, None]                 # (B, L)
        # Each block reads the bank from its last valid token.
        block_ends = jnp.minimum(block_size * jnp.arange(1, n_blocks + 1)[None, :],
                                 lengths[:, None])
        seen_k = self._near_keys(seen_k, seen_exact_pos, before[:, None] + block_ends - 1)
        keys = as_rows(jnp.concatenate([seen_k, by_block(k).astype(seen_k.dtype)], axis=2))
        values = as_rows(jnp.concatenate([seen_v, by_block(v).astype(seen_v.dtype)], axis=2))
        key_mask = as_rows(jnp.concatenate([self._visible(seen_allowed), by_block(valid)], axis=2))
        heads = self.mix_heads(
            as_rows(by_block(q)), keys.astype(q.dtype), values.astype(q.dtype),
            None if lam is None else as_rows(by_block(lam)), causal=True, key_mask=key_mask)
        heads = heads.reshape(q.shape)
        if training:  # padded rows' values never reach o_proj's weight gradient
            heads = jnp.where(valid[..., None, None], heads, 0)
        y = jnp.where(valid[..., None], self.merge_heads(heads, x.dtype), 0)
        if last_only:
            last = jnp.clip(lengths - 1, 0, seg_len - 1)
            y = jnp.take_along_axis(y, last[:, None, None], axis=1)
        return y, state

    def decode_step(self, x: jax.Array, state: BankState, *, training: bool = False,
                    hold: jax.Array | None = None, storage_dtype=None,
                    joined: tuple[jax.Array, jax.Array] | None = None
                    ) -> tuple[jax.Array, BankState]:
        """One token per row x (B, 1, D) -> (y (B, 1, D), new state). Pure: what
        generation scans over. Rows ``hold`` (B,) bool keep their state as it was
        (their outputs are computed and meaningless). ``storage_dtype``: the state
        is a widened one (:func:`~coda_jax.state.widen_buffers`) of that dtype.
        ``joined``: this layer's :meth:`joined_inputs` (one product for every
        projection of x), else one product each."""
        def write(**token):
            written = bank_writes.write_one(self.layout, state, **token)
            return written, written

        return self._decode(x, state, write, training=training, hold=hold,
                            storage_dtype=storage_dtype, joined=joined)

    def decode_step_in_stack(self, x: jax.Array, stack: BankState, index: jax.Array, *,
                             training: bool = False, hold: jax.Array | None = None,
                             storage_dtype=None) -> tuple[jax.Array, BankState]:
        """:meth:`decode_step` of layer ``index`` of a stacked state (L, B, ...) ->
        (y, the stack with that layer stepped): a loop over layers carries the
        stack and changes only the slots each layer writes."""
        def write(**token):
            written = bank_writes.write_one_in_stack(self.layout, stack, index, **token)
            return written, jax.tree.map(lambda whole: whole[index], written)

        layer = jax.tree.map(lambda whole: whole[index], stack)
        return self._decode(x, layer, write, training=training, hold=hold,
                            storage_dtype=storage_dtype)

    def _decode(self, x, state, write, *, training, hold, storage_dtype, joined=None):
        """One token: project it at ``state``'s positions, ``write`` it (-> (what to
        return, this layer's state after the write)), attend over that state."""
        positions = state.pos[:, None]
        q, k, v, *gates = self.input_products(x, joined)
        lam = self.gate_of(gates[0]) if self.attn_cfg.differential else None
        # With one token the projections are vector-matrix products, which XLA
        # may rewrite as multiply-reduce and fuse into the buffer writes,
        # recomputing them per written element (measured 40x slower): compute them once.
        q, k, v = materialise(self.rope_queries(q, positions),
                              *self.rope_keys_values(k, v, positions))
        written, after = write(k=k[:, 0], v=v[:, 0], gate=self._write_gate_of(gates[-1])[:, 0],
                               eta_logit=self.summary_eta_logit[...], training=training,
                               hold=hold, storage_dtype=storage_dtype)
        keys = self._near_keys(after.k_buf.astype(q.dtype), after.exact_pos, state.pos)
        heads = self.mix_heads(q, keys, after.v_buf.astype(q.dtype), lam,
                               key_mask=self._visible(after.allowed), fused=False)
        return self.merge_heads(heads, x.dtype), written

    # ------------------------------------------------------------ public API
    def prefill(self, x: jax.Array, state: BankState, *, block_size: int = 256,
                lengths=None, training: bool = False, chunks_per_call: int | None = None,
                unroll: int | bool | None = None) -> tuple[jax.Array, BankState]:
        """Process a prompt x (B, L, D) block by block; return (y (B, L, D), new state).

        ``lengths`` (B,) marks rows shorter than L (their tail is padding: no
        output, no state change); host values are range-checked, device arrays
        are clipped to [0, L] rather than read back. The compiled unit is ``chunks_per_call``
        blocks (default: ``segments.segment_sizes``' long calls, then short ones for
        the rest), so prompts of any length reuse one or two compilations per block
        size; ``unroll`` blocks of a call
        run as straight-line code (default: ``runner.default_unroll()``).
        ``training=True`` freezes bank expansion, as the reference does in
        training mode. The input state is not modified. All blocks of a call
        attend in one batched call: with ``implementation="xla"`` its float32
        scores take ``4 * chunks_per_call * block * (buffer + block) * heads * 2``
        bytes per row, so a smaller ``chunks_per_call`` caps the memory.
        """
        return runner.prefill(self, x, state, block_size=block_size, lengths=lengths,
                              training=training, chunks_per_call=chunks_per_call,
                              unroll=unroll)

    def prefill_fn(self, *, block_size: int = 256, training: bool = False,
                   chunks_per_call: int | None = None, unroll: int | bool | None = None
                   ) -> Callable[..., tuple[jax.Array, BankState]]:
        """``prefill`` bound to the current weights and these settings:
        ``fn(x, state, lengths=None) -> (y, state)``.

        Like :meth:`step_fn`, it skips walking the module on each call (about
        50 us per call for one layer on the host), which counts when many
        prompts are prefilled from Python; it keeps the weights it was made with.
        """
        return runner.prefill_fn(self, block_size=block_size, training=training,
                                 chunks_per_call=chunks_per_call, unroll=unroll)

    def step(self, x: jax.Array, state: BankState, *, training: bool = False
             ) -> tuple[jax.Array, BankState]:
        """Decode one token per row: x (B, 1, D) -> (y (B, 1, D), new state).

        Rows may be at different positions. The input state is not modified.
        In a Python loop over tokens, :meth:`step_fn` has less per-call overhead.
        """
        return runner.step(self, x, state, training=training)

    def step_fn(self, *, training: bool = False
                ) -> Callable[[jax.Array, BankState], tuple[jax.Array, BankState]]:
        """``step`` bound to the current weights: ``fn(x, state) -> (y, state)``.

        It skips walking the module on each call (the host overhead of a decode
        step driven from Python); it keeps the weights it was made with.
        """
        return runner.step_fn(self, training=training)

    def decode(self, xs: jax.Array, state: BankState, *, training: bool = False
               ) -> tuple[jax.Array, BankState]:
        """Feed xs (B, T, D) one token at a time by the decode rule, in one compiled
        loop (a ``lax.scan`` of ``decode_step``): -> (y (B, T, D), new state)."""
        return runner.decode(self, xs, state, training=training)
