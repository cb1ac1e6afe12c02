"""The reference's adapter files (``coda_adapters.pt``) <-> a ``CausalLM``'s CoDA weights.

The file is a dict ``"layer_{i}" -> state_dict`` of that layer's
``LlamaCoDAAdapter``/``Qwen3CoDAAdapter`` (keys ``coda.q_proj.weight``,
``coda.theta``, ...). ``.pt`` files are only read with ``weights_only=True``
loading; ``.safetensors`` files hold the same tensors under
``layer_{i}.<key>``. Everything is checked before any weight is written.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from coda_jax import orbax_io
from coda_jax.decoder import CausalLM

from .reference import ADAPTER_PREFIX, _to_numpy, _variable_for, reference_state_dict
from .safetensors_io import SafetensorsFile

AdapterWeights = dict[str, dict[str, np.ndarray]]
# Orbax checkpoints of adapter weights written by `python -m convert adapters`.
ADAPTER_FORMAT = "coda_jax.adapters/1"
# Our own safetensors exports say whether Qwen3's q/k norms were part of the model.
QK_NORM_METADATA = "coda_jax.qk_norm"
# Attention weights that come from the HF checkpoint, never from an adapter.
HF_OWNED = ("q_norm.", "k_norm.")


def _adapter_keys(model: CausalLM) -> dict[str, np.ndarray]:
    """The reference adapter's keys (no prefix) -> stacked arrays (layers first)."""
    return {k: v for k, v in reference_state_dict(model.layers.self_attn).items()
            if not k.startswith(HF_OWNED)}


def read_adapter_file(path: str | os.PathLike) -> AdapterWeights:
    """``layer_{i}`` -> {reference key: array}, from a ``.pt`` (read with
    ``weights_only=True``), a ``.safetensors`` or an Orbax adapter checkpoint."""
    path = Path(path)
    if path.is_dir():
        orbax_io.read_meta(path, ADAPTER_FORMAT, "adapter checkpoint")
        tree = orbax_io.read_tree(path, None)
        return {layer: {k: np.asarray(v) for k, v in sd.items()} for layer, sd in tree.items()}
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    if path.suffix == ".safetensors":
        file = SafetensorsFile(path)
        out: AdapterWeights = {}
        for name in file.keys():
            layer, _, key = name.partition(".")
            out.setdefault(layer, {})[key] = file.read(name)
        return out
    import pickle

    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a plain adapter file (refused by weights_only "
                         f"loading): {str(err).splitlines()[0]}") from err
    if not isinstance(raw, Mapping) or not all(
            isinstance(v, Mapping) and all(isinstance(t, torch.Tensor) for t in v.values())
            for v in raw.values()):
        raise ValueError(f"{path} must hold a dict 'layer_i' -> {{name: tensor}}")
    return {layer: {k: _to_numpy(t) for k, t in sd.items()} for layer, sd in raw.items()}


def _strip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if sd and all(k.startswith(ADAPTER_PREFIX) for k in sd):
        return {k[len(ADAPTER_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def load_adapters(model: CausalLM, weights: AdapterWeights | str | os.PathLike, *,
                  strict: bool = True) -> None:
    """Write adapter weights (a file or :func:`read_adapter_file`'s dict) into ``model``.

    ``ValueError`` on a missing or extra layer, a missing or extra key, or a
    shape mismatch (e.g. other head counts); nothing is written unless all
    layers pass. ``strict=False`` tolerates missing keys (a phase-1 adapter
    without the write gate loaded into a bounded model).
    """
    if not isinstance(weights, Mapping):
        weights = read_adapter_file(weights)
    if model.attention == "gqa":
        raise ValueError("adapters need attention='coda' or 'coda_bounded'")
    layers = model.cfg.num_layers
    names = {f"layer_{i}" for i in range(layers)}
    if set(weights) != names:
        missing = sorted(names - set(weights), key=lambda n: int(n.split("_")[1]))
        extra = sorted(set(weights) - names)
        raise ValueError(f"adapter layers do not match the model's {layers}: missing "
                         f"{missing}, unexpected {extra}")
    expected = {k: v[0] for k, v in _adapter_keys(model).items()}
    tensors = {name: _strip(sd) for name, sd in weights.items()}
    for name, sd in tensors.items():
        unexpected = sorted(set(sd) - set(expected))
        missing = sorted(set(expected) - set(sd))
        if unexpected or (missing and strict):
            raise ValueError(f"{name}: missing {missing}, unexpected {unexpected}")
        for key, value in sd.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{name}: {key!r} has shape {value.shape}, the model's is "
                                 f"{expected[key].shape} (num_heads={model.cfg.num_heads}, "
                                 f"num_kv_heads={model.cfg.num_kv_heads}, "
                                 f"head_dim={model.cfg.head_dim})")
    attention = model.layers.self_attn
    for key in expected:
        if key not in tensors["layer_0"]:
            continue
        variable, transposed = _variable_for(attention, key)
        per_layer = [tensors[f"layer_{i}"][key] for i in range(layers)]
        stacked = np.stack([t.T if transposed else t for t in per_layer])
        variable[...] = jnp.asarray(stacked, variable[...].dtype)


def adapter_weights(model: CausalLM) -> AdapterWeights:
    """The model's attention weights in the reference's adapter layout."""
    if model.attention == "gqa":
        raise ValueError("a model with attention='gqa' has no CoDA adapters")
    stacked = _adapter_keys(model)
    return {f"layer_{i}": {ADAPTER_PREFIX + k: v[i] for k, v in stacked.items()}
            for i in range(model.cfg.num_layers)}


def save_adapters(model: CausalLM, path: str | os.PathLike, *, overwrite: bool = False
                  ) -> Path:
    """Write the reference's ``coda_adapters.pt`` format (or ``.safetensors``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    weights = adapter_weights(model)
    if model.cfg.qk_norm and not model.reference_compat and path.suffix == ".pt":
        warnings.warn("this Qwen3 model applies q_norm/k_norm, which the reference's "
                      "Qwen3 adapter drops: the reference will compute something else",
                      stacklevel=2)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        flat = {f"{layer}.{key}": np.ascontiguousarray(np.asarray(v, np.float32))
                for layer, sd in weights.items() for key, v in sd.items()}
        save_file(flat, path, metadata={QK_NORM_METADATA: str(
            model.cfg.qk_norm and not model.reference_compat)})
        return path
    import torch

    torch.save({layer: {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}
                for layer, sd in weights.items()}, path)
    return path


def adapter_uses_qk_norm(path: str | os.PathLike) -> bool:
    """Whether an adapter file was trained with Qwen3's q/k norms: only our own
    safetensors exports can say so; a ``.pt`` is the reference's format, which drops them."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return False
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__", {})
    return meta.get(QK_NORM_METADATA) == "True"


def resolve_reference_compat(family: str, adapters: str | os.PathLike,
                             requested: bool | None) -> bool:
    """For Qwen3, a reference adapter file implies ``reference_compat`` (with a warning)."""
    if requested is not None or family != "qwen3":
        return bool(requested)
    if adapter_uses_qk_norm(adapters):
        return False
    warnings.warn("loading a reference Qwen3 adapter: its attention skips Qwen3's "
                  "q_norm/k_norm, so the model runs with reference_compat=True to "
                  "reproduce it", stacklevel=2)
    return True
