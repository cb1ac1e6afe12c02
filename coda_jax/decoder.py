"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) with a choice of attention.

``attention="gqa"`` is the HuggingFace architecture (for parity with
``transformers``), ``"coda"`` unbounded differential attention, and
``"coda_bounded"`` CoDA-GQA-L with its fixed-size state. The layers are
stored stacked (every parameter has a leading layer axis) and run under one
``lax.scan``, so a 32-layer model compiles one layer's program (bounded decode on a
GPU unrolls that scan: :func:`unroll_decode_layers`); the bounded state of the
whole model is one ``BankState`` whose leaves lead with the layer axis.

Every kind generates through one API: ``init_state``, ``prefill``, ``step``
(and ``generation.generate``). A bounded model's state is its ``BankState``; an
unbounded model's is a preallocated ``KVCache`` of ``max_length`` positions
(``kv_cache.py``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import bank_layout, kv_cache, runner
from .bounded import CoDAGQALandmark
from .kv_cache import KVCache
from .model_config import AttentionKind, AttentionSpec, DecoderConfig
from .primitives import einsum_f32
from .segments import default_chunks_per_call
from .state import BankState
from .validation import check_integer
from .unbounded import BaselineGQA, CoDAGQA

State = BankState | KVCache


class RMSNorm(nnx.Module):
    """HuggingFace's RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, param_dtype, rngs: nnx.Rngs):
        make = functools.partial(nnx.Linear, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = make(hidden, intermediate)
        self.up_proj = make(hidden, intermediate)
        self.down_proj = make(intermediate, hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def attention_module(cfg: DecoderConfig, spec: AttentionSpec, *, qk_norm: bool, param_dtype,
                     rngs: nnx.Rngs) -> nnx.Module:
    """The attention of one decoder layer, configured from the model's config."""
    common = dict(embed_dim=cfg.hidden_size, num_heads=cfg.num_heads,
                  num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  rope_base=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling or {}) or None,
                  qk_norm=qk_norm, qk_norm_eps=cfg.rms_norm_eps, qkv_bias=cfg.attention_bias,
                  o_bias=cfg.o_proj_bias, param_dtype=param_dtype, rngs=rngs)
    if spec.kind == "gqa":
        return BaselineGQA(rope_interleaved=False, sliding_window=cfg.sliding_window, **common)
    layer = CoDAGQA if spec.kind == "coda" else CoDAGQALandmark
    return layer(**common, **spec.layer_options())


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then SwiGLU MLP."""

    def __init__(self, cfg: DecoderConfig, spec: AttentionSpec, *, qk_norm: bool, param_dtype,
                 rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                       param_dtype=param_dtype)
        self.self_attn = attention_module(cfg, spec, qk_norm=qk_norm, param_dtype=param_dtype,
                                          rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                param_dtype=param_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, param_dtype=param_dtype,
                       rngs=rngs)

    def mlp_residual(self, h: jax.Array) -> jax.Array:
        """``h`` plus the MLP of its normalised self (the block's second half)."""
        return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, h: jax.Array, past) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Unbounded attention over the past cache and h."""
        out, cache = self.self_attn(self.input_layernorm(h), past_key_value=past)
        return self.mlp_residual(h + out), cache

    def prefill_segment(self, h, lengths, state, *, block_size, training, unroll, rope=None):
        out, state = self.self_attn.prefill_segment(
            self.input_layernorm(h), lengths, state, block_size=block_size,
            training=training, unroll=unroll, rope=rope)
        return self.mlp_residual(h + out), state

    def write_gate_logit(self, h: jax.Array) -> jax.Array:
        """The bounded attention's write-gate logits (B, L) for the layer input h."""
        return self.self_attn.write_gate_logit(self.input_layernorm(h))

    def decode_step(self, h, state, *, training, hold=None, storage_dtype=None, joined=None):
        out, state = self.self_attn.decode_step(self.input_layernorm(h), state,
                                                training=training, hold=hold,
                                                storage_dtype=storage_dtype, joined=joined)
        return self.mlp_residual(h + out), state

    def decode_step_in_stack(self, h, stack, index, *, training, hold=None, storage_dtype=None):
        """:meth:`decode_step` of layer ``index`` of a stacked bounded state."""
        out, stack = self.self_attn.decode_step_in_stack(self.input_layernorm(h), stack, index,
                                                         training=training, hold=hold,
                                                         storage_dtype=storage_dtype)
        return self.mlp_residual(h + out), stack


