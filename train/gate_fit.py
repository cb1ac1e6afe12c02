"""Write gates fitted to the content marks before phase 2 (``phase2.fit_write_gates``).

Each bounded layer's write gate is ``sigmoid(w . norm(h) + b)`` of its normed input:
a logistic regression. Phase 2's gate loss (``phase2.write_gate_loss``) trains it
against ``data.write_targets`` by gradient steps at the gate rate, starting from
``write_gate_init_bias`` (-2: every gate near 0.12). In the first SmolLM2 run those
300 updates left the gates under the 0.5 threshold for 97-100% of the marked tokens
of held-out prose: the exact bank stayed almost empty all through phase 2, so the
attention never learned to read it. Fitted here first, on the frozen model's layer
inputs for marked sequences of the stage's own data (the same balanced
cross-entropy, run to convergence), the gates write the marked tokens from phase
2's first update.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coda_jax.decoder import CausalLM

from .steps import write_gate_loss

# Unmarked positions kept per sequence (every marked one is kept): the features of
# a whole 8K sequence are 30 layers x 8K x 576 floats, 0.6 GB.
NEGATIVES_PER_SEQUENCE = 256


def layer_inputs(model: CausalLM, ids: np.ndarray, positions: np.ndarray, *,
                 block_size: int) -> np.ndarray:
    """What every layer's write gate reads, its normed input, at ``positions`` of
    one sequence ``ids`` read bounded from an empty state: (layers, n, hidden) float32."""
    tokens = jnp.asarray(ids[None], jnp.int32)
    return np.asarray(_layer_inputs(model, tokens, jnp.asarray(positions, jnp.int32),
                                    block_size))


@functools.partial(jax.jit, static_argnames="block_size")
def _layer_inputs(model: CausalLM, tokens: jax.Array, positions: jax.Array,
                  block_size: int) -> jax.Array:
    state = model.init_state(1, model.embed_tokens.embedding[...].dtype, mem_init="zeros")
    lengths = jnp.asarray([tokens.shape[1]], jnp.int32)

    def body(h, inputs):
        layer, layer_state = inputs
        x = layer.input_layernorm(h)[0, positions].astype(jnp.float32)
        h, _ = layer.prefill_segment(h, lengths, layer_state, block_size=block_size,
                                     training=False, unroll=1)
        return h, x

    _, xs = jax.lax.scan(body, model.embed(tokens), (model.layers, state))
    return xs


def fit_balanced_logistic(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                          *, steps: int = 800, lr: float = 1e-2, l2: float = 1e-3
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the logistic regression of ``y`` (n,) on ``x`` (layers, n, hidden)
    minimising the balanced cross-entropy (the mean over marked positions plus the
    mean over the others, halved: phase 2's gate loss) plus ``l2`` on the weights,
    from ``kernel`` (layers, hidden) and ``bias`` (layers,), by Adam."""
    y = jnp.asarray(y, jnp.float32)

    def loss(params, xs):
        w, b = params
        return 0.5 * write_gate_loss(xs @ w + b, y) + l2 * (w ** 2).sum()

    opt = optax.adam(lr)

    def fit_one(w, b, xs):
        def step(carry, _):
            params, opt_state = carry
            updates, opt_state = opt.update(jax.grad(loss)(params, xs), opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        params = (w, b)
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params

    w, b = jax.jit(jax.vmap(fit_one))(jnp.asarray(kernel, jnp.float32),
                                      jnp.asarray(bias, jnp.float32), jnp.asarray(x))
    return np.asarray(w), np.asarray(b)


def gate_rates(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
               threshold: float) -> dict[str, list[float]]:
    """Per layer, the share of marked positions whose gate passes ``threshold``
    (recall) and of unmarked ones (false positives)."""
    gate = 1 / (1 + np.exp(-(np.einsum("lnd,ld->ln", x, kernel) + bias[:, None])))
    above, marked = gate > threshold, y.astype(bool)
    return {"recall": above[:, marked].mean(axis=1).round(3).tolist(),
            "false_positives": above[:, ~marked].mean(axis=1).round(3).tolist()}


def cap_false_positives(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                        threshold: float, rate: float) -> np.ndarray:
    """``bias`` lowered, per layer, just enough that at most ``rate`` of the unmarked
    positions of ``x`` pass ``threshold`` (a layer already under it is kept).
    ``ValueError`` for a threshold outside (0, 1), which every gate or none passes."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a false-positive cap needs a write threshold in (0, 1), "
                         f"got {threshold}")
    logits = np.einsum("lnd,ld->ln", x, kernel)[:, ~y.astype(bool)] + bias[:, None]
    quantile = np.quantile(logits, 1.0 - rate, axis=1)
    return bias - np.maximum(0.0, quantile - np.log(threshold / (1.0 - threshold)))


def fit_write_gates(model: CausalLM, tokens: np.ndarray, targets: np.ndarray, *, seq_len: int,
                    count: int, block_size: int, seed: int,
                    max_false_positives: float = 0.0) -> dict[str, Any]:
    """Fit ``model``'s write gates in place to ``targets`` (one 0/1 mark per token of
    ``tokens``, cut into sequences of ``seq_len + 1`` as training cuts them) on
    ``count`` marked sequences; a quarter of them (at least one) is held out to
    report each layer's recall and false positives at the bank's threshold,
    before and after. ``max_false_positives`` > 0 then lowers each layer's bias
    until at most that share of the fitting sequences' unmarked tokens pass: the
    exact bank keeps its most recent writes, so every unmarked token written pushes
    a marked one out. ``ValueError`` when fewer than two sequences hold marks."""
    model.require_bounded()
    span = seq_len + 1
    rows = tokens[:tokens.size // span * span].reshape(-1, span)[:, :seq_len]
    marks = targets[:tokens.size // span * span].reshape(-1, span)[:, :seq_len]
    rng = np.random.default_rng(seed)
    marked = [i for i in rng.permutation(len(rows)) if marks[i].any()][:count]
    if len(marked) < 2:
        raise ValueError(f"phase2.fit_write_gates needs at least 2 sequences with marks in "
                         f"data.write_targets, found {len(marked)}")
    xs, ys = [], []
    for i in marked:
        positive, negative = np.flatnonzero(marks[i]), np.flatnonzero(marks[i] == 0)
        negative = rng.choice(negative, min(NEGATIVES_PER_SEQUENCE, negative.size),
                              replace=False)
        positions = np.concatenate([positive, negative])
        xs.append(layer_inputs(model, rows[i], positions, block_size=block_size))
        ys.append(marks[i][positions])
    held = max(1, len(marked) // 4)
    x_fit, y_fit = np.concatenate(xs[held:], axis=1), np.concatenate(ys[held:])
    x_held, y_held = np.concatenate(xs[:held], axis=1), np.concatenate(ys[:held])
    proj = model.layers.self_attn.write_proj
    kernel, bias = np.asarray(proj.kernel[...], np.float32)[..., 0], \
        np.asarray(proj.bias[...], np.float32)[..., 0]
    threshold = model.spec.bank.write_gate_threshold_exact
    before = gate_rates(x_held, y_held, kernel, bias, threshold)
    kernel, bias = fit_balanced_logistic(x_fit, y_fit, kernel, bias)
    if max_false_positives:
        bias = cap_false_positives(x_fit, y_fit, kernel, bias, threshold, max_false_positives)
    proj.kernel[...] = jnp.asarray(kernel[..., None], proj.kernel[...].dtype)
    proj.bias[...] = jnp.asarray(bias[:, None], proj.bias[...].dtype)
    return {"sequences": len(marked), "held_out": held, "marked_positions": int(y_fit.sum()),
            "threshold": threshold, "max_false_positives": max_false_positives,
            "before": before,
            "after": gate_rates(x_held, y_held, kernel, bias, threshold)}
