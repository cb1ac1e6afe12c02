"""A model built abstractly (its parameters' shapes and dtypes, no weights), as the
loaders build one before reading weights into it.

``nnx.eval_shape`` traces the model's construction. Every random key a layer draws
updates the ``nnx.Rngs`` counter, a traced value, and flax asks that value for its
``sharding``; a tracer refuses with an error whose message names where the value
came from, found by walking every operation traced so far. Flax catches the error
and the message is never shown, but building it makes a 30-layer model's
construction quadratic in its layers: seconds on a CPU
(``benchmarks/results/abstract_model_cpu.json``, in git history at 0d9ad71).
:func:`abstract_model` builds the same model with those messages left empty while it
traces.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

from flax import nnx

try:  # JAX's tracer class, private: without it the messages are simply built
    from jax._src.interpreters.partial_eval import DynamicJaxprTracer as _Tracer
except ImportError:  # pragma: no cover (another JAX layout)
    _Tracer = None

Module = TypeVar("Module", bound=nnx.Module)


@contextlib.contextmanager
def _no_origin_messages() -> Iterator[None]:
    """Tracers' error messages without the walk that names their origin."""
    if _Tracer is None or not callable(getattr(_Tracer, "_origin_msg", None)):
        yield
        return
    own = "_origin_msg" in vars(_Tracer)
    saved = vars(_Tracer).get("_origin_msg")
    _Tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        if own:
            _Tracer._origin_msg = saved
        else:
            del _Tracer._origin_msg


def abstract_model(make: Callable[[], Module]) -> Module:
    """``nnx.eval_shape(make)``: the module ``make`` builds, every parameter a
    ``jax.ShapeDtypeStruct``, traced without building tracers' origin messages."""
    with _no_origin_messages():
        return nnx.eval_shape(make)
