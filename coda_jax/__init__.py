"""CoDA-GQA-L in JAX: bounded-memory differential attention and its saveable state."""

from .bounded import CoDAGQALandmark
from .checkpoint import load_state, read_state_metadata, save_state
from .config import AttentionConfig, BankConfig, lf_band_dims
from .state import BankMetrics, BankState, select_rows, stack_states
from .unbounded import BaselineGQA, CoDAGQA

__all__ = [
    "AttentionConfig",
    "BankConfig",
    "BankMetrics",
    "BankState",
    "BaselineGQA",
    "CoDAGQA",
    "CoDAGQALandmark",
    "lf_band_dims",
    "load_state",
    "read_state_metadata",
    "save_state",
    "select_rows",
    "stack_states",
]
