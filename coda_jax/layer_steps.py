"""Bounded decode driven from the host, one compiled call per layer (for CPUs).

A compiled loop over a model's layers (``lax.scan`` over the stacked weights) takes
each layer's weights as a dynamic slice, which XLA's CPU backend copies before the
matmuls read it: every SmolLM2 decode step copied its 430 MB of layer weights. The
layers unrolled in one program (``generate(split_layers=True)``) read them in place
but compile all the layers (for SmolLM2's 30, several times the rolled loop's compile
time). Here one layer's step is compiled once and called for each layer with that
layer's own weights and state; the state is donated, so its slots are written in
place. The default model after 1,024 tokens on the 2-core CPU: 12.3 tokens/s, against
7.6 for the compiled loop and 11.7 for ``transformers``
(``benchmarks/results/smollm2/bounded_cpu_default_model.json``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .decoder import CausalLM, stack_modules, unstack
from .runner import bind_weights
from .state import BankState, narrow_buffers, widen_buffers


def steps_by_layer() -> bool:
    """Whether single-row decode should run a layer per call (:class:`LayerSteps`): on
    a CPU. A GPU would wait on the host for each layer's launch."""
    return jax.default_backend() == "cpu"


class LayerStates(NamedTuple):
    """A model state split per layer for :class:`LayerSteps`: each layer's state, and
    the 16-bit dtype its K/V buffers were widened from (None: not widened)."""

    layers: list[BankState]
    storage_dtype: object


class LayerSteps:
    """One token per call through a bounded model, each layer its own compiled call.

    ``states = steps.start(state)`` splits a model state into per-layer states (copies,
    with 16-bit K/V buffers widened on a CPU: :func:`~coda_jax.state.widen_buffers`);
    ``logits, states = steps(token, states)`` decodes ``token`` (B,) and donates
    ``states`` (do not reuse them); ``steps.finish(states)`` gives back the model
    state, as :meth:`CausalLM.decode_step` over the same tokens would have left it.
    The weights are the model's when the steps were made; the layers' weights are
    copied apart once (the model's layer weights twice in memory while kept).
    """

    def __init__(self, model: CausalLM):
        model.require_bounded()
        self._count = model.cfg.num_layers
        graphdef, stacked = nnx.split(model.layers)
        treedef = jax.tree.structure(stacked)
        self._layers = [jax.tree.leaves(layer) for layer in unstack(stacked, self._count)]

        @functools.partial(jax.jit, static_argnames=("storage_dtype",), donate_argnums=(2,))
        def layer_step(weights, h, state, *, storage_dtype):
            layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
            return layer.decode_step(h, state, training=False, storage_dtype=storage_dtype)

        self._layer_step = layer_step
        self._hidden = model.cfg.hidden_size
        self._hidden_dtype = model.embed_tokens.embedding[...].dtype
        self._embed = bind_weights(model, lambda m, token: m.embed(token[:, None]))
        self._logits = bind_weights(model, lambda m, h: m.logits(h)[:, 0])

    def start(self, state: BankState) -> LayerStates:
        """The model state (layers, B, ...) split into per-layer states to step."""
        wide, storage_dtype = widen_buffers(state)
        return LayerStates(unstack(wide, self._count), storage_dtype)

    def __call__(self, token: jax.Array, states: LayerStates
                 ) -> tuple[jax.Array, LayerStates]:
        """Decode ``token`` (B,) -> (logits (B, V), the states after it)."""
        h = self._embed(jnp.asarray(token, jnp.int32))
        stepped = []
        for weights, state in zip(self._layers, states.layers, strict=True):
            h, state = self._layer_step(weights, h, state, storage_dtype=states.storage_dtype)
            stepped.append(state)
        return self._logits(h), LayerStates(stepped, states.storage_dtype)

    def lower_layer(self, states: LayerStates, index: int = 0) -> jax.stages.Lowered:
        """Layer ``index``'s step lowered for these states (to read its compiled program:
        ``.compile().as_text()``); nothing is run or donated."""
        hidden = jax.ShapeDtypeStruct((states.layers[index].batch_size, 1, self._hidden),
                                      self._hidden_dtype)
        return self._layer_step.lower(self._layers[index], hidden, states.layers[index],
                                      storage_dtype=states.storage_dtype)

    def finish(self, states: LayerStates) -> BankState:
        """The per-layer states stacked back into a model state, in its own dtype."""
        return narrow_buffers(stack_modules(states.layers), states.storage_dtype)
