"""Save and restore bounded states with Orbax, fingerprinted against the model.

A saved state records the bank and attention configs of every layer and a
hash of the weights that produced it; restoring into a different config (or,
unless told otherwise, different weights) raises a ``ValueError`` that names
the difference. Nothing is unpickled. A save never clobbers an existing
checkpoint unless ``overwrite=True``, and then only after the new one is
complete on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import orbax_io
from .bounded import CoDAGQALandmark
from .bank_layout import stack_shapes, state_shapes
from .config import AttentionConfig, BankConfig
from .state import BankMetrics, BankState

FORMAT = "coda_jax.bank_state/2"
# Format 1 (no checksums, no ``nonfinite`` flag) still loads, with a warning.
LEGACY_FORMATS = ("coda_jax.bank_state/1",)
_HASH_FULL_LIMIT = 1 << 20   # hash small arrays whole; sample larger ones
_HASH_SAMPLES = 1 << 16


def _layers_of(model: Any) -> tuple[list[CoDAGQALandmark], list[nnx.Module]]:
    """(one bounded layer per state layer, giving configs and shapes; the modules
    whose weights the fingerprint covers) for one layer, a list of layers, or a
    model exposing ``bank_layer_specs``."""
    if isinstance(model, CoDAGQALandmark):
        return [model], [model]
    specs = getattr(model, "bank_layer_specs", None)
    if specs is not None:
        return list(specs), [model]
    if isinstance(model, Sequence) and model and all(
            isinstance(layer, CoDAGQALandmark) for layer in model):
        return list(model), list(model)
    raise ValueError("save_state/load_state need a CoDAGQALandmark, a sequence of them, "
                     f"or a model with .bank_layer_specs; got {type(model).__name__}")


def weights_fingerprint(layers: Sequence[nnx.Module]) -> str:
    """sha256 over every parameter's path, shape, dtype and values (large arrays sampled)."""
    digest = hashlib.sha256()
    for i, layer in enumerate(layers):
        for path, variable in sorted(nnx.iter_graph(layer), key=lambda item: str(item[0])):
            if not isinstance(variable, nnx.Param):
                continue
            value = variable[...]
            digest.update(f"{i}/{path}/{value.shape}/{value.dtype}".encode())
            flat = value.reshape(-1)
            if flat.size > _HASH_FULL_LIMIT:
                flat = flat[:: flat.size // _HASH_SAMPLES]
            digest.update(np.asarray(flat).tobytes())
    return digest.hexdigest()


def _describe(layers: Sequence[CoDAGQALandmark], weights: Sequence[nnx.Module],
              state: BankState) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "num_layers": len(layers),
        "stacked": len(layers) > 1,
        "batch_size": int(state.batch_size),
        "dtype": str(jnp.dtype(state.k_buf.dtype)),
        "configs": [{"attention": dataclasses.asdict(layer.attn_cfg),
                     "bank": dataclasses.asdict(layer.bank_cfg)} for layer in layers],
        "weights_sha256": weights_fingerprint(weights),
        "jax_version": jax.__version__,
    }


def _expected_state(layers: Sequence[CoDAGQALandmark], batch_size: int, dtype) -> Any:
    shapes = [state_shapes(layer.layout, batch_size, jnp.dtype(dtype)) for layer in layers]
    return shapes[0] if len(layers) == 1 else stack_shapes(shapes)


def _check_matches(layers, state) -> None:
    expected = _expected_state(layers, state.batch_size, state.k_buf.dtype)
    got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), state)
    want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), expected)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise ValueError("the state does not belong to this model: its leaves are "
                         f"{jax.tree.leaves(got)}, the model expects {jax.tree.leaves(want)}")


def nonfinite_rows(state: BankState) -> list[int]:
    """Batch rows whose buffer a NaN or Inf reached (in any layer); reads the flag
    back from the device."""
    flags = np.asarray(state.nonfinite).reshape(-1, state.batch_size)
    return np.flatnonzero(flags.any(axis=0)).tolist()


