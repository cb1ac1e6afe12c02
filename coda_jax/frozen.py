"""Compiled calls bound to a module's current weights.

Passing an NNX module to a jitted function walks the module on every call (on
the CPU host: about 80 us for one layer, more for a model), which dominates a
decode step called once per token from Python. Binding flattens the weights
once; each call then hands XLA a flat list of arrays.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def bind_weights(module: nnx.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(module, *args)`` compiled, with the module's weights captured now.

    The returned callable keeps using these weights (a snapshot): bind again
    after changing them.
    """
    graphdef, weights = nnx.split(module)
    treedef = jax.tree.structure(weights)

    @jax.jit
    def run(leaves, *args):
        return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args)

    leaves = jax.tree.leaves(weights)
    return lambda *args: run(leaves, *args)
