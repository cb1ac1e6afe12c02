"""HuggingFace model directories (config.json + safetensors) -> ``coda_jax.CausalLM``.

Weights are read tensor by tensor and written straight into the model's
parameters in the target dtype, one stacked parameter at a time, so a
conversion never holds a second copy of the model in host memory. Parameters
a HF checkpoint lacks (CoDA's theta, lambda_proj, write gate, ...) keep their
initial values until an adapter file supplies them. Every tensor is checked
for NaN and Inf as it is read; an adapter file is read and checked before
any HF weight is.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from coda_jax import safe_paths
from coda_jax.abstract_model import abstract_model
from coda_jax.decoder import CausalLM
from coda_jax.model_config import DecoderConfig

from .adapters import AdapterDims, load_adapters, read_adapter_file, \
    resolve_reference_compat, weights_dims
from .reference import check_finite
from .safetensors_io import CheckpointReader

# Keys some checkpoints carry that are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(model_dir: str | os.PathLike) -> DecoderConfig:
    """The decoder config of a HF model directory (``config.json``).

    ``FileNotFoundError`` for a missing directory or config.json, ``ValueError``
    for a path that is not a directory or a config.json that is not a valid
    config of a supported family (naming the file and the problem).
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise FileNotFoundError(f"no HuggingFace model directory at {model_dir}")
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is {safe_paths.describe_path(model_dir)}, not a "
                         "HuggingFace model directory")
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    if not path.is_file():
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not a config file")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: "
                         f"{str(err)[:200]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    try:
        return DecoderConfig.from_hf(config)
    except KeyError as err:
        raise ValueError(f"{path}: the config lacks {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def open_checkpoint(model_dir: str | os.PathLike) -> CheckpointReader:
    """The safetensors index of a HF model directory, malformed headers and
    indexes reported as ``ValueError`` naming the file."""
    try:
        return CheckpointReader(model_dir)
    except (KeyError, TypeError, AttributeError, IndexError, struct.error) as err:
        raise ValueError(f"{model_dir}: malformed safetensors header or index "
                         f"({type(err).__name__}: {err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{model_dir}: the safetensors index is not text ({err.reason})"
                         ) from None


def _hf_key(path: tuple[str, ...], layer: int | None) -> tuple[str, bool] | None:
    """HF checkpoint key of one of our parameters and whether it is transposed,
    or None for parameters HF checkpoints do not have."""
    *owner, leaf = path
    transposed = leaf == "kernel"
    name = "weight" if leaf in ("kernel", "embedding") else leaf
    if owner == ["lm_head"]:
        return "lm_head.weight", True
    if owner in (["embed_tokens"], ["norm"]):
        return f"model.{owner[0]}.{name}", False
    if owner and owner[0] == "layers":
        rest = owner[1:]
        if rest[:1] == ["self_attn"] and rest[1:2] not in (
                ["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"], ["q_norm"], ["k_norm"]):
            return None  # CoDA's own parameters
        return f"model.layers.{layer}.{'.'.join(rest + [name])}", transposed
    raise KeyError(f"no HuggingFace key for parameter {'.'.join(path)}")


def _params(model: nnx.Module) -> Iterator[tuple[tuple[str, ...], nnx.Variable]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield tuple(str(p) for p in path), node


class TensorSource(Protocol):
    """Tensors under HuggingFace names: what :func:`load_weights` reads from."""

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> np.ndarray: ...


def load_weights(model: CausalLM, source: TensorSource, where: str, *,
                 ignored: tuple[str, ...] = IGNORED_SUFFIXES, progress: bool = True) -> None:
    """Copy ``source``'s tensors (HF names and layouts) into ``model``, which may
    be abstract (``nnx.eval_shape``): each parameter is then allocated only
    when its weights arrive. ``where`` names the source in errors.

    Raises ``ValueError`` naming the key on missing weights, unexpected weights
    or shape mismatches; those checks run before any parameter is written. A
    NaN or Inf value is found as its tensor is read (the model is then left
    partly loaded: discard it).
    """
    available = set(source.keys())
    layers = model.cfg.num_layers
    plan = []  # (variable, [(key, transposed)], stacked)
    wanted = set()
    for path, variable in _params(model):
        stacked = path[0] == "layers"
        keys = [_hf_key(path, i) for i in range(layers)] if stacked else [_hf_key(path, None)]
        if keys[0] is None:
            continue
        expected = variable.get_value().shape[1:] if stacked else variable.get_value().shape
        for key, transposed in keys:
            if key not in available:
                raise ValueError(f"{where}: weight {key!r} is missing")
            shape = source.shape(key)[::-1] if transposed else source.shape(key)
            if tuple(shape) != tuple(expected):
                raise ValueError(f"{where}: weight {key!r} has shape {source.shape(key)}, "
                                 f"the config implies {tuple(expected)}")
            wanted.add(key)
        plan.append((variable, keys, stacked))
    unexpected = sorted(k for k in available if k not in wanted and not k.endswith(ignored))
    if unexpected:
        raise ValueError(f"{where}: weights the config does not account for: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    with tqdm(plan, desc="weights", disable=not progress) as bar:
        for variable, keys, stacked in bar:
            target = variable.get_value()  # a ShapeDtypeStruct when the model is abstract
            host = np.empty(target.shape, np.dtype(target.dtype))
            for i, (key, transposed) in enumerate(keys):
                tensor = source.read(key)
                check_finite(tensor, f"{where}: weight {key!r}")
                (host[i] if stacked else host)[...] = tensor.T if transposed else tensor
                del tensor
            # Wait for the copy: an asynchronous transfer keeps its host buffer alive,
            # and on a loaded machine several whole stacked tensors were in flight.
            variable.set_value(jax.block_until_ready(jax.device_put(host)))
            del host


def load_hf_weights(model: CausalLM, model_dir: str | os.PathLike, *,
                    progress: bool = True) -> None:
    """Copy a HF checkpoint into ``model`` (see :func:`load_weights`)."""
    ignored = IGNORED_SUFFIXES
    if model.reference_compat:  # the reference's Qwen3 attention drops these
        ignored += ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
    load_weights(model, open_checkpoint(model_dir), str(model_dir), ignored=ignored,
                 progress=progress)


def init_missing_params(model: CausalLM, seed: int) -> None:
    """Give parameters no checkpoint supplied (CoDA's own, in a model built
    abstractly) their initial values, building one layer's attention at a time."""
    missing = [(path, var) for path, var in _params(model)
               if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if not missing:
        return
    for path, _ in missing:
        if path[:2] != ("layers", "self_attn"):
            raise ValueError(f"parameter {'.'.join(path)} has no weights in the checkpoint")
    per_layer: dict[tuple[str, ...], list] = {path: [] for path, _ in missing}
    for i in range(model.cfg.num_layers):
        attention = model.fresh_attention(dtype=missing[0][1].get_value().dtype,
                                          rngs=nnx.Rngs(seed + i))
        for path in per_layer:
            owner = attention
            for part in path[2:]:
                owner = getattr(owner, part)
            per_layer[path].append(owner.get_value())
        del attention
    for path, variable in missing:
        variable.set_value(jnp.stack(per_layer.pop(path)))




def read_adapters_for(cfg: DecoderConfig, adapters: str | os.PathLike | None, attention: str,
                      where: str | os.PathLike, reference_compat: bool | None
                      ) -> tuple[dict[str, Any] | None, bool]:
    """The adapter file's weights, checked against the model's config (before
    any model weight is read), and the resolved ``reference_compat``."""
    if adapters is None:
        return None, bool(reference_compat)
    if attention == "gqa":
        raise ValueError("adapters need attention='coda' or 'coda_bounded'")
    weights = read_adapter_file(adapters)  # checked for its own consistency
    dims = weights_dims(weights)
    wanted = AdapterDims(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size)
    if dims != wanted or len(weights) != cfg.num_layers:
        raise ValueError(f"{adapters} does not fit {where}: the adapter has "
                         f"{len(weights)} layers ({dims}), the config "
                         f"{cfg.num_layers} layers ({wanted})")
    return weights, bool(resolve_reference_compat(cfg.family, adapters, reference_compat))


def load_hf_model(model_dir: str | os.PathLike, *, attention: str = "gqa",
                  attention_options: dict[str, Any] | None = None,
                  adapters: str | os.PathLike | None = None,
                  reference_compat: bool | None = None, dtype=jnp.bfloat16, seed: int = 0,
                  progress: bool = True) -> CausalLM:
    """Build the model a HF directory describes and load its weights in ``dtype``,
    then, if given, an adapter file's CoDA weights.

    ``reference_compat=None`` decides by itself: a Qwen3 model with a reference
    adapter file runs the reference's computation (no q_norm/k_norm), with a warning.
    The adapter file is read and checked (against the config's head counts
    too) before any HF weight is.
    """
    cfg = read_config(model_dir)
    weights, reference_compat = read_adapters_for(cfg, adapters, attention, model_dir,
                                                  reference_compat)
    # Built abstractly: parameters are allocated as their weights are read.
    model = abstract_model(lambda: CausalLM(
        cfg, attention=attention, attention_options=attention_options,
        reference_compat=bool(reference_compat), param_dtype=dtype, rngs=nnx.Rngs(seed)))
    load_hf_weights(model, model_dir, progress=progress)
    init_missing_params(model, seed)
    if weights is not None:
        load_adapters(model, weights)
    return model
