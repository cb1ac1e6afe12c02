"""Save and load whole models (config + weights) as Orbax checkpoints.

Follows the NNX checkpointing recipe: the parameters are the model's
``nnx.State``; loading builds the model abstractly (``nnx.eval_shape``,
nothing allocated) and restores the weights straight into it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import orbax_io
from .abstract_model import abstract_model
from .decoder import CausalLM
from .model_config import AttentionSpec, DecoderConfig
from .state import tree_bytes

FORMAT = "coda_jax.model/2"
# Format 1 differs only in having no checksums: it loads, with a warning.
LEGACY_FORMATS = ("coda_jax.model/1",)


def describe_model(model: CausalLM) -> dict[str, Any]:
    """What rebuilds the model: configs and attention choice, plus size figures."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {"format": FORMAT, "config": dataclasses.asdict(model.cfg),
            "attention": model.attention,
            "attention_spec": model.spec.to_dict(),
            "reference_compat": model.reference_compat,
            "dtype": str(jnp.dtype(params[0].dtype)),
            "parameters": int(sum(p.size for p in params)),
            "bytes": tree_bytes(params)}


def save_model(path: str | os.PathLike, model: CausalLM, *, overwrite: bool = False,
               extra_meta: dict[str, Any] | None = None,
               extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (config, attention choice, weights) to the directory ``path``.

    An existing path is replaced (atomically) only with ``overwrite=True`` and
    only if it holds a saved model; anything else there is refused.
    ``extra_meta`` adds JSON entries to the metadata (never replacing
    :func:`describe_model`'s). ``extra_files`` (file name -> bytes, e.g. the
    model's ``tokenizer.json``) are saved inside the directory, in the same
    atomic write, and checksummed.
    """
    _, state = nnx.split(model)
    return orbax_io.write(path, state, dict(extra_meta or {}) | describe_model(model),
                          overwrite=overwrite, what="model", extra_files=extra_files)


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a saved model (config, attention, sizes), checksums verified."""
    return orbax_io.read_meta(path, FORMAT, "model", accepted=LEGACY_FORMATS)


def load_model(path: str | os.PathLike) -> CausalLM:
    """Rebuild a model saved by :func:`save_model`, weights restored in their dtype."""
    meta = read_model_metadata(path)
    cfg = DecoderConfig.from_dict(meta["config"])
    dtype = jnp.dtype(meta["dtype"])
    spec = (AttentionSpec.from_dict(meta["attention_spec"]) if "attention_spec" in meta
            else AttentionSpec.from_options(meta["attention"], meta["attention_options"]))
    abstract = abstract_model(lambda: CausalLM(
        cfg, attention=spec, reference_compat=meta["reference_compat"], param_dtype=dtype,
        rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, orbax_io.read_tree(path, abstract_state, "model"))
