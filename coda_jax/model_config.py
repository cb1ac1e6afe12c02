"""Decoder-model configuration, read from a HuggingFace config (Llama, Mistral, Qwen3)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .primitives import check_rope_scaling

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen3")
# transformers' defaults when a config.json leaves these out (Mistral, Qwen3).
HF_DEFAULT_SLIDING_WINDOW = 4096
HF_DEFAULT_MAX_WINDOW_LAYERS = 28


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a Llama-family decoder, independent of its attention kind."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3's per-head q_norm/k_norm
    # Keys a query sees, counting itself (Mistral's sliding window), in every layer;
    # None = all. Applied by attention="gqa" only. Metadata saved before this field
    # existed loads as None.
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(item) for item in d["rope_scaling"])
        return cls(**d)

    @classmethod
    def from_hf(cls, config: Any) -> "DecoderConfig":
        """From a ``transformers`` config object or its dict (``config.json``)."""
        d = config if isinstance(config, Mapping) else config.to_dict()
        family = d.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; expected one of "
                             f"{SUPPORTED_FAMILIES}")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported (the MLP is SwiGLU: 'silu')")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if d.get(k) is None]
        if missing:
            raise ValueError(f"the config lacks {', '.join(missing)}")
        heads = int(d["num_attention_heads"])
        theta, scaling = _rope(d)
        window = _sliding_window(d, family)
        return cls(
            family=family, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), qk_norm=family == "qwen3",
            sliding_window=window)


def _rope(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """RoPE base and scaling from either convention: transformers 5's
    ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta")
    if theta is None:
        raise ValueError("the config gives no rope_theta (nor rope_parameters.rope_theta)")
    scaling = params or dict(d.get("rope_scaling") or {})
    kind = check_rope_scaling(scaling)  # unsupported types fail here, not at the forward
    if kind == "default":
        return float(theta), None
    return float(theta), tuple(sorted((k, v) for k, v in scaling.items()
                                      if not isinstance(v, (dict, list))))


def _sliding_window(d: Mapping[str, Any], family: str) -> int | None:
    """The window every layer's attention uses, as transformers 5 decides it.

    Mistral: ``sliding_window`` (4096 when absent, null = none). Qwen3: only with
    ``use_sliding_window``, and then only in the layers ``layer_types`` marks
    ``sliding_attention`` (by default those from ``max_window_layers`` on): a
    window in some layers but not others is refused. Llama: none (transformers'
    Llama ignores the key).
    """
    if family == "mistral":
        window = d.get("sliding_window", HF_DEFAULT_SLIDING_WINDOW)
    elif family == "qwen3" and d.get("use_sliding_window", False):
        window = d.get("sliding_window", HF_DEFAULT_SLIDING_WINDOW)
        layers = int(d["num_hidden_layers"])
        first = d.get("max_window_layers", HF_DEFAULT_MAX_WINDOW_LAYERS)
        types = d.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        kinds = set(types[:layers])
        if window is None or kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            sliding = [i for i, t in enumerate(types[:layers]) if t == "sliding_attention"]
            raise ValueError(
                f"this qwen3 config has a sliding window ({window}) in layers {sliding} only "
                f"(max_window_layers={first}, layer_types); a per-layer window is not "
                "supported, only one for every layer or none")
    else:
        return None
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    return window
