"""The reference's saved neural states (``NeuralDatabase.save_state`` .pt files) -> ours.

Those files pickle the reference's ``CoDAGQALandmarkStatePerf2`` dataclass and
the reference reads them with ``weights_only=False``, which runs whatever code
a file carries. Here they are read with ``weights_only=True``: tensors, plain
containers and that one class name, mapped onto an inert record, are all the
unpickler may build; anything else is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from coda_jax.decoder import CausalLM
from coda_jax.state import BankState

from .torch_files import safe_torch_load
from .reference import state_from_reference

REFERENCE_STATE_CLASS = "coda_gqa_l.state.CoDAGQALandmarkStatePerf2"


class ReferenceStateRecord:
    """Receives a pickled reference state's fields as attributes; has no behaviour."""


def read_reference_states(path: str | os.PathLike) -> dict[str, Any]:
    """The ``{"states": {layer: record}, "metadata": {...}}`` dict of a reference state file."""
    path = Path(path)
    data = safe_torch_load(path, "reference neural state file",
                           allowed=[(ReferenceStateRecord, REFERENCE_STATE_CLASS)])
    states = data.get("states") if isinstance(data, dict) else None
    if not isinstance(states, dict) or not all(
            isinstance(s, ReferenceStateRecord) for s in states.values()):
        raise ValueError(f"{path} is not a reference neural state file "
                         "(expected {'states': {layer: state}, 'metadata': ...})")
    if not all(isinstance(layer, int) for layer in states):
        raise ValueError(f"{path} is not a reference neural state file: its layers are "
                         f"{sorted(map(repr, states))}, expected numbers 0, 1, ...")
    if not isinstance(data.get("metadata", {}), dict):
        raise ValueError(f"{path} is not a reference neural state file: its metadata is a "
                         f"{type(data['metadata']).__name__}, expected a dict")
    return data


def import_reference_states(path: str | os.PathLike, model: CausalLM, *, dtype=jnp.float32
                            ) -> tuple[BankState, dict[str, Any]]:
    """A reference state file as this bounded model's stacked state, plus its metadata."""
    data = read_reference_states(path)
    states = data["states"]
    layers = model.bank_layer_specs
    if sorted(states) != list(range(len(layers))):
        raise ValueError(f"{path} holds states of layers {sorted(states)}, the model has "
                         f"{len(layers)}")
    ours = []
    for i, layer in enumerate(layers):
        try:
            ours.append(state_from_reference(states[i], layer, dtype=dtype))
        except AttributeError as err:
            raise ValueError(f"{path}: the state of layer {i} lacks the field "
                             f"{err.name!r}") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: the state of layer {i} does not fit the model: "
                             f"{err}") from None
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *ours), dict(data.get("metadata", {}))
