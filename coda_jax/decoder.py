"""Llama-family decoders (Llama, Mistral, Qwen3) with a choice of attention.

``attention="gqa"`` is the HuggingFace architecture (for parity with
``transformers``), ``"coda"`` unbounded differential attention, and
``"coda_bounded"`` CoDA-GQA-L with its fixed-size state. The layers are
stored stacked (every parameter has a leading layer axis) and run under one
``lax.scan``, so a 32-layer model compiles one layer's program; the bounded
state of the whole model is one ``BankState`` whose leaves lead with the layer axis.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import bank_writes, runner
from .bounded import CoDAGQALandmark
from .model_config import AttentionKind, AttentionSpec, DecoderConfig
from .primitives import einsum_f32
from .state import BankState
from .unbounded import BaselineGQA, CoDAGQA



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
                  o_bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs)
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

    def prefill_segment(self, h, lengths, state, *, block_size, training, unroll):
        out, state = self.self_attn.prefill_segment(
            self.input_layernorm(h), lengths, state, block_size=block_size,
            training=training, unroll=unroll)
        return self.mlp_residual(h + out), state

    def write_gate_logit(self, h: jax.Array) -> jax.Array:
        """The bounded attention's write-gate logits (B, L) for the layer input h."""
        return self.self_attn.write_gate_logit(self.input_layernorm(h))

    def decode_step(self, h, state, *, training):
        out, state = self.self_attn.decode_step(self.input_layernorm(h), state,
                                                training=training)
        return self.mlp_residual(h + out), state


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Identical modules -> one module whose leaves lead with a stacking axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *modules)


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

    # -------------------------------------------------------- bounded
    def init_state(self, batch_size: int, dtype=jnp.float32, *, key: jax.Array | None = None,
                   mem_init: str | None = None) -> BankState:
        """The state of every layer, stacked on a leading layer axis."""
        self.require_bounded()
        bank_writes.check_state_request(batch_size, dtype)
        attn = self.layers.self_attn  # configuration only: the same for every layer
        keys = (jax.random.split(key, self.cfg.num_layers) if key is not None
                else [None] * self.cfg.num_layers)
        states = [attn.init_state(batch_size, dtype, key=k, mem_init=mem_init) for k in keys]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    # ------------------------------------------- pure functions (runner.py)
    @property
    def output_dim(self) -> int:
        return self.cfg.vocab_size

    def prefill_segment(self, tokens: jax.Array, lengths: jax.Array, state: BankState, *,
                        block_size: int, training: bool, unroll: int | bool,
                        last_only: bool = False, remat: bool = False,
                        write_logits: bool = False):
        """One segment of whole blocks of ``tokens`` (B, L), the first ``lengths``
        valid, through every layer: -> (logits (B, L, V), or (B, 1, V) at each
        row's last valid token with ``last_only``; the state), and with
        ``write_logits`` third every layer's write-gate logits (layers, B, L).
        Pure: what training differentiates through (``remat`` recomputes each
        layer in the backward pass)."""
        h = self.embed(tokens)

        def body(h, inputs):
            layer, st = inputs
            gate = layer.write_gate_logit(h) if write_logits else None
            h, st = layer.prefill_segment(h, lengths, st, block_size=block_size,
                                          training=training, unroll=unroll)
            return h, (st, gate)

        h, (state, gates) = jax.lax.scan(jax.checkpoint(body) if remat else body, h,
                                         (self.layers, state))
        if last_only:
            last = jnp.clip(lengths - 1, 0, h.shape[1] - 1)
            h = jnp.take_along_axis(h, last[:, None, None], axis=1)
        if write_logits:
            return self.logits(h), state, gates
        return self.logits(h), state

    def decode_step(self, token: jax.Array, state: BankState, *, training: bool = False
                    ) -> tuple[jax.Array, BankState]:
        """One token per row (B, 1) through every layer -> (logits (B, 1, V), state).
        Pure: what generation scans over."""
        h = self.embed(token)

        def body(h, inputs):
            layer, st = inputs
            return layer.decode_step(h, st, training=training)

        h, state = jax.lax.scan(body, h, (self.layers, state))
        return self.logits(h), state

    def check_state(self, state: BankState, batch_size: int) -> None:
        """``ValueError`` unless ``state`` is this model's stacked state for ``batch_size``."""
        self.require_bounded()
        if not isinstance(state, BankState):
            raise ValueError(f"expected this model's BankState, got {type(state).__name__}")
        if state.num_layers is None:
            raise ValueError("this is one layer's state (leaves (batch, ...)); the model "
                             "needs its stacked state (layers, batch, ...) from "
                             "model.init_state")
        # Cached shapes, not a trace of init_state: this runs on every step call.
        layer = bank_writes.state_shapes(self.layers.self_attn.layout, int(batch_size),
                                    jnp.dtype(state.k_buf.dtype))
        expected = bank_writes.stack_shapes([layer] * self.cfg.num_layers)
        want = jax.tree.map(lambda a: a.shape, expected)
        got = jax.tree.map(lambda a: a.shape, state)
        if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
            raise ValueError(f"state does not match this model ({self.cfg.num_layers} layers, "
                             f"batch {batch_size}): got k_buf {state.k_buf.shape}, expected "
                             f"{expected.k_buf.shape}")

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

    def prefill(self, tokens: jax.Array, state: BankState, *, block_size: int = 1024,
                lengths=None, last_only: bool = False, training: bool = False,
                chunks_per_call: int | None = None, unroll: int | bool | None = None
                ) -> tuple[jax.Array, BankState]:
        """Read ``tokens`` (B, L) into the bounded state: -> (logits, new state).

        Logits are (B, L, V), or (B, 1, V) for each row's last valid token with
        ``last_only`` (what a document ingest or a question needs). ``lengths``
        marks shorter rows of a padded batch. One compilation per block size; each
        call runs ``chunks_per_call`` blocks (default:
        ``segments.default_chunks_per_call``).
        """
        return runner.prefill(self, tokens, state, block_size=block_size, lengths=lengths,
                              training=training, chunks_per_call=chunks_per_call,
                              unroll=unroll, last_only=last_only)

    def step(self, token: jax.Array, state: BankState, *, training: bool = False
             ) -> tuple[jax.Array, BankState]:
        """One token per row (B, 1) -> (logits (B, 1, V), new state).

        In a Python loop over tokens, :meth:`step_fn` has less per-call overhead
        (``generation.generate`` runs the whole loop compiled instead).
        """
        return runner.step(self, token, state, training=training)

    def step_fn(self, *, training: bool = False
                ) -> Callable[[jax.Array, BankState], tuple[jax.Array, BankState]]:
        """``step`` bound to the current weights: ``fn(token, state) -> (logits, state)``,
        without walking the model on each call; it keeps the weights it was made with."""
        return runner.step_fn(self, training=training)
