"""Converters between this package and other formats: the PyTorch reference (now),
HuggingFace checkpoints and adapter files (see the README's roadmap)."""

from .reference import (
    from_reference,
    load_reference_weights,
    reference_state_dict,
    state_from_reference,
    state_to_reference,
)

__all__ = [
    "from_reference",
    "load_reference_weights",
    "reference_state_dict",
    "state_from_reference",
    "state_to_reference",
]