def check_finite(state: BankState) -> None:
    """``ValueError`` naming the rows whose state holds NaN or Inf values."""
    rows = nonfinite_rows(state)
    if rows:
        raise ValueError(f"batch row(s) {rows} of this state hold NaN or Inf values (a "
                         "non-finite input or activation reached the banks); such a state "
                         "gives garbage answers and is not saved")


def save_state(path: str | os.PathLike, state: BankState, model: Any, *,
               overwrite: bool = False) -> Path:
    """Write ``state`` (one layer's, or a layer stack's with a leading layer axis)
    of ``model`` to the directory ``path``; return the absolute path.

    Refuses (``ValueError``) a state that does not fit the model or whose rows
    hold NaN/Inf values; replaces an existing saved state only with
    ``overwrite=True``, and never anything else (see :func:`orbax_io.write`).
    """
    layers, weights = _layers_of(model)
    _check_matches(layers, state)
    check_finite(state)
    return orbax_io.write(path, state, _describe(layers, weights, state), overwrite=overwrite,
                          what="state")


def read_state_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata saved beside a state (configs, weights fingerprint, batch, dtype)."""
    return orbax_io.read_meta(path, FORMAT, "state", accepted=LEGACY_FORMATS)


_FIELD_DEFAULTS = {
    group: {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
    for group, cls in (("attention", AttentionConfig), ("bank", BankConfig))}


def _config_differences(saved: list[dict], layers: Sequence[CoDAGQALandmark]) -> list[str]:
    diffs = []
    for i, (old, layer) in enumerate(zip(saved, layers)):
        now = {"attention": dataclasses.asdict(layer.attn_cfg),
               "bank": dataclasses.asdict(layer.bank_cfg)}
        for group in ("attention", "bank"):
            for key in sorted(set(old[group]) | set(now[group])):
                # A state saved before a field existed was written with its default.
                a, b = old[group].get(key, _FIELD_DEFAULTS[group].get(key)), now[group].get(key)
                if a != b and not (isinstance(a, list) and tuple(a) == b):
                    diffs.append(f"layer {i} {key}: saved {a!r}, model {b!r}")
    return diffs


def load_state(path: str | os.PathLike, model: Any, *, check_weights: bool = True
               ) -> BankState:
    """Restore a state saved by :func:`save_state` for ``model``.

    Raises ``ValueError`` when the saved configs differ from the model's, and,
    with ``check_weights``, when the weights that produced the state differ.
    """
    path = Path(path).absolute()
    meta = read_state_metadata(path)
    layers, weights = _layers_of(model)
    if meta["num_layers"] != len(layers):
        raise ValueError(f"{path} holds a state of {meta['num_layers']} layer(s); "
                         f"the model has {len(layers)}")
    diffs = _config_differences(meta["configs"], layers)
    if diffs:
        raise ValueError(f"the state at {path} was saved for another config: " + "; ".join(diffs))
    if check_weights and meta["weights_sha256"] != weights_fingerprint(weights):
        raise ValueError(f"the state at {path} was computed by different weights "
                         "(weights fingerprint differs); pass check_weights=False to load anyway")
    abstract = _expected_state(layers, meta["batch_size"], jnp.dtype(meta["dtype"]))
    if meta["format"] in LEGACY_FORMATS:
        state = _from_legacy(orbax_io.read_tree(path, None, "state"), abstract, path)
        _check_matches(layers, state)
        return state
    return orbax_io.read_tree(path, abstract, "state")


def _from_legacy(raw: dict[str, Any], abstract: BankState, path: Path) -> BankState:
    """A format-1 state (saved without the ``nonfinite`` flag) in today's structure."""
    fields = dict(raw)
    metrics = fields.pop("metrics", None)
    fields["metrics"] = BankMetrics(**metrics) if isinstance(metrics, dict) else None
    k_buf = np.asarray(fields["k_buf"])
    fields["nonfinite"] = ~np.isfinite(k_buf.reshape(*fields["pos"].shape, -1)).all(-1)
    try:
        state = jax.tree.map(lambda want, got: jnp.asarray(got, want.dtype), abstract,
                             BankState(**fields))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the saved state at {path} (format 1) does not fit this model: "
                         f"{err}") from err
    return state
