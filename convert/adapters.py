"""The reference's adapter files (``coda_adapters.pt``) <-> a ``CausalLM``'s CoDA weights.

The file is a dict ``"layer_{i}" -> state_dict`` of that layer's
``LlamaCoDAAdapter``/``Qwen3CoDAAdapter`` (keys ``coda.q_proj.weight``,
``coda.theta``, ...). ``.pt`` files are only read with torch's safe
(tensors-only) loader, so a file carrying code is refused, never run;
``.safetensors`` files hold the same tensors under ``layer_{i}.<key>``.

Every way in goes through one check, :func:`check_adapter_weights`: layers
``layer_0 .. layer_{N-1}`` without gaps or extras, every layer the same keys,
keys among the reference adapter's parameter names, shapes consistent with one
``(num_heads, num_kv_heads, head_dim, embed_dim)`` (the model's, when there is
one), floating-point values free of NaN and Inf. Nothing is written into a
model, and no file is written, unless all layers pass. Exports replace only
an adapter file of the same format written by coda_jax, atomically.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from coda_jax import orbax_io, safe_paths
from coda_jax.decoder import CausalLM

from .reference import ADAPTER_PREFIX, to_numpy, variable_for, check_finite, \
    reference_state_dict
from .safetensors_io import SafetensorsFile
from .torch_files import safe_torch_load

AdapterWeights = dict[str, dict[str, np.ndarray]]
# Orbax checkpoints of adapter weights written by `python -m convert adapters`.
ADAPTER_FORMAT = "coda_jax.adapters/1"
# Our own safetensors exports say whether Qwen3's q/k norms were part of the model.
QK_NORM_METADATA = "coda_jax.qk_norm"
# Attention weights that come from the HF checkpoint, never from an adapter.
HF_OWNED = ("q_norm.", "k_norm.")
# Export formats and the file suffix each goes with.
EXPORT_FORMATS = {"pt": ".pt", "safetensors": ".safetensors"}
FORMAT_DESCRIPTIONS = {"pt": "reference coda_adapters.pt (torch pickle of tensors)",
                       "safetensors": "safetensors"}
_TORCH_SUFFIXES = (".pt", ".pth")  # other suffixes: the content decides


class AdapterDims(NamedTuple):
    """The dimensions an adapter's shapes are consistent with."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._asdict().items())


