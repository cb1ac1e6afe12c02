"""Driving a bounded layer or a whole model: segments, checks, compiled calls.

A *runnable* module (``CoDAGQALandmark``, or a ``CausalLM`` of any kind: its
state is a ``BankState``, or an unbounded model's ``KVCache``) exposes pure
functions of its weights, inputs and state:

    prefill_segment(x, lengths, state, *, block_size, training, unroll, last_only)
        -> (outputs, state)      one segment of whole blocks (what training
                                 differentiates through)
    decode_step(x, state, *, training) -> (outputs, state)   one token per row
                                 (what generation scans over)

plus ``check_input(x, what)`` (returns x as an array), ``check_state(state,
batch)``, ``check_room(state, needed, what)`` (refuses a state that cannot take
``needed`` more tokens per row: a bounded state always can) and ``output_dim``.
This module does everything else, once for all: it checks the inputs, cuts
prompts into fixed-size segments (one compilation per block size for any
length), and owns the compiled entry points and the functions bound to a
module's current weights. Every setting that changes the compiled program
(block size, training, unroll, last_only) is a static argument of the jit, so
it is part of the compile key.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .kv_cache import KVCache
from .segments import check_lengths, join_segments, split_segments
from .state import BankState

State = BankState | KVCache

MAX_UNROLLED_BLOCKS = 16
_COMPILES: collections.Counter[str] = collections.Counter()


class Runnable(Protocol):
    """What a module provides to be driven by this runner."""

    output_dim: int

    def check_input(self, x: Any, *, what: str = ...) -> jax.Array: ...
    def check_state(self, state: State, batch_size: int) -> None: ...
    def check_room(self, state: State, needed: Any, *, what: str) -> None: ...
    def prefill_segment(self, x: jax.Array, lengths: jax.Array, state: State, *,
                        block_size: int, training: bool, unroll: int | bool,
                        last_only: bool) -> tuple[jax.Array, State]: ...
    def decode_step(self, x: jax.Array, state: State, *, training: bool
                    ) -> tuple[jax.Array, State]: ...


def default_unroll() -> int | bool:
    """How many blocks of one prefill call run as straight-line code by default.

    On GPU a rolled loop reads its predicate back to the host every block, so
    the host cannot queue the next block's kernels while the GPU works: fully
    unrolled, prefill ran 1.15x faster at D=4096 and 1.7x at D=512 with block
    1024 on an H100 (benchmarks/results/NOTES.md). Elsewhere unrolling only
    adds compile time.
    """
    return MAX_UNROLLED_BLOCKS if jax.default_backend() == "gpu" else 1


def compile_counts() -> dict[str, int]:
    """How many times each compiled entry point has been traced, by
    ``"entry:ModuleClass"`` (a retrace per call shows up here)."""
    return dict(_COMPILES)


def count_trace(entry: str, module: Any) -> None:
    """Record one trace of ``entry`` for ``module`` (called while tracing)."""
    _COMPILES[f"{entry}:{type(module).__name__}"] += 1


# ---------------------------------------------------------------- compiled entries
# NNX modules are pytrees: a module travels into jit as its arrays plus a
# static tree definition (config included), far cheaper than nnx.split per call.
def _prefill_traced(module, x, lengths, state, *, block_size, training, unroll, last_only):
    count_trace("prefill", module)
    return module.prefill_segment(x, lengths, state, block_size=block_size, training=training,
                                  unroll=unroll, last_only=last_only)


_prefill_jit = jax.jit(_prefill_traced,
                       static_argnames=("block_size", "training", "unroll", "last_only"))


@functools.partial(jax.jit, static_argnames=("training",))
def _step_jit(module, x, state, *, training):
    count_trace("step", module)
    return module.decode_step(x, state, training=training)


@functools.partial(jax.jit, static_argnames=("training",))
def _decode_jit(module, xs, state, *, training):
    count_trace("decode", module)

    def body(st, x_t):
        y, st = module.decode_step(x_t[:, None], st, training=training)
        return st, y[:, 0]

    state, ys = jax.lax.scan(body, state, xs.swapaxes(0, 1))
    return ys.swapaxes(0, 1), state


def bind_weights(module: nnx.Module, fn: Callable[..., Any], *,
                 donate_args: tuple[int, ...] = ()) -> Callable[..., Any]:
    """``fn(module, *args)`` compiled, with the module's weights captured now.

    Passing a module to a jitted function walks it on every call (on the CPU
    host about 80 us for one layer, more for a model), which dominates a call
    made once per token from Python; binding flattens the weights once. The
    returned callable keeps these weights (a snapshot): bind again after
    changing them. ``donate_args`` (indices into ``args``) are donated: the
    caller must not use them after the call (a state stepped in a loop is then
    updated in place instead of copied each call).
    """
    graphdef, weights = nnx.split(module)
    treedef = jax.tree.structure(weights)

    @functools.partial(jax.jit, donate_argnums=tuple(1 + i for i in donate_args))
    def run(leaves, *args):
        return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args)

    leaves = jax.tree.leaves(weights)
    return lambda *args: run(leaves, *args)


# ---------------------------------------------------------------- driving
def run_segments(module: Runnable, segment_fn: Callable, x: Any, state: State, *,
                 lengths=None, block_size: int, chunks_per_call: int | None,
                 last_only: bool = False) -> tuple[jax.Array, State]:
    """Check the inputs, then ``segment_fn(x_segment, lengths_in_it, state)`` over
    the prompt's segments; join the outputs (or keep each row's last one)."""
    x = module.check_input(x)
    batch, length = x.shape[:2]
    module.check_state(state, batch)
    lengths = check_lengths(lengths, batch, length)
    if last_only and isinstance(lengths, np.ndarray) and (lengths == 0).any():
        rows = np.flatnonzero(lengths == 0).tolist()
        raise ValueError(f"last_only=True needs at least one token per row; row(s) {rows} "
                         f"have none (input shape {tuple(x.shape)})")
    module.check_room(state, lengths, what="the prompt")
    if length == 0:  # nothing to read: the state is unchanged
        return jnp.zeros((batch, 0, module.output_dim), jnp.float32), state
    outputs, last = [], None
    for x_seg, seg_lengths in split_segments(x, lengths, block_size=block_size,
                                             chunks_per_call=chunks_per_call):
        out, state = segment_fn(x_seg, seg_lengths, state)
        if last_only:  # a row's last token lies in the last segment it has tokens in
            last = out if last is None else jnp.where(
                (seg_lengths > 0)[:, None, None], out, last)
        else:
            outputs.append(out)
    if last_only:
        return last, state
    return join_segments(outputs, length), state


def prefill(module: Runnable, x: Any, state: State, *, block_size: int, lengths=None,
            training: bool = False, chunks_per_call: int | None = None,
            unroll: int | bool | None = None, last_only: bool = False
            ) -> tuple[jax.Array, State]:
    """Read a prompt into ``state`` segment by segment (see :func:`run_segments`)."""
    run = functools.partial(_prefill_jit, module, block_size=block_size, training=training,
                            unroll=default_unroll() if unroll is None else unroll,
                            last_only=last_only)
    return run_segments(module, run, x, state, lengths=lengths, block_size=block_size,
                        chunks_per_call=chunks_per_call, last_only=last_only)


def prefill_fn(module: Runnable, *, block_size: int, training: bool = False,
               chunks_per_call: int | None = None, unroll: int | bool | None = None,
               last_only: bool = False) -> Callable[..., tuple[jax.Array, State]]:
    """:func:`prefill` bound to the module's current weights and these settings:
    ``fn(x, state, lengths=None) -> (outputs, state)``."""
    run = bind_weights(module, functools.partial(
        _prefill_traced, block_size=block_size, training=training,
        unroll=default_unroll() if unroll is None else unroll, last_only=last_only))

    def bound(x: Any, state: State, lengths=None) -> tuple[jax.Array, State]:
        return run_segments(module, run, x, state, lengths=lengths, block_size=block_size,
                            chunks_per_call=chunks_per_call, last_only=last_only)

    return bound


def check_step(module: Runnable, x: Any, state: State) -> jax.Array:
    """Inputs of one decode step: one token per row, a state of the same batch."""
    x = module.check_input(x)
    if x.shape[1] != 1:
        raise ValueError(f"step takes one token per row, shape (batch, 1, ...); got "
                         f"{tuple(x.shape)}")
    module.check_state(state, x.shape[0])
    module.check_room(state, 1, what="one more token")
    return x


def step(module: Runnable, x: Any, state: State, *, training: bool = False
         ) -> tuple[jax.Array, State]:
    """One compiled decode step of every row."""
    return _step_jit(module, check_step(module, x, state), state, training=training)


def step_fn(module: Runnable, *, training: bool = False
            ) -> Callable[[Any, State], tuple[jax.Array, State]]:
    """:func:`step` bound to the module's current weights: ``fn(x, state)``."""
    run = bind_weights(module, lambda m, x, st: m.decode_step(x, st, training=training))

    def bound(x: Any, state: State) -> tuple[jax.Array, State]:
        return run(check_step(module, x, state), state)

    return bound


def decode(module: Runnable, xs: Any, state: State, *, training: bool = False
           ) -> tuple[jax.Array, State]:
    """Feed a (B, T, ...) sequence through the decode rule in one compiled loop."""
    xs = module.check_input(xs)
    module.check_state(state, xs.shape[0])
    module.check_room(state, xs.shape[1], what="the sequence")
    return _decode_jit(module, xs, state, training=training)
