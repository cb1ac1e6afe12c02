"""Token generation from a bounded model's state in one compiled loop.

The whole loop (sample, step every layer, stop check) is one ``lax.scan``
under ``jax.jit``: no per-token dispatch from Python, no host reads until the
tokens come back. Rows that hit a stop token keep their state from then on
and emit ``pad_id``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .bounded import TRACE_COUNTS
from .decoder import CausalLM
from .state import BankState, where_rows


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


def generate(model: CausalLM, state: BankState, logits: jax.Array, *, max_new_tokens: int,
             key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: tuple[int, ...] = (), pad_id: int = 0
             ) -> tuple[jax.Array, jax.Array, BankState]:
    """Continue from ``logits`` (B, V) (the last prompt token's, e.g. from
    ``model.prefill(..., last_only=True)``) and ``state``.

    ``temperature=0`` is greedy. Returns (tokens (B, max_new_tokens), number of
    tokens per row up to and including its stop token, final state).
    """
    model._require_bounded()
    if logits.ndim == 3:
        logits = logits[:, -1]
    model.check_state(state, logits.shape[0])
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    greedy = temperature <= 0
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    key = jax.random.key(0) if key is None else key
    return _generate_jit(model, state, logits, key, jnp.float32(max(temperature, 1e-6)),
                         jnp.float32(top_p), max_new_tokens=max_new_tokens, greedy=greedy,
                         top_k=int(top_k), stop_tokens=tuple(int(t) for t in stop_tokens),
                         pad_id=int(pad_id))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "top_k",
                                             "stop_tokens", "pad_id"))
def _generate_jit(model, state, logits, key, temperature, top_p, *, max_new_tokens, greedy,
                  top_k, stop_tokens, pad_id):
    TRACE_COUNTS["generate"] += 1
    batch = logits.shape[0]
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def body(carry, step_key):
        state, logits, done = carry
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = sample_logits(logits, step_key, temperature=temperature, top_k=top_k,
                                  top_p=top_p).astype(jnp.int32)
        emitted = jnp.where(done, pad_id, token)
        new_logits, new_state = model._step(emitted[:, None], state, training=False)
        state = where_rows(done, state, new_state)
        done = done | jnp.isin(token, stops)
        return (state, new_logits[:, 0], done), emitted

    init = (state, logits, jnp.zeros((batch,), jnp.bool_))
    (state, _, _), tokens = jax.lax.scan(body, init, jax.random.split(key, max_new_tokens))
    tokens = tokens.T
    # Tokens per row: up to and including the first stop token.
    is_stop = jnp.isin(tokens, stops)
    counts = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, max_new_tokens)
    return tokens, counts.astype(jnp.int32), state
