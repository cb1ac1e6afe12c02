"""Converters between this package and other formats.

HuggingFace model directories (``load_hf_model``), GGUF files (llama.cpp's
format: ``load_gguf_model``, ``GGUFFile``), the reference's adapter
files (``load_adapters``, ``save_adapters``, ``read_adapter_file``), its
modules and per-layer states (``from_reference``, ``state_from_reference``,
``state_to_reference``), and its saved neural-database states
(``import_reference_states``); compact bf16 safetensors exports of whole
models in shards of bounded size (``export_model``, ``load_export``). The
command line is ``python -m convert``.
"""

from .adapters import adapter_weights, load_adapters, read_adapter_file, save_adapters
from .gguf import GGUFFile, load_gguf_model
from .hf import load_hf_model, read_config
from .model_export import export_model, load_export
from .reference import (
    from_reference,
    load_reference_weights,
    reference_state_dict,
    state_from_reference,
    state_to_reference,
)
from .reference_states import import_reference_states, read_reference_states

__all__ = [
    "GGUFFile",
    "adapter_weights",
    "export_model",
    "from_reference",
    "import_reference_states",
    "load_adapters",
    "load_export",
    "load_gguf_model",
    "load_hf_model",
    "load_reference_weights",
    "read_adapter_file",
    "read_config",
    "read_reference_states",
    "reference_state_dict",
    "save_adapters",
    "state_from_reference",
    "state_to_reference",
]
