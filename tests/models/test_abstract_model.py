"""coda_jax.abstract_model: the same abstract model as nnx.eval_shape, and JAX's
tracers as they were afterwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval

from coda_jax import CausalLM, DecoderConfig
from coda_jax.abstract_model import abstract_model

CONFIG = DecoderConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _make():
    return CausalLM(CONFIG, attention="coda_bounded", param_dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(0))


def _shapes(model):
    return jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(model, nnx.Param))


def test_the_same_abstract_model_as_eval_shape():
    ours, theirs = abstract_model(_make), nnx.eval_shape(_make)
    assert _shapes(ours) == _shapes(theirs)
    assert nnx.graphdef(ours) == nnx.graphdef(theirs)
    leaves = jax.tree.leaves(nnx.state(ours, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_tracers_name_their_origin_again_afterwards():
    original = partial_eval.DynamicJaxprTracer._origin_msg
    with pytest.raises(RuntimeError, match="inside"):
        abstract_model(lambda: (_ for _ in ()).throw(RuntimeError("inside")))
    abstract_model(_make)
    assert partial_eval.DynamicJaxprTracer._origin_msg is original

    def concrete_index(x):
        return [0, 1][x]  # a tracer used as a Python index: its error names its origin

    with pytest.raises(jax.errors.TracerIntegerConversionError, match="argument x"):
        jax.jit(concrete_index)(0)