def stack_modules(modules: list):
    """Identical modules (or pytrees) -> one whose leaves lead with a stacking axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *modules)


def unstack(tree, count: int) -> list:
    """A pytree whose leaves lead with a stacking axis -> its ``count`` slices (copies)."""
    return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


def unroll_decode_layers() -> bool:
    """Whether bounded decode runs its layers unrolled: on a GPU. In a rolled scan each
    layer's weights are a dynamic slice of the stacked arrays, copied before every
    matmul (7B shape on an H100, one step called alone at batch 1: 18.6 ms rolled,
    9.2 ms unrolled; decode_layer_loop_h100.json in git history at ab3f98f). Inside
    ``generate``'s token loop they would still be sliced every step: there it
    slices them once, before the loop (``generate(split_layers=...)``). On a CPU the
    copy is small beside the matmuls and a rolled scan compiles faster."""
    return jax.default_backend() == "gpu"


@jax.jit
def _forward_logits_jit(model, tokens):
    return model(tokens)[0]


class CausalLM(nnx.Module):
    """A decoder language model: embeddings, a stack of layers, final norm, LM head.

    ``attention`` is a typed :class:`AttentionSpec`, or its kind (``"gqa"``,
    ``"coda"``, ``"coda_bounded"``) with ``attention_options`` in the attention
    layers' flat keyword names (the reference's: window, num_landmarks_exact,
    ...). ``reference_compat`` reproduces the reference's Qwen3 adapter, which
    drops q_norm/k_norm.
    """

    def __init__(self, cfg: DecoderConfig, *, attention: AttentionKind | AttentionSpec = "gqa",
                 attention_options: dict[str, Any] | None = None,
                 reference_compat: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if isinstance(attention, AttentionSpec):
            if attention_options:
                raise ValueError("give the options inside the AttentionSpec, not also as "
                                 "attention_options")
            spec = attention
        else:
            spec = AttentionSpec.from_options(attention, attention_options)
        self.cfg = cfg
        self.spec = spec  # static: part of the treedef
        self.attention = spec.kind
        self.reference_compat = reference_compat
        attention = spec.kind
        if cfg.sliding_window is not None and attention in ("coda", "coda_bounded"):
            # As in the reference's adapters, which ignore it too.
            sees = ("its bank (the recent 'window' option and the landmarks)"
                    if attention == "coda_bounded" else "every earlier token")
            warnings.warn(
                f"the {cfg.family} config's sliding_window={cfg.sliding_window} is not applied "
                f"to attention={attention!r}, which attends over {sees}; only "
                "attention='gqa' applies it", UserWarning, stacklevel=2)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = stack_modules([
            DecoderLayer(cfg, spec, qk_norm=self.attention_qk_norm, param_dtype=param_dtype,
                         rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------- pieces
    @property
    def attention_qk_norm(self) -> bool:
        """Qwen3's q/k norms, unless reproducing the reference (which drops them)."""
        return self.cfg.qk_norm and not (self.reference_compat and self.attention != "gqa")

    def fresh_attention(self, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        """A newly initialised attention module of this model's kind (one layer)."""
        return attention_module(self.cfg, self.spec, qk_norm=self.attention_qk_norm,
                                param_dtype=dtype, rngs=rngs)

    @property
    def bank_layer_specs(self) -> list[CoDAGQALandmark]:
        """One entry per layer giving that layer's bank config and state shapes (for
        saving and loading states). All layers share them: each entry is the stacked
        attention module itself, so nothing is copied."""
        self.require_bounded()
        return [self.layers.self_attn] * self.cfg.num_layers

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings (B, L, D); ids outside ``[0, vocab)`` become NaN rows, so
        they can neither wrap around to a real token nor pass unnoticed: the
        state of their batch row is flagged (``BankState.nonfinite``)."""
        # The table in its own dtype: nnx.Embed would promote it to its param_dtype
        # (float32), so bf16 weights would still run every layer in float32.
        h = jnp.take(self.embed_tokens.embedding[...], tokens, axis=0)
        known = (tokens >= 0) & (tokens < self.cfg.vocab_size)
        return jnp.where(known[..., None], h, jnp.asarray(jnp.nan, h.dtype))

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        if self.lm_head is None:
            return einsum_f32("...d,vd->...v", h, self.embed_tokens.embedding[...])
        return self.lm_head(h).astype(jnp.float32)

    @property
    def bounded(self) -> bool:
        """Whether the attention is bounded (a ``BankState``), else unbounded (a ``KVCache``)."""
        return self.attention == "coda_bounded"

    def require_bounded(self) -> None:
        """``ValueError`` unless this model has bounded attention (a state to run on)."""
        if self.attention != "coda_bounded":
            raise ValueError(f"this needs attention='coda_bounded'; the model has "
                             f"{self.attention!r}")

    # ------------------------------------------------------ unbounded
    def __call__(self, tokens: jax.Array, cache=None, *, remat: bool = False
                 ) -> tuple[jax.Array, Any]:
        """Logits (B, L, V) of ``tokens`` (B, L) after an optional ``cache``
        (the returned one: per-layer K/V stacked (layers, B, T, Hkv, Dh)).
        ``remat`` recomputes each layer in the backward pass (training memory)."""
        if self.attention == "coda_bounded":
            raise ValueError("a bounded model runs with prefill/step and a state")
        tokens = self.check_input(tokens)
        h = self.embed(tokens)

        def body(h, inputs):
            layer, past = inputs
            return layer(h, past)

        h, cache = jax.lax.scan(jax.checkpoint(body) if remat else body, h,
                                (self.layers, cache))
        return self.logits(h), cache

    def forward_logits(self, tokens: jax.Array) -> jax.Array:
        """Logits (B, L, V) of ``tokens`` (B, L) with no cache, compiled once per
        model structure and shape: calling the model from Python runs it op by op."""
        return _forward_logits_jit(self, self.check_input(tokens))

    # ------------------------------------------------- states of any kind
    def init_state(self, batch_size: int, dtype=jnp.float32, *, key: jax.Array | None = None,
                   mem_init: str | None = None, max_length: int | None = None) -> State:
        """A fresh state for ``batch_size`` rows, every layer's stacked on a leading
        layer axis: a ``BankState`` for a bounded model, a ``KVCache`` of
        ``max_length`` positions per row (prompt plus generated tokens; required)
        for an unbounded one. ``key`` and ``mem_init`` seed and fill a bounded
        model's banks; an unbounded cache starts empty (``key`` is unused)."""
        bank_layout.check_state_request(batch_size, dtype)
        if not self.bounded:
            return self._init_cache(int(batch_size), dtype, max_length, mem_init)
        if max_length is not None:
            raise ValueError(f"max_length={max_length!r} is for the unbounded kinds' K/V "
                             "cache; a bounded model's state has a fixed size (its window "
                             "and landmarks) whatever the length: leave max_length out")
        attn = self.layers.self_attn  # configuration only: the same for every layer
        return bank_layout.init_layers_state(attn.layout, int(batch_size), jnp.dtype(dtype), key,
                                             mem_init or attn.bank_cfg.mem_init,
                                             self.cfg.num_layers)

    def _init_cache(self, batch_size: int, dtype, max_length: int | None,
                    mem_init: str | None) -> KVCache:
        if max_length is None:
            raise ValueError(f"init_state of attention={self.attention!r} needs max_length: "
                             "its state is a K/V cache of that many positions per row "
                             "(prompt plus generated tokens)")
        max_length = check_integer("max_length", max_length, 1)
        if mem_init is not None:
            raise ValueError(f"mem_init is a bounded model's option; attention="
                             f"{self.attention!r} keeps a K/V cache, which starts empty")
        return KVCache.zeros(num_layers=self.cfg.num_layers, batch_size=batch_size,
                             max_length=max_length, num_kv_heads=self.cfg.num_kv_heads,
                             head_dim=self.cfg.head_dim, dtype=dtype)

    # ------------------------------------------- pure functions (runner.py)
    @property
    def output_dim(self) -> int:
        return self.cfg.vocab_size

    def prefill_segment(self, tokens: jax.Array, lengths: jax.Array, state: State, *,
                        block_size: int, training: bool, unroll: int | bool,
                        last_only: bool = False, remat: bool = False,
                        write_logits: bool = False):
        """One segment of whole blocks of ``tokens`` (B, L), the first ``lengths``
        valid, through every layer: -> (logits (B, L, V), or (B, 1, V) at each
        row's last valid token with ``last_only``; the state), and with
        ``write_logits`` (bounded only) third every layer's write-gate logits
        (layers, B, L). Pure: what training differentiates through (``remat``
        recomputes each layer in the backward pass). An unbounded model writes
        the segment into its ``KVCache`` after each row's filled prefix."""
        if not self.bounded:
            if write_logits:
                raise ValueError(f"write_logits needs a bounded model (write gates); "
                                 f"attention={self.attention!r} has none")
            return kv_cache.prefill_segment(self, tokens, lengths, state,
                                            last_only=last_only, remat=remat)
        h = self.embed(tokens)
        # RoPE's tables once for every layer (all have read the same tokens): a CPU's
        # XLA fuses a table computed in the layer into each of its consumers and
        # recomputes its sines and cosines per element (SmolLM2 on 2 cores: 9 ms of
        # a layer's 1,024-token call, against 1 ms with the tables made here).
        attention = self.layers.self_attn
        rope = attention.rope(attention.segment_positions(state.pos[0], tokens.shape[1]))

        def body(h, inputs):
            layer, st = inputs
            gate = layer.write_gate_logit(h) if write_logits else None
            h, st = layer.prefill_segment(h, lengths, st, block_size=block_size,
                                          training=training, unroll=unroll, rope=rope)
            return h, (st, gate)

        h, (state, gates) = jax.lax.scan(jax.checkpoint(body) if remat else body, h,
                                         (self.layers, state))
        if last_only:
            last = jnp.clip(lengths - 1, 0, h.shape[1] - 1)
            h = jnp.take_along_axis(h, last[:, None, None], axis=1)
        if write_logits:
            return self.logits(h), state, gates
        return self.logits(h), state

    def decode_step(self, token: jax.Array, state: State, *, training: bool = False,
                    hold: jax.Array | None = None, storage_dtype=None
                    ) -> tuple[jax.Array, State]:
        """One token per row (B, 1) through every layer -> (logits (B, 1, V), state).
        Pure: what generation scans over. Rows ``hold`` (B,) bool keep their state
        as it was, without a select over every row's state (their logits are
        meaningless): what ``generate`` does with a row that has stopped.
        ``storage_dtype`` (bounded models): ``state`` is a widened state of that
        dtype (:func:`~coda_jax.state.widen_buffers`), written as that dtype would be."""
        if not self.bounded:
            if hold is None:
                return kv_cache.decode_step(self, token, state)
            logits, written = kv_cache.decode_step(self, token, kv_cache.hold_rows(state, hold))
            return logits, kv_cache.release_rows(hold, state, written)
        h = self.embed(token)

        # The loop carries the whole stacked state, so each layer changes only the
        # slots it writes (as layer outputs, every slot would be copied each step).
        def body(carry, inputs):
            h, stack = carry
            layer, index = inputs
            return layer.decode_step_in_stack(h, stack, index, training=training, hold=hold,
                                              storage_dtype=storage_dtype), None

        layers = jnp.arange(self.cfg.num_layers)
        (h, state), _ = jax.lax.scan(body, (h, state), (self.layers, layers),
                                     unroll=unroll_decode_layers())
        return self.logits(h), state

    def decode_step_unstacked(self, token: jax.Array, layers: list, states: list,
                              hold: jax.Array | None = None, joined: list | None = None
                              ) -> tuple[jax.Array, list]:
        """:meth:`decode_step` of a bounded model over its layers and their states
        already sliced apart (:func:`unstack` of ``self.layers`` and of the state): no
        slice is taken in the step, so a loop over steps reads each weight in place.
        ``joined``: each layer's attention's ``joined_inputs()``, made before the loop
        (each layer's input projections then one product)."""
        h = self.embed(token)
        new_states = []
        for i, (layer, st) in enumerate(zip(layers, states, strict=True)):
            h, st = layer.decode_step(h, st, training=False, hold=hold,
                                      joined=None if joined is None else joined[i])
            new_states.append(st)
        return self.logits(h), new_states

    def check_state(self, state: State, batch_size: int) -> None:
        """``ValueError`` unless ``state`` is this model's stacked state for ``batch_size``
        (its ``BankState``, or for an unbounded model its ``KVCache``)."""
        if not self.bounded:
            kv_cache.check_cache(state, num_layers=self.cfg.num_layers, batch_size=batch_size,
                                 num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                                 kind=self.attention)
            return
        if not isinstance(state, BankState):
            raise ValueError(f"expected this model's BankState, got {type(state).__name__}")
        if state.num_layers is None:
            raise ValueError("this is one layer's state (leaves (batch, ...)); the model "
                             "needs its stacked state (layers, batch, ...) from "
                             "model.init_state")
        # Cached shapes, not a trace of init_state: this runs on every step call.
        layer = bank_layout.state_shapes(self.layers.self_attn.layout, int(batch_size),
                                    jnp.dtype(state.k_buf.dtype))
        expected = bank_layout.stack_shapes([layer] * self.cfg.num_layers)
        want = jax.tree.map(lambda a: a.shape, expected)
        got = jax.tree.map(lambda a: a.shape, state)
        if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
            raise ValueError(f"state does not match this model ({self.cfg.num_layers} layers, "
                             f"batch {batch_size}): got k_buf {state.k_buf.shape}, expected "
                             f"{expected.k_buf.shape}")

    def check_room(self, state: State, needed, *, what: str) -> None:
        """``ValueError`` unless every row of ``state`` has room for ``needed`` (B,)
        more tokens: a ``KVCache``'s capacity (its lengths are read back to the
        host); a bounded state always has room."""
        if not self.bounded:
            kv_cache.check_room(state, needed, what=what)

    def check_input(self, tokens, *, what: str = "tokens") -> jax.Array:
        """Shape and dtype always; the id range too for host inputs (lists, numpy),
        which needs no device sync. Device arrays with ids out of range give NaN
        logits and a flagged state (see :meth:`embed`)."""
        on_host = not isinstance(tokens, jax.Array)
        host = np.asarray(tokens) if on_host else None
        array = host if on_host else tokens
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{what} must be integer ids of shape (batch, length), got "
                             f"{array.dtype} {tuple(array.shape)}")
        if array.shape[0] == 0:
            raise ValueError(f"{what} has an empty batch (shape {tuple(array.shape)})")
        if on_host and host.size:
            bad = (host < 0) | (host >= self.cfg.vocab_size)
            if bad.any():
                row, col = map(int, np.argwhere(bad)[0])
                raise ValueError(f"{what} holds ids outside the vocabulary [0, "
                                 f"{self.cfg.vocab_size}): {int(host[row, col])} at row {row}, "
                                 f"position {col} ({int(bad.sum())} such ids)")
        return jnp.asarray(array)

    def prefill(self, tokens: jax.Array, state: State, *, block_size: int = 1024,
                lengths=None, last_only: bool = False, training: bool = False,
                chunks_per_call: int | None = None, unroll: int | bool | None = None
                ) -> tuple[jax.Array, State]:
        """Read ``tokens`` (B, L) into the state: -> (logits, new state).

        Logits are (B, L, V), or (B, 1, V) for each row's last valid token with
        ``last_only`` (what a document ingest or a question needs). ``lengths``
        marks shorter rows of a padded batch. Each call runs ``chunks_per_call``
        blocks (default: ``segments.segment_sizes``' long calls for the bulk of the
        prompt, short ones for its rest: one or two compilations per block size).

        An unbounded model writes each row's tokens into its ``KVCache`` after
        the row's filled prefix (a prompt that does not fit is refused); a
        call's queries attend over the whole cache at once, so with
        ``implementation="xla"`` its float32 scores take ``4 * block_size *
        chunks_per_call * max_length * heads`` bytes per row (twice that for
        ``"coda"``): a smaller ``chunks_per_call`` caps them. Blocks are at most
        ``max_length`` tokens, and by default a call covers at most ``max_length``
        tokens, rounded up to whole blocks (nothing longer can fit).
        """
        if (not self.bounded and isinstance(state, KVCache) and type(block_size) is int
                and block_size > 0 and np.ndim(tokens) == 2):  # else the runner refuses
            block_size = min(block_size, state.max_length)
            if chunks_per_call is None:
                default = default_chunks_per_call(block_size, int(np.shape(tokens)[0]))
                chunks_per_call = min(default, -(-state.max_length // block_size))
        return runner.prefill(self, tokens, state, block_size=block_size, lengths=lengths,
                              training=training, chunks_per_call=chunks_per_call,
                              unroll=unroll, last_only=last_only)

    def step(self, token: jax.Array, state: State, *, training: bool = False
             ) -> tuple[jax.Array, State]:
        """One token per row (B, 1) -> (logits (B, 1, V), new state).

        For an unbounded model each row's token goes to position ``lengths[row]``
        of its ``KVCache`` (a full cache is refused: this reads the lengths back).

        In a Python loop over tokens, :meth:`step_fn` has less per-call overhead
        (``generation.generate`` runs the whole loop compiled instead).
        """
        return runner.step(self, token, state, training=training)

    def step_fn(self, *, training: bool = False
                ) -> Callable[[jax.Array, State], tuple[jax.Array, State]]:
        """``step`` bound to the current weights: ``fn(token, state) -> (logits, state)``,
        without walking the model on each call; it keeps the weights it was made with."""
        return runner.step_fn(self, training=training)
