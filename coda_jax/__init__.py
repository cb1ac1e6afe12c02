"""CoDA-GQA-L in JAX: bounded-memory differential attention and its saveable state.

Layers (``CoDAGQALandmark``, ``CoDAGQA``, ``BaselineGQA``), decoder models
(``CausalLM`` with a ``DecoderConfig``), compiled generation from any kind
(the bounded ``BankState`` or the unbounded kinds' ``KVCache``), the row
helpers of both, and Orbax checkpoints of bounded states and models.
"""

from .bounded import CoDAGQALandmark
from .checkpoint import check_finite, load_state, nonfinite_rows, read_state_metadata, save_state
from .config import AttentionConfig, BankConfig, lf_band_dims
from .decoder import CausalLM
from .generation import generate, sample_logits, split_fits
from .kv_cache import KVCache
from .layer_steps import LayerStates, LayerSteps, steps_by_layer
from .model_config import AttentionSpec, DecoderConfig
from .model_io import load_model, read_model_metadata, save_model
from .state import (BankMetrics, BankState, batch_axis, concat_rows, narrow_buffers, row_axes,
                    select_rows, stack_states, tree_bytes, where_rows, widen_buffers)
from .unbounded import BaselineGQA, CoDAGQA

__all__ = [
    "AttentionConfig",
    "BankConfig",
    "BankMetrics",
    "AttentionSpec",
    "BankState",
    "BaselineGQA",
    "CausalLM",
    "CoDAGQA",
    "CoDAGQALandmark",
    "DecoderConfig",
    "KVCache",
    "LayerStates",
    "LayerSteps",
    "batch_axis",
    "check_finite",
    "concat_rows",
    "generate",
    "lf_band_dims",
    "load_model",
    "load_state",
    "narrow_buffers",
    "nonfinite_rows",
    "read_model_metadata",
    "read_state_metadata",
    "row_axes",
    "sample_logits",
    "save_model",
    "save_state",
    "select_rows",
    "split_fits",
    "stack_states",
    "steps_by_layer",
    "tree_bytes",
    "where_rows",
    "widen_buffers",
]
