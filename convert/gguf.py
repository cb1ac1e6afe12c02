"""GGUF files (llama.cpp's format) -> ``coda_jax.CausalLM``.

Read with the ``gguf`` package, the llama.cpp project's own reader and
dequantisers, never a parser of ours. A GGUF file holds the model's config
as metadata under llama.cpp's key names, its tensors under llama.cpp's
names (some quantised), and its tokenizer. This module turns the metadata
into a HuggingFace-style config (then :meth:`DecoderConfig.from_hf`, which
validates it as for a HF directory) and presents the tensors under
HuggingFace names and layouts: a name table plus one hook, undoing the row
order llama.cpp's converter gives the Q and K projections of Llama-style
models. :func:`convert.hf.load_weights` then reads them tensor by tensor
into an abstractly built model, as for a HF directory.

Everything that can be checked before a weight is read is: the magic, the
whole file's structure (a truncated file fails here), the architecture,
every tensor's type, and every tensor's shape against the config.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_jax import safe_paths
from coda_jax.abstract_model import abstract_model
from coda_jax.decoder import CausalLM
from coda_jax.model_config import DecoderConfig

from .adapters import load_adapters
from .hf import init_missing_params, load_weights, read_adapters_for

GGUF_MAGIC = b"GGUF"
# general.architecture -> our decoder family. llama.cpp writes Mistral 7B and
# other Llama-shaped models as "llama" (its "mistral3"/"mistral4" are other designs).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's converter reorders the rows of these families' Q and K projections
# (and biases) to suit its interleaved rotary layout; qwen2/qwen3 use the
# NeoX layout, which needs no reordering.
ROW_PERMUTED = ("llama",)

_SLAB_ROWS = 2048  # rows dequantised at once (bounds the dequantisers' temporaries)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str:
    """The HuggingFace name of a llama.cpp tensor name; unknown names keep theirs
    (prefixed ``gguf:``) so that the loader reports them as unexpected."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    block, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if block == "blk" and layer.isdigit() and suffix in LAYER_NAMES:
        return f"model.layers.{int(layer)}.{LAYER_NAMES[suffix]}"
    return f"gguf:{gguf_name}"


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a Q or K projection's rows (or bias).

    Its converter turns each head's rows ``[first half | second half]``
    (HuggingFace's rotary layout) into interleaved pairs ``(x0, x_half,
    x1, x_half+1, ...)``; this puts them back.
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows cannot be {heads} heads of rotary pairs")
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@functools.lru_cache(maxsize=None)
def dequantizable(type_name: str) -> bool:
    """Whether the ``gguf`` package dequantises this tensor type (asked of the
    library itself with an empty tensor, so a newer release's types count)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    block_elems, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    empty = np.zeros((0, block_bytes), np.uint8)
    try:
        quants.dequantize(empty, qtype)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 (an empty tensor may trip a working dequantiser)
        return True
    return True


class GGUFFile:
    """One GGUF file, opened and checked: its metadata and its tensors under
    HuggingFace names and layouts (``keys``, ``shape``, ``read``), dequantised to
    float32 one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.metadata = read_metadata(self.reader, self.path)
        self.architecture = _architecture(self.metadata, self.path)
        self.family = ARCHITECTURES[self.architecture]
        self.tensors = {}
        for tensor in self.reader.tensors:
            type_name = tensor.tensor_type.name
            if not dequantizable(type_name):
                raise ValueError(f"{self.path}: tensor {tensor.name!r} has type {type_name}, "
                                 "which the gguf package cannot dequantise")
            name = _hf_name(tensor.name)
            if name in self.tensors:
                raise ValueError(f"{self.path}: tensor {tensor.name!r} appears twice")
            self.tensors[name] = tensor
        if "gguf:rope_freqs.weight" in self.tensors:
            raise ValueError(f"{self.path}: the file carries rope_freqs.weight (per-frequency "
                             "RoPE factors, as Llama 3.1's scaling): not supported")
        self.config = DecoderConfig.from_hf(self.hf_config())

    def forget_metadata(self) -> None:
        """Free the reader's parsed metadata once the config is known: with a
        49K-token vocabulary and its merges it takes about 170 MB of small
        objects, more than half a copy of a 135M model. The tensors stay
        readable; the tokenizer can no longer be built from this object."""
        self.reader.fields.clear()
        self.metadata = {k: (len(v) if isinstance(v, list) else v)
                         for k, v in self.metadata.items()}

    # -------------------------------------------------------------- config
    def _key(self, name: str, default: Any = KeyError) -> Any:
        full = f"{self.architecture}.{name}"
        if full in self.metadata:
            return self.metadata[full]
        if default is KeyError:
            raise ValueError(f"{self.path}: the metadata lacks {full}")
        return default

    def _int(self, name: str, default: Any = KeyError) -> int:
        value = self._key(name, default)
        if isinstance(value, list):  # some files give a count per layer
            if len(set(value)) != 1:
                raise ValueError(f"{self.path}: {self.architecture}.{name} differs between "
                                 f"layers ({sorted(set(value))}): not supported")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{self.path}: {self.architecture}.{name} must be a positive "
                             f"integer, got {value!r}")
        return int(value)

    def hf_config(self) -> dict[str, Any]:
        """The model's config as a HuggingFace ``config.json`` dict."""
        hidden = self._int("embedding_length")
        heads = self._int("attention.head_count")
        head_dim = self._int("attention.key_length", hidden // heads)
        value_dim = self._int("attention.value_length", head_dim)
        rotary = self._int("rope.dimension_count", head_dim)
        if value_dim != head_dim:
            raise ValueError(f"{self.path}: key and value head sizes differ ({head_dim} and "
                             f"{value_dim}): not supported")
        if rotary != head_dim:
            raise ValueError(f"{self.path}: RoPE rotates {rotary} of {head_dim} head "
                             "dimensions (partial rotary): not supported")
        embedding = self.tensors.get("model.embed_tokens.weight")
        vocab = self._key("vocab_size", None)
        if vocab is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            vocab = (len(tokens) if isinstance(tokens, list) else
                     int(embedding.shape[-1]) if embedding is not None else None)
        if vocab is None:
            raise ValueError(f"{self.path}: neither the metadata nor token_embd.weight gives "
                             "the vocabulary size")
        config = {
            "model_type": self.family,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": self._int("feed_forward_length"),
            "num_hidden_layers": self._int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._int("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._key("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._key("rope.freq_base", 10_000.0)),
            "max_position_embeddings": self._key("context_length", None),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors,
            "sliding_window": self._key("attention.sliding_window", None),
        }
        scaling = self._key("rope.scaling.type", "none")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear",
                                      "factor": float(self._key("rope.scaling.factor"))}
        elif scaling != "none":
            raise ValueError(f"{self.path}: RoPE scaling {scaling!r} is not supported "
                             "(supported: none, linear)")
        return config

    # ------------------------------------------------------------- tensors
    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest first; numpy (and HF) slowest first.
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` (a HF name) as float32 in HF's layout.

        Its bytes are read with plain file reads (the reader's memory map would
        keep every page it touched resident) and dequantised a slab of rows at
        a time, so the temporaries stay small beside the float32 result.
        """
        from gguf import quants

        tensor = self.tensors[name]
        raw_shape = tensor.data.shape  # rows x bytes per row for quantised types
        raw = np.empty(raw_shape, tensor.data.dtype)
        with open(self.path, "rb") as f:
            f.seek(tensor.data_offset)
            if f.readinto(memoryview(raw.reshape(-1).view(np.uint8))) != raw.nbytes:
                raise ValueError(f"{self.path} is truncated while reading {tensor.name!r}")
        shape = self.shape(name)
        rows = raw.reshape(-1, raw_shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
        values = np.empty((rows.shape[0], int(np.prod(shape)) // rows.shape[0]), np.float32)
        try:
            for start in range(0, rows.shape[0], _SLAB_ROWS):
                part = quants.dequantize(rows[start:start + _SLAB_ROWS], tensor.tensor_type)
                values[start:start + _SLAB_ROWS] = part.reshape(len(part), -1)
        except (ValueError, IndexError) as err:
            raise ValueError(f"{self.path}: tensor {tensor.name!r} cannot be dequantised "
                             f"({err})") from None
        values = values.reshape(shape)
        if self.family in ROW_PERMUTED:
            if ".self_attn.q_proj." in name:
                values = unpermute_rows(values, self.config.num_heads)
            elif ".self_attn.k_proj." in name:
                values = unpermute_rows(values, self.config.num_kv_heads)
        return values


def open_reader(path: Path):
    """A ``gguf.GGUFReader`` of ``path``; ``FileNotFoundError`` or a ``ValueError``
    that says what is wrong (not a GGUF file, truncated, damaged)."""
    from gguf import GGUFReader

    if not path.exists():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                         f"{GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 (the reader's errors are of many kinds)
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} is truncated or damaged: the gguf reader failed "
                         f"({type(err).__name__}: {first})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {tensor.name!r} ends at byte "
                             f"{tensor.data_offset + tensor.n_bytes:,}, the file has {size:,}")
    return reader


def read_metadata(reader, path: Path) -> dict[str, Any]:
    """Every metadata field of the file as plain Python values."""
    metadata = {}
    for name, field in reader.fields.items():
        try:
            metadata[name] = field.contents()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{path}: metadata field {name!r} is unreadable "
                             f"({type(err).__name__})") from None
    return metadata


def _architecture(metadata: dict[str, Any], path: Path) -> str:
    architecture = metadata.get("general.architecture")
    if architecture is None:
        raise ValueError(f"{path}: the metadata lacks general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    return architecture


def load_gguf_model(path: str | os.PathLike | GGUFFile, *, attention: str = "gqa",
                    attention_options: dict[str, Any] | None = None,
                    adapters: str | os.PathLike | None = None,
                    reference_compat: bool | None = None, dtype=jnp.bfloat16,
                    seed: int = 0, progress: bool = True) -> CausalLM:
    """The model a GGUF file holds (a path, or an open :class:`GGUFFile`, whose
    metadata is then freed), its weights dequantised into ``dtype``.

    ``attention``, ``attention_options``, ``adapters`` (the reference's
    ``coda_adapters.pt`` or an adapter checkpoint) and ``reference_compat`` as
    for :func:`convert.load_hf_model`: ``"gqa"`` is the file's own attention;
    ``"coda"`` / ``"coda_bounded"`` put CoDA attention in, its own parameters
    from ``adapters`` or freshly initialised (from ``seed``) until trained. The
    model is built abstractly and each parameter allocated as its tensors are
    read, so the host holds about one stacked parameter beyond the model.

    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the problem
    for a file that is not GGUF, truncated or damaged, of an unsupported
    architecture or tensor type, or whose metadata contradicts its tensors'
    shapes. Everything but NaN/Inf weights is checked before a weight is read.
    """
    source = path if isinstance(path, GGUFFile) else GGUFFile(path)
    source.forget_metadata()  # only the config and the tensors are needed from here
    weights, reference_compat = read_adapters_for(source.config, adapters, attention,
                                                  source.path, reference_compat)
    model = abstract_model(lambda: CausalLM(
        source.config, attention=attention, attention_options=attention_options,
        reference_compat=reference_compat, param_dtype=dtype, rngs=nnx.Rngs(seed)))
    ignored: tuple[str, ...] = ()
    if model.reference_compat:  # the reference's Qwen3 attention drops these
        ignored = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
    load_weights(model, source, str(source.path), ignored=ignored, progress=progress)
    init_missing_params(model, seed)
    if weights is not None:
        load_adapters(model, weights)
    return model
