"""Compact exports of whole models: safetensors shards of at most a given size, and back.

What a time-limited machine sends home: the weights in bf16 (or another
dtype), cut into ``model-NNNNN.safetensors`` files of at most
``max_shard_bytes`` (a tensor larger than that is split along its first axis),
with ``export.json`` holding the model's description (config, attention
spec), the tensor-to-file map and each file's sha256. ``load_export`` checks
the checksums and rebuilds the model; ``save_model`` then makes an Orbax
checkpoint of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_jax import AttentionSpec, CausalLM, DecoderConfig, safe_paths
from coda_jax.model_io import describe_model

from .safetensors_io import SafetensorsFile

FORMAT = "coda_jax.model_export/1"
INDEX = "export.json"


def _params(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)}


def _pieces(name: str, array: np.ndarray, max_bytes: int) -> list[tuple[str, np.ndarray]]:
    """The tensor whole, or cut along axis 0 into pieces of at most ``max_bytes``."""
    if array.nbytes <= max_bytes:
        return [(name, array)]
    row = array.nbytes // max(array.shape[0], 1)
    if array.ndim == 0 or row > max_bytes:
        raise ValueError(f"{name} ({array.shape}) cannot be cut into pieces of at most "
                         f"{max_bytes} bytes along its first axis")
    step = max(1, max_bytes // row)
    return [(f"{name}@{i}", array[start:start + step])
            for i, start in enumerate(range(0, array.shape[0], step))]


def is_model_export(path: Path) -> bool:
    """Whether ``path`` is a directory written by :func:`export_model`."""
    try:
        return json.loads((path / INDEX).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_model(model: CausalLM, out_dir: str | os.PathLike, *, dtype=jnp.bfloat16,
                 max_shard_bytes: int = 16 << 20, overwrite: bool = False) -> Path:
    """Write ``model``'s weights in ``dtype`` as safetensors shards of at most
    ``max_shard_bytes`` each, atomically; an existing ``out_dir`` is replaced only
    with ``overwrite`` and only if it is such an export."""
    from safetensors.numpy import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    pieces = []
    for name, var in _params(model).items():
        array = np.asarray(var[...].astype(dtype))
        if not np.isfinite(array.astype(np.float32)).all():
            raise ValueError(f"parameter {name} holds NaN or Inf; not exported")
        pieces += _pieces(name, array, max_shard_bytes)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, array in pieces:
        if sizes[-1] + array.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = np.ascontiguousarray(array)
        sizes[-1] += array.nbytes

    def write(staging: Path) -> None:
        staging.mkdir()
        weight_map, digests = {}, {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}.safetensors"
            save_file(shard, staging / file)
            digests[file] = hashlib.sha256((staging / file).read_bytes()).hexdigest()
            weight_map |= {name: file for name in shard}
        meta = describe_model(model) | {"format": FORMAT, "dtype": str(jnp.dtype(dtype)),
                                        "weight_map": weight_map, "sha256": digests}
        (staging / INDEX).write_text(json.dumps(meta, indent=1))

    return safe_paths.write_atomically(out_dir, write, overwrite=overwrite, is_ours=is_model_export,
                                       what="model export")


def load_export(path: str | os.PathLike, *, dtype: Any = None) -> CausalLM:
    """Rebuild a model from :func:`export_model`'s directory (checksums verified), its
    weights in ``dtype`` (default: the exported dtype)."""
    path = Path(path)
    if not (path / INDEX).is_file():
        raise FileNotFoundError(f"no model export at {path} (no {INDEX})")
    if not is_model_export(path):
        raise ValueError(f"{path / INDEX} is not a coda_jax model export")
    meta = json.loads((path / INDEX).read_text())
    for file, digest in meta["sha256"].items():
        if not (path / file).is_file():
            raise ValueError(f"the model export at {path} is damaged: {file} is missing")
        if hashlib.sha256((path / file).read_bytes()).hexdigest() != digest:
            raise ValueError(f"the model export at {path} is damaged: {file} does not match "
                             "its checksum")
    dtype = jnp.dtype(dtype or meta["dtype"])
    model = nnx.eval_shape(lambda: CausalLM(
        DecoderConfig.from_dict(meta["config"]),
        attention=AttentionSpec.from_dict(meta["attention_spec"]),
        reference_compat=meta["reference_compat"], param_dtype=dtype, rngs=nnx.Rngs(0)))
    files = {file: SafetensorsFile(path / file) for file in set(meta["weight_map"].values())}
    by_param: dict[str, list[tuple[int, str]]] = {}
    for name in meta["weight_map"]:
        base, _, piece = name.partition("@")
        by_param.setdefault(base, []).append((int(piece) if piece else 0, name))
    params = _params(model)
    if set(by_param) != set(params):
        raise ValueError(f"the export at {path} does not match its config: missing "
                         f"{sorted(set(params) - set(by_param))[:5]}, unexpected "
                         f"{sorted(set(by_param) - set(params))[:5]}")
    for base, names in by_param.items():
        parts = [files[meta["weight_map"][n]].read(n) for _, n in sorted(names)]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        target = params[base].get_value()
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(f"{base} has shape {array.shape} in the export, the config "
                             f"implies {tuple(target.shape)}")
        params[base].set_value(jax.device_put(array.astype(dtype)))
    return model
