"""The reference's saved neural states (``NeuralDatabase.save_state`` .pt files) -> ours.

Those files pickle the reference's ``CoDAGQALandmarkStatePerf2`` dataclass and
the reference reads them with ``weights_only=False``, which runs whatever code
a file carries. Here they are read with ``weights_only=True``: tensors, plain
containers and that one class name, mapped onto an inert record, are all the
unpickler may build; anything else is refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from coda_jax.decoder import CausalLM
from coda_jax.state import BankState

from .reference import state_from_reference

REFERENCE_STATE_CLASS = "coda_gqa_l.state.CoDAGQALandmarkStatePerf2"


class ReferenceStateRecord:
    """Receives a pickled reference state's fields as attributes; has no behaviour."""


def read_reference_states(path: str | os.PathLike) -> dict[str, Any]:
    """The ``{"states": {layer: record}, "metadata": {...}}`` dict of a reference state file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file at {path}")
    try:
        with torch.serialization.safe_globals([(ReferenceStateRecord, REFERENCE_STATE_CLASS)]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} holds objects other than a reference neural state; refused "
                         f"(weights_only): {str(err).splitlines()[0]}") from err
    states = data.get("states") if isinstance(data, dict) else None
    if not isinstance(states, dict) or not all(
            isinstance(s, ReferenceStateRecord) for s in states.values()):
        raise ValueError(f"{path} is not a reference neural state file "
                         "(expected {'states': {layer: state}, 'metadata': ...})")
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
    ours = [state_from_reference(states[i], layer, dtype=dtype)
            for i, layer in enumerate(layers)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *ours), dict(data.get("metadata", {}))
