"""Token generation from a model's state in one compiled loop.

Any kind of model generates: a bounded one from its ``BankState``, an
unbounded one (``gqa``, ``coda``) from its preallocated ``KVCache``. The whole
loop (sample, step every layer, stop check) is one ``lax.scan`` under
``jax.jit``: no per-token dispatch from Python, no host reads until the
tokens come back. Rows that hit a stop token keep their state from then on
and emit ``pad_id``. Rows are independent: each row of a batch (at its own
position) generates what it would generate alone (exactly so when greedy).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from . import runner
from .checkpoint import nonfinite_rows
from .decoder import CausalLM, State, stack_modules, unroll_decode_layers, unstack
from .state import narrow_buffers, tree_bytes, widen_buffers
from .validation import check_integer, check_number


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float | jax.Array,
                  top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
    """Sample one token per row from logits (B, V): temperature, then top-k, then top-p."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the first token).
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    return jax.random.categorical(key, jnp.where(drop, -jnp.inf, logits), axis=-1)


PAD_ID = -1  # what stopped rows emit by default: never a token id


def generate(model: CausalLM, state: State, logits: jax.Array, *, max_new_tokens: int,
             key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: tuple[int, ...] = (), pad_id: int = PAD_ID,
             return_state: bool = True, split_layers: bool | None = None,
             join_projections: bool = True
             ) -> tuple[jax.Array, jax.Array, State | None]:
    """Continue from ``logits`` (B, V) (the last prompt token's, e.g. from
    ``model.prefill(..., last_only=True)``) and ``state`` (the model's, every row
    at its own position): a bounded model's ``BankState``, or an unbounded
    model's ``KVCache``, which must have room for ``max_new_tokens`` more
    tokens in every row (else ``ValueError``; this reads its lengths back).

    ``temperature=0`` is greedy, ``> 0`` samples (needs ``key``); ``top_k=0`` and
    ``top_p=1`` switch those filters off. A row stops after emitting one of
    ``stop_tokens``; it then emits ``pad_id`` (default -1, not a token id) and its
    state stays as it was after the stop token. Returns (tokens (B,
    max_new_tokens), number of tokens per row up to and including its stop
    token, final state). ``return_state=False`` returns None for the state, and a
    stopped row's state is then not held (its writes go on, unread).

    ``split_layers`` (bounded models; default: on a GPU, where :func:`split_fits`)
    slices the stacked layer weights and state apart once, before the token loop,
    instead of in every step: faster where each slice would be copied before its
    matmul (the GPU), at the cost of a second copy of the layer weights and of the
    state while ``generate`` runs. With it, ``join_projections`` also joins each
    layer's input projections (q, k, v and the gates) into one kernel before the
    loop (``joined_inputs``): one product a step instead of one each.
    """
    vocab = model.cfg.vocab_size
    if not hasattr(logits, "ndim") or logits.ndim not in (2, 3) or logits.shape[-1] != vocab:
        shape = tuple(getattr(logits, "shape", ()))
        raise ValueError(f"logits must have shape (batch, {vocab}) or (batch, 1, {vocab}) "
                         f"(the last prompt token's), got {shape}")
    if logits.ndim == 3:
        logits = logits[:, -1]
    model.check_state(state, logits.shape[0])
    max_new_tokens = check_integer("max_new_tokens", max_new_tokens, 1)
    temperature = check_number("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: key=jax.random.key(seed)")
    top_k = check_integer("top_k", top_k, 0, vocab)
    top_p = check_number("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stops = tuple(check_integer("a stop token", t, 0, vocab - 1) for t in stop_tokens)
    pad_id = check_integer("pad_id", pad_id, -(2 ** 31))
    key = jax.random.key(0) if key is None else key
    model.check_room(state, max_new_tokens, what=f"max_new_tokens={max_new_tokens}")
    if split_layers is None:
        split_layers = unroll_decode_layers() and split_fits(model, state,
                                                             keep_state=return_state)
    poisoned = nonfinite_rows(state)  # a few bools: the loop would wait for the state anyway
    if poisoned:
        warnings.warn(f"row(s) {poisoned} of the state hold NaN or Inf values (a non-finite "
                      "input reached the state): their tokens are meaningless", stacklevel=2)
    return _generate_jit(
        model, state, logits, key, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
        max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, stop_tokens=stops,
        pad_id=pad_id, keep_state=bool(return_state),
        split_layers=bool(split_layers) and model.bounded, join=bool(join_projections))


def split_fits(model: CausalLM, state: State, *, keep_state: bool = True) -> bool:
    """Whether the device holding the weights has room, beyond what is in use, for
    ``generate(split_layers=True)``'s copies: the layer weights once and the state
    three times (sliced apart, the loop's next state, stacked back; twice without
    ``keep_state``, where nothing is stacked back), with a 10% margin. False where
    the device reports no memory figures (a CPU)."""
    weights = jax.tree.leaves(nnx.state(model.layers))
    stats = weights[0].devices().pop().memory_stats() if weights else None
    if not stats or "bytes_limit" not in stats:
        return False
    need = tree_bytes(weights) + (3 if keep_state else 2) * tree_bytes(state)
    return need * 1.1 <= stats["bytes_limit"] - stats.get("bytes_in_use", 0)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "top_k",
                                             "stop_tokens", "pad_id", "keep_state",
                                             "split_layers", "join"))
def _generate_jit(model, state, logits, key, temperature, top_p, *, max_new_tokens, greedy,
                  top_k, stop_tokens, pad_id, keep_state, split_layers, join):
    runner.count_trace("generate", model)
    batch = logits.shape[0]
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    storage_dtype = None
    if split_layers:
        layers = unstack(model.layers, model.cfg.num_layers)
        state = unstack(state, model.cfg.num_layers)
        # Each layer's input projections joined once here, not in every step.
        joined = [layer.self_attn.joined_inputs() for layer in layers] if join else None
    elif model.bounded:
        state, storage_dtype = widen_buffers(state)
    keys = jax.random.split(key, max_new_tokens)

    def body(carry):
        t, state, logits, done, tokens, live = carry
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = sample_logits(logits, keys[t], temperature=temperature, top_k=top_k,
                                  top_p=top_p).astype(jnp.int32)
        tokens = tokens.at[t].set(jnp.where(done, pad_id, token))
        live = live.at[t].set(~done)
        # Stopped rows step on their (valid) sampled token, their state held as it was
        # (with keep_state) and their logits discarded.
        hold = done if keep_state else None
        if split_layers:
            new_logits, state = model.decode_step_unstacked(token[:, None], layers, state,
                                                            hold=hold, joined=joined)
        else:
            new_logits, state = model.decode_step(token[:, None], state, training=False,
                                                  hold=hold, storage_dtype=storage_dtype)
        done = done | jnp.isin(token, stops)
        return t + 1, state, new_logits[:, 0], done, tokens, live

    # The loop ends once every row has stopped: the steps left would only emit pad_id.
    def going(carry):
        t, _, _, done, _, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    init = (jnp.int32(0), state, logits, jnp.zeros((batch,), jnp.bool_),
            jnp.full((max_new_tokens, batch), pad_id, jnp.int32),
            jnp.zeros((max_new_tokens, batch), jnp.bool_))
    _, state, _, _, tokens, live = jax.lax.while_loop(going, body, init)
    if split_layers and keep_state:
        state = stack_modules(state)
    state = narrow_buffers(state, storage_dtype)
    # Tokens per row: those emitted while live, up to and including the stop token.
    return tokens.T, jnp.sum(live, axis=0, dtype=jnp.int32), state if keep_state else None
