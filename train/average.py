"""Uniform weight averaging of fine-tunes of one model (a "model soup").

Two stages trained one after the other from the same start each keep what the
other lost (the default model's phase 2 on 4K documents and phase2_long on 8K
ones: short documents and long ones); their mean keeps both.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from coda_jax import AttentionSpec, CausalLM

from .steps import rebuilt


def average_models(models: Sequence[CausalLM], spec: AttentionSpec | None = None) -> CausalLM:
    """The element-wise mean of ``models``' weights (accumulated in float32, stored
    in the first model's dtype), in a model of the first one's architecture whose
    attention is built from ``spec`` (default: the first model's).

    The models must share their decoder config and parameter tree; ``ValueError``
    names the first difference.
    """
    if len(models) < 2:
        raise ValueError(f"averaging needs at least two models, got {len(models)}")
    first = models[0]
    graphdef, state = nnx.split(first, nnx.Param)
    states = [state]
    for i, other in enumerate(models[1:], start=1):
        if other.cfg != first.cfg:
            raise ValueError(f"model {i} has another architecture than model 0: "
                             f"{other.cfg} != {first.cfg}")
        other_state = nnx.state(other, nnx.Param)
        if jax.tree.structure(other_state) != jax.tree.structure(state):
            raise ValueError(f"model {i}'s weights are not model 0's tree (other attention "
                             "weights?)")
        states.append(other_state)
    mean = jax.tree.map(
        lambda *leaves: (sum(leaf.astype(jnp.float32) for leaf in leaves)
                         / len(leaves)).astype(leaves[0].dtype), *states)
    averaged = nnx.merge(graphdef, mean, nnx.state(first, nnx.Not(nnx.Param)))
    return averaged if spec is None or spec == averaged.spec else rebuilt(averaged, spec)