# The reference adapter's parameter names (without the ``coda.`` prefix) -> their
# shapes (torch layout) for given dimensions: CoDAGQA's, plus CoDAGQALandmark's
# write gate and summary rate (see ``reference_state_dict`` of either layer).
ADAPTER_SHAPES: dict[str, Callable[[AdapterDims], tuple[int, ...]]] = {
    "theta": lambda d: (d.num_heads, d.head_dim // 2),
    "q_proj.weight": lambda d: (d.num_heads * d.head_dim, d.embed_dim),
    "q_proj.bias": lambda d: (d.num_heads * d.head_dim,),
    "k_proj.weight": lambda d: (d.num_kv_heads * d.head_dim, d.embed_dim),
    "k_proj.bias": lambda d: (d.num_kv_heads * d.head_dim,),
    "v_proj.weight": lambda d: (d.num_kv_heads * d.head_dim, d.embed_dim),
    "v_proj.bias": lambda d: (d.num_kv_heads * d.head_dim,),
    "o_proj.weight": lambda d: (d.embed_dim, d.num_heads * d.head_dim),
    "o_proj.bias": lambda d: (d.embed_dim,),
    "lambda_proj.weight": lambda d: (d.num_heads, d.embed_dim),
    "lambda_proj.bias": lambda d: (d.num_heads,),
    "write_proj.weight": lambda d: (1, d.embed_dim),
    "write_proj.bias": lambda d: (1,),
    "summary_eta_logit": lambda d: (d.num_kv_heads,),
    "head_norm.weight": lambda d: (d.head_dim,),
}
# What every CoDA adapter has, bounded or not (the dimensions are read from these).
REQUIRED_KEYS = ("theta", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                 "lambda_proj.weight")


def _layer_order(name: Any) -> tuple[int, str]:
    match = re.fullmatch(r"layer_(\d+)", str(name))
    return (int(match.group(1)) if match else 1 << 62, str(name))


def _sorted_layers(names: Iterable[Any]) -> list[str]:
    return [str(n) for n in sorted(names, key=_layer_order)]


def _strip(sd: Mapping[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith(ADAPTER_PREFIX) for k in sd):
        return {k[len(ADAPTER_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def _dims_from(layer: Mapping[str, np.ndarray], where: str) -> AdapterDims:
    """The dimensions layer_0's theta, q_proj and k_proj imply."""
    theta, q, k = layer["theta"].shape, layer["q_proj.weight"].shape, layer["k_proj.weight"].shape
    for key, shape, meaning in (("theta", theta, "(num_heads, head_dim/2)"),
                                ("q_proj.weight", q, "(num_heads*head_dim, embed_dim)"),
                                ("k_proj.weight", k, "(num_kv_heads*head_dim, embed_dim)")):
        if len(shape) != 2 or 0 in shape:
            raise ValueError(f"{where}: {key!r} has shape {shape}, expected {meaning}")
    head_dim = 2 * theta[1]
    if k[0] % head_dim:
        raise ValueError(f"{where}: 'k_proj.weight' has shape {k}, not a multiple of "
                         f"head_dim={head_dim} (from 'theta' {theta}) rows")
    dims = AdapterDims(num_heads=theta[0], num_kv_heads=k[0] // head_dim, head_dim=head_dim,
                       embed_dim=q[1])
    if dims.num_heads % dims.num_kv_heads:
        raise ValueError(f"{where}: num_heads={dims.num_heads} (from 'theta' {theta}) is not a "
                         f"multiple of num_kv_heads={dims.num_kv_heads} (from 'k_proj.weight' "
                         f"{k})")
    return dims


def weights_dims(weights: Mapping[str, Mapping[str, np.ndarray]]) -> AdapterDims:
    """The dimensions of adapter weights already checked by :func:`check_adapter_weights`."""
    return _dims_from(_strip(weights["layer_0"]), "layer_0")


def model_dims(model: CausalLM) -> AdapterDims:
    cfg = model.cfg
    return AdapterDims(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size)


def check_adapter_weights(weights: Mapping[str, Any], source: str = "adapter weights", *,
                          model: CausalLM | None = None, strict: bool = True
                          ) -> tuple[AdapterWeights, AdapterDims]:
    """Check adapter weights and return them without the ``coda.`` prefix, with their
    dimensions. The one validation every reader and writer of adapters uses.

    Without ``model``, the weights are checked for their own consistency (the
    ``adapters`` command has no model); with one, against the model's layer
    count, keys and shapes (``strict=False`` tolerates keys the model has and
    the weights lack, such as a phase-1 adapter's write gate). Raises
    ``ValueError`` naming the layer and key.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{source} holds no adapter layers")
    count = model.cfg.num_layers if model is not None else len(weights)
    names = [f"layer_{i}" for i in range(count)]
    given = {str(n) for n in weights}
    if given != set(names) or len(given) != len(weights):
        missing = _sorted_layers(set(names) - given)
        extra = _sorted_layers(given - set(names))
        if model is not None:
            raise ValueError(f"{source}: adapter layers do not match the model's {count}: "
                             f"missing {missing}, unexpected {extra}")
        raise ValueError(f"{source}: layers must be named layer_0 .. layer_{count - 1} "
                         f"without gaps: missing {missing}, unexpected {extra}")
    by_name = {str(n): sd for n, sd in weights.items()}
    tensors: AdapterWeights = {}
    for name in names:
        sd = by_name[name]
        if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
            raise ValueError(f"{source}: {name} is a {type(sd).__name__}, not a dict "
                             "{name: tensor}")
        for key, value in sd.items():
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{source}: {name}: {key!r} is a {type(value).__name__}, "
                                 "not an array")
        tensors[name] = _strip(sd)

    first = tensors["layer_0"]
    if model is not None:
        expected = {k: tuple(v.shape[1:]) for k, v in _adapter_keys(model).items()}
        known, needed = set(expected), set(expected) if strict else set()
    else:
        known, needed = set(ADAPTER_SHAPES), set(REQUIRED_KEYS)
    for name, sd in tensors.items():
        unexpected, missing = sorted(set(sd) - known), sorted(needed - set(sd))
        if unexpected or missing:
            raise ValueError(f"{source}: {name}: missing {missing}, unexpected {unexpected}")
        if set(sd) != set(first):
            raise ValueError(f"{source}: {name} has other keys than layer_0: missing "
                             f"{sorted(set(first) - set(sd))}, unexpected "
                             f"{sorted(set(sd) - set(first))}")
    if model is not None:
        dims = model_dims(model)
        against = (f"the model's (num_heads={dims.num_heads}, num_kv_heads={dims.num_kv_heads}, "
                   f"head_dim={dims.head_dim})")
    else:
        dims = _dims_from(first, f"{source}: layer_0")
        expected = {k: ADAPTER_SHAPES[k](dims) for k in first}
        against = f"what layer_0 implies ({dims})"
    for name, sd in tensors.items():
        for key, value in sd.items():
            if tuple(value.shape) != expected[key]:
                raise ValueError(f"{source}: {name}: {key!r} has shape {tuple(value.shape)}, "
                                 f"{against} is {expected[key]}")
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise ValueError(f"{source}: {name}: {key!r} has dtype {value.dtype}, not a "
                                 "floating-point type")
            check_finite(value, f"{source}: {name}: {key!r}")
    return tensors, dims


def _adapter_keys(model: CausalLM) -> dict[str, np.ndarray]:
    """The reference adapter's keys (no prefix) -> stacked arrays (layers first)."""
    return {k: v for k, v in reference_state_dict(model.layers.self_attn).items()
            if not k.startswith(HF_OWNED)}


# ---------------------------------------------------------------- reading files
def _is_torch_tensor_dict(raw: Any) -> bool:
    import torch

    return isinstance(raw, Mapping) and all(
        isinstance(layer, str) and isinstance(sd, Mapping)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in sd.items())
        for layer, sd in raw.items())


def _read_pt(path: Path, progress: bool) -> AdapterWeights:
    import torch

    what = "PyTorch adapter file"
    raw = safe_torch_load(path, what)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} is not a {what}: it holds a {type(raw).__name__}, expected "
                         "a dict 'layer_i' -> {name: tensor}")
    for layer, sd in raw.items():
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path} is not a {what}: its entry {layer!r} is a "
                             f"{type(sd).__name__}, expected a dict {{name: tensor}}")
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path} refused: it holds objects other than tensors "
                                 f"({layer}: {key!r} is of type {type(value).__name__}, "
                                 "not a tensor)")
    out: AdapterWeights = {}
    with tqdm(raw.items(), desc="layers", total=len(raw), disable=not progress) as bar:
        for layer, sd in bar:
            out[layer] = {k: to_numpy(t) for k, t in sd.items()}
    return out


