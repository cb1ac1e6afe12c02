"""Decoder-model configuration, read from a HuggingFace config (Llama, Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

from .config import BankConfig, HeadNormMode

from .primitives import check_rope_scaling

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
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
    attention_bias: bool = False  # q/k/v biases (and o's, except in Qwen2: see o_proj_bias)
    qk_norm: bool = False  # Qwen3's per-head q_norm/k_norm
    # Keys a query sees, counting itself (Mistral's sliding window), in every layer;
    # None = all. Applied by attention="gqa" only. Metadata saved before this field
    # existed loads as None.
    sliding_window: int | None = None

    @property
    def o_proj_bias(self) -> bool:
        """Whether the output projection has a bias: Qwen2 biases q, k and v only."""
        return self.attention_bias and self.family != "qwen2"

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
            # Qwen2's q/k/v always have biases (its config has no attention_bias key).
            attention_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=family == "qwen3",
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
    elif family in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
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
                f"this {family} config has a sliding window ({window}) in layers {sliding} only "
                f"(max_window_layers={first}, layer_types); a per-layer window is not "
                "supported, only one for every layer or none")
    else:
        return None
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    return window


AttentionKind = Literal["gqa", "coda", "coda_bounded"]
ATTENTION_KINDS = ("gqa", "coda", "coda_bounded")
# The bank a bounded model gets when none is given (the reference adapters' medium cache).
BOUNDED_DEFAULTS = dict(window=256, num_landmarks_exact=64, num_landmarks_summary=64)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How a decoder's attention layers are built: their kind and typed options.

    ``kind="gqa"`` is the HuggingFace attention (no options); ``"coda"``
    unbounded differential attention; ``"coda_bounded"`` CoDA-GQA-L over the
    fixed-size state described by ``bank`` (default: ``BOUNDED_DEFAULTS``).
    The other fields are the differential layers' constructor keywords, with
    the reference's Llama/Qwen3 adapters' defaults (contiguous-halves RoPE, no
    head norm). :meth:`from_options` takes the reference's flat keyword names.
    """

    kind: AttentionKind = "gqa"
    bank: BankConfig | None = None
    head_norm_mode: HeadNormMode = "identity"
    rope_interleaved: bool = False
    differential: bool = True
    lambda_init_bias: float = -6.0
    theta_init: float = math.pi / 2
    eps: float = 1e-6
    write_gate_init_bias: float = -2.0
    summary_eta_init_logit: float = -3.0
    implementation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be 'gqa', 'coda' or 'coda_bounded', "
                             f"got {self.kind!r}")
        if self.kind == "coda_bounded" and self.bank is None:
            object.__setattr__(self, "bank", BankConfig(**BOUNDED_DEFAULTS))
        if self.kind != "coda_bounded" and self.bank is not None:
            raise ValueError(f"a bank configuration needs kind='coda_bounded', not {self.kind!r}")
        if isinstance(self.bank, Mapping):
            object.__setattr__(self, "bank", BankConfig(**self.bank))

    @classmethod
    def from_options(cls, kind: str, options: Mapping[str, Any] | None = None
                     ) -> "AttentionSpec":
        """From the attention layers' flat keyword names (the reference's), e.g.
        ``from_options("coda_bounded", dict(window=256, num_landmarks_exact=64, ...))``."""
        options = dict(options or {})
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be 'gqa', 'coda' or 'coda_bounded', got {kind!r}")
        if kind == "gqa":
            if options:
                raise ValueError(f"attention 'gqa' (the HuggingFace attention) takes no "
                                 f"options, got {sorted(options)}")
            return cls()
        bank_names = {f.name for f in dataclasses.fields(BankConfig)}
        own = {f.name for f in dataclasses.fields(cls)} - {"kind", "bank"}
        if kind == "coda":
            own -= {"write_gate_init_bias", "summary_eta_init_logit"}
        allowed = own | (bank_names if kind == "coda_bounded" else set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"unknown option(s) for attention {kind!r}: {unknown}; "
                             f"known: {sorted(allowed)}")
        bank = None
        if kind == "coda_bounded":
            bank = BankConfig(**(BOUNDED_DEFAULTS | {k: v for k, v in options.items()
                                                     if k in bank_names}))
        return cls(kind=kind, bank=bank, **{k: v for k, v in options.items() if k in own})

    def layer_options(self) -> dict[str, Any]:
        """Every constructor keyword of this kind's attention layer that the spec fixes."""
        if self.kind == "gqa":
            return {}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("kind", "bank")}
        if self.kind == "coda":
            del out["write_gate_init_bias"], out["summary_eta_init_logit"]
            return out
        return out | dataclasses.asdict(self.bank)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind} | self.layer_options()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttentionSpec":
        """Inverse of :meth:`to_dict` (after a JSON round trip)."""
        d = dict(d)
        return cls.from_options(d.pop("kind"), d)