def _open_safetensors(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except (KeyError, TypeError, AttributeError, IndexError, struct.error) as err:
        raise ValueError(f"{path} has a malformed safetensors header "
                         f"({type(err).__name__})") from None


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """The ``__metadata__`` of a safetensors file, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > path.stat().st_size - 8:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__", {})
    return meta if isinstance(meta, dict) else None


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(9)[8:9] == b"{"
    except OSError:
        return False


def _read_safetensors(path: Path, progress: bool) -> AdapterWeights:
    file = _open_safetensors(path)
    out: AdapterWeights = {}
    with tqdm(file.keys(), desc="tensors", disable=not progress) as bar:
        for name in bar:
            layer, _, key = name.partition(".")
            out.setdefault(layer, {})[key] = file.read(name)
    return out


def read_adapter_file(path: str | os.PathLike, *, progress: bool = False) -> AdapterWeights:
    """``layer_{i}`` -> {reference key: array}, from a ``.pt`` (tensors only), a
    ``.safetensors`` or an Orbax adapter checkpoint, checked for its own
    consistency (:func:`check_adapter_weights`); keys keep their prefix."""
    path = Path(path)
    if path.is_dir():
        orbax_io.read_meta(path, ADAPTER_FORMAT, "adapter checkpoint")
        tree = orbax_io.read_tree(path, None, "adapter checkpoint")
        if not isinstance(tree, Mapping):
            raise ValueError(f"{path}: the saved adapter checkpoint holds no layers")
        out = {layer: ({k: np.asarray(v) for k, v in sd.items()} if isinstance(sd, Mapping)
                       else sd) for layer, sd in tree.items()}
    elif not path.exists():
        raise FileNotFoundError(f"no adapter file at {path}")
    elif not path.is_file():
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not an adapter file")
    elif path.suffix == ".safetensors" or (path.suffix not in _TORCH_SUFFIXES
                                           and _looks_like_safetensors(path)):
        out = _read_safetensors(path, progress)
    else:
        out = _read_pt(path, progress)
    check_adapter_weights(out, str(path))
    return out


def load_adapters(model: CausalLM, weights: AdapterWeights | str | os.PathLike, *,
                  strict: bool = True) -> None:
    """Write adapter weights (a file or :func:`read_adapter_file`'s dict) into ``model``.

    ``ValueError`` on a missing or extra layer, a missing or extra key, a
    shape mismatch (e.g. other head counts) or a NaN/Inf value; nothing is
    written unless all layers pass. ``strict=False`` tolerates missing keys (a
    phase-1 adapter without the write gate loaded into a bounded model).
    """
    source = "adapter weights"
    if not isinstance(weights, Mapping):
        source = str(weights)
        weights = read_adapter_file(weights)
    if model.attention == "gqa":
        raise ValueError("adapters need attention='coda' or 'coda_bounded'")
    tensors, _ = check_adapter_weights(weights, source, model=model, strict=strict)
    layers = model.cfg.num_layers
    attention = model.layers.self_attn
    for key in tensors["layer_0"]:
        variable, transposed = variable_for(attention, key)
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


# ---------------------------------------------------------------- writing files
def export_format(path: str | os.PathLike, requested: str | None = None) -> str:
    """The export format for ``path``: ``requested``, or else the one its suffix names.

    ``ValueError`` for a suffix that names neither format (without
    ``requested``) or names the other one.
    """
    suffix = Path(path).suffix
    by_suffix = {s: f for f, s in EXPORT_FORMATS.items()}
    if requested is not None and requested not in EXPORT_FORMATS:
        raise ValueError(f"unknown adapter format {requested!r}; expected one of "
                         f"{sorted(EXPORT_FORMATS)}")
    if requested is None:
        if suffix not in by_suffix:
            raise ValueError(f"cannot tell the adapter format of {path} from its suffix "
                             f"{suffix or '(none)'!r}: expected .pt (pt) or .safetensors "
                             "(safetensors)")
        return by_suffix[suffix]
    if suffix in by_suffix and by_suffix[suffix] != requested:
        raise ValueError(f"{path} ends in {suffix}, the suffix of the {by_suffix[suffix]} "
                         f"format, but format {requested!r} was asked for")
    return requested


def is_our_adapter_file(path: Path, fmt: str) -> bool:
    """Whether ``path`` is an adapter export of format ``fmt`` as coda_jax writes
    them: for ``pt`` a tensors-only file of a dict ``layer_i -> {str: tensor}``,
    for ``safetensors`` one whose header carries our ``coda_jax.qk_norm`` entry."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    if fmt == "safetensors":
        meta = _safetensors_metadata(path)
        return meta is not None and QK_NORM_METADATA in meta
    try:
        raw = safe_torch_load(path, "PyTorch adapter file")
    except (ValueError, OSError):
        return False
    return bool(raw) and _is_torch_tensor_dict(raw) and all(
        re.fullmatch(r"layer_\d+", layer) for layer in raw)


def save_adapters(model: CausalLM, path: str | os.PathLike, *, overwrite: bool = False,
                  format: str | None = None, progress: bool = False) -> Path:
    """Write the reference's ``coda_adapters.pt`` format (``format="pt"``) or
    ``.safetensors`` (``format="safetensors"``); by default the format the suffix names.

    The weights are checked first (:func:`check_adapter_weights`). An existing
    ``path`` is replaced only with ``overwrite`` and only if it is an adapter
    file of the same format written by coda_jax (``FileExistsError`` /
    ``ValueError`` otherwise, nothing touched); the new file is built beside
    it and swapped in, so a failure leaves the old one whole.
    """
    fmt = export_format(path, format)
    target = safe_paths.check_replaceable(
        path, overwrite=overwrite, is_ours=lambda p: is_our_adapter_file(p, fmt),
        what=f"{fmt} adapter file")
    weights = adapter_weights(model)
    check_adapter_weights(weights, "the model's adapter weights")
    if model.cfg.qk_norm and not model.reference_compat and fmt == "pt":
        warnings.warn("this Qwen3 model applies q_norm/k_norm, which the reference's "
                      "Qwen3 adapter drops: the reference will compute something else",
                      stacklevel=2)

    def write(staging: Path) -> None:
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            flat = {}
            with tqdm(weights.items(), desc="layers", disable=not progress) as bar:
                for layer, sd in bar:
                    for key, v in sd.items():
                        flat[f"{layer}.{key}"] = np.ascontiguousarray(np.asarray(v, np.float32))
            save_file(flat, staging, metadata={QK_NORM_METADATA: str(
                model.cfg.qk_norm and not model.reference_compat)})
            return
        import torch

        out = {}
        with tqdm(weights.items(), desc="layers", disable=not progress) as bar:
            for layer, sd in bar:
                out[layer] = {k: torch.from_numpy(np.array(v, np.float32))
                              for k, v in sd.items()}
        torch.save(out, staging)

    return safe_paths.write_atomically(target, write, overwrite=overwrite,
                                       is_ours=lambda p: is_our_adapter_file(p, fmt),
                                       what=f"{fmt} adapter file")


def adapter_uses_qk_norm(path: str | os.PathLike) -> bool:
    """Whether an adapter file was trained with Qwen3's q/k norms: only our own
    safetensors exports can say so; a ``.pt`` is the reference's format, which drops them."""
    path = Path(path)
    if not path.is_file() or path.suffix in _TORCH_SUFFIXES:
        return False
    meta = _safetensors_metadata(path) or {}
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
