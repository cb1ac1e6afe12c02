"""Static configuration of the attention layers, validated once at construction.

A config is a frozen, hashable dataclass: it is part of a layer's static
structure (so jit specialises on it) and of the fingerprint of a saved state.
Field names and defaults are the reference's constructor keywords.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from .primitives import check_rope_scaling

HeadNormMode = Literal["full", "identity"]
WritePolicy = Literal["gated", "none"]
MemInit = Literal["random_normal", "zeros"]
LfBand = Literal["reference", "frequency"]
ExactEviction = Literal["lru", "gate"]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Shape and numerics shared by every attention variant (bounded or not)."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_base: float = 10_000.0
    rope_interleaved: bool = True
    head_norm_mode: HeadNormMode = "full"
    eps: float = 1e-6
    differential: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    # HuggingFace rope_scaling as sorted (key, value) items; None = plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    # Qwen3: RMSNorm of each query/key head (over head_dim) before RoPE.
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        check_rope_scaling(self.rope_scaling)  # refuse what RoPE would fail on at the forward
        for name in ("embed_dim", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.embed_dim % self.num_heads != 0:
                raise ValueError(
                    f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                    f"({self.num_heads}); pass head_dim= to decouple them")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads}) (grouped-query attention)")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim must be even (RoPE and the Givens rotation act on pairs), "
                f"got {self.head_dim}")
        _check_choice("head_norm_mode", self.head_norm_mode, ("full", "identity"))
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class BankConfig:
    """Everything that fixes the shape and the update rules of the bounded state."""

    window: int
    num_landmarks_exact: int
    num_landmarks_summary: int
    write_policy: WritePolicy = "gated"
    write_gate_threshold_exact: float = 0.10
    write_gate_threshold_summary: float = 0.05
    exact_match_threshold: float = 0.90
    exact_novelty_threshold: float = 0.70
    exact_refresh_on_hit: bool = False
    exact_candidates_per_block: int = 8
    summary_candidates_per_block: int = 64
    summary_overwrite_on_insert: bool = True
    min_landmarks_exact: int | None = None
    max_landmarks_exact: int | None = None
    min_landmarks_summary: int | None = None
    max_landmarks_summary: int | None = None
    expansion_t_max: int = 1_000_000
    mem_init: MemInit = "random_normal"
    mask_unused_memory: bool = True
    detach_evicted: bool = True
    collect_metrics: bool = False
    lf_band: LfBand = "reference"
    # Not the reference's (0 there): a token's write gate, as the banks see it when it
    # is evicted, is the largest of its own and the next N tokens' gates, so the words
    # just before a salient token (those a question names) are written with it.
    write_gate_lookahead: int = 0
    # Not the reference's ("lru" there): which exact slot a novel token replaces. "lru":
    # the least recently touched; "gate": the one holding the lowest write gate, and
    # only if the newcomer's gate is higher, so the bank keeps a document's most
    # salient tokens, not its last writes.
    exact_eviction: ExactEviction = "lru"
    # Not the reference's (0 there): the first N tokens of a document go to the exact
    # bank with a gate above any other (exact_eviction="gate" then never replaces them):
    # attention sinks, which a window that slides past them loses (StreamingLLM).
    sink_tokens: int = 0
    # Not the reference's (None there): when attention reads the exact bank, a key more
    # than this many positions before the query is rotated to exactly this distance
    # (ReRoPE's clamp), so a document longer than the model's training positions shows
    # it no rotary distance it never saw; nothing changes at shorter distances. The
    # window's keys are never moved: they are at most window + block positions away
    # (more than window is required); the summary bank's prototypes, averaged over
    # tokens at many positions, are not moved either. The state then records each
    # exact slot's position (``BankState.exact_pos``).
    max_key_distance: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.window) or self.window <= 0:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        for name in ("num_landmarks_exact", "num_landmarks_summary", "expansion_t_max",
                     "exact_candidates_per_block", "summary_candidates_per_block",
                     "min_landmarks_exact", "max_landmarks_exact", "min_landmarks_summary",
                     "max_landmarks_summary"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("write_gate_threshold_exact", "write_gate_threshold_summary",
                     "exact_match_threshold", "exact_novelty_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("exact_refresh_on_hit", "summary_overwrite_on_insert",
                     "mask_unused_memory", "detach_evicted", "collect_metrics"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.write_gate_lookahead) or not \
                0 <= self.write_gate_lookahead < self.window:
            raise ValueError(f"write_gate_lookahead must be an integer from 0 to window - 1 "
                             f"({self.window - 1}), got {self.write_gate_lookahead!r}")
        if self.num_landmarks_exact < 0 or self.num_landmarks_summary < 0:
            raise ValueError("num_landmarks_exact and num_landmarks_summary must be >= 0")
        if not _is_int(self.sink_tokens) or not 0 <= self.sink_tokens <= self.num_landmarks_exact:
            raise ValueError(f"sink_tokens must be an integer from 0 to num_landmarks_exact "
                             f"({self.num_landmarks_exact}), got {self.sink_tokens!r}")
        if self.sink_tokens and self.exact_eviction != "gate":
            raise ValueError("sink_tokens needs exact_eviction='gate' (under 'lru' newer "
                             f"writes would push the sinks out), got {self.exact_eviction!r}")
        if self.max_key_distance is not None and (
                not _is_int(self.max_key_distance) or self.max_key_distance <= self.window):
            raise ValueError(f"max_key_distance must be None or an integer above window "
                             f"({self.window}), got {self.max_key_distance!r}")
        _check_choice("write_policy", self.write_policy, ("gated", "none"))
        _check_choice("mem_init", self.mem_init, ("random_normal", "zeros"))
        _check_choice("lf_band", self.lf_band, ("reference", "frequency"))
        _check_choice("exact_eviction", self.exact_eviction, ("lru", "gate"))
        for bank, default in (("exact", self.num_landmarks_exact),
                              ("summary", self.num_landmarks_summary)):
            lo = getattr(self, f"min_landmarks_{bank}")
            hi = getattr(self, f"max_landmarks_{bank}")
            lo = default if lo is None else int(lo)
            hi = default if hi is None else int(hi)
            if lo < 0:
                raise ValueError(f"min_landmarks_{bank} must be >= 0, got {lo}")
            if lo > hi:
                raise ValueError(f"min_landmarks_{bank} ({lo}) > max_landmarks_{bank} ({hi})")
            object.__setattr__(self, f"min_landmarks_{bank}", lo)
            object.__setattr__(self, f"max_landmarks_{bank}", hi)
        # The reference clamps negative candidate counts to zero.
        object.__setattr__(self, "exact_candidates_per_block",
                           max(0, int(self.exact_candidates_per_block)))
        object.__setattr__(self, "summary_candidates_per_block",
                           max(0, int(self.summary_candidates_per_block)))

    # Physical layout: the buffer always has room for the largest banks.
    @property
    def num_exact(self) -> int:
        return int(self.max_landmarks_exact)

    @property
    def num_summary(self) -> int:
        return int(self.max_landmarks_summary)

    @property
    def buffer_len(self) -> int:
        return self.window + self.num_exact + self.num_summary

    @property
    def gated(self) -> bool:
        return self.write_policy != "none"


def lf_band_dims(head_dim: int, rope_interleaved: bool, lf_band: LfBand) -> np.ndarray:
    """Key dimensions of the low-frequency band used by the summary bank.

    ``"reference"`` is the reference's slice ``[head_dim // 2:]``: the slowest
    half of the RoPE pairs under interleaved pairing, but half of *every* pair
    under contiguous-halves pairing. ``"frequency"`` picks the slowest
    ``ceil(P / 2)`` of the ``P = head_dim / 2`` rotary pairs under either
    pairing (pair i turns at ``base ** (-2i / head_dim)``, so higher i is slower).
    """
    if lf_band == "reference":
        return np.arange(head_dim // 2, head_dim)
    num_pairs = head_dim // 2
    slow_pairs = np.arange(num_pairs // 2, num_pairs)
    if rope_interleaved:
        dims = np.stack([2 * slow_pairs, 2 * slow_pairs + 1], axis=-1).reshape(-1)
    else:
        dims = np.concatenate([slow_pairs, slow_pairs + num_pairs])
    return np.sort(dims)


def expansion_thresholds(lo: int, hi: int, t_max: int) -> np.ndarray:
    """Token counts at which the log ceiling of a bank rises by one slot.

    The reference's ceiling is ``lo + int((hi - lo) * min(1, ln(1+t) / ln(1+T)))``.
    Precomputing, in float64 on the host, the first ``t`` at which each extra
    slot is allowed turns the ceiling into an integer comparison on device:
    exact agreement with the reference and no float32 rounding at boundaries.
    """
    span = hi - lo
    if span <= 0:
        return np.zeros((0,), np.int64)
    if t_max <= 0:
        return np.zeros((span,), np.int64)  # reference: no ceiling at all

    def ceiling(t: int) -> int:
        ratio = min(math.log(1 + t) / math.log(1 + t_max), 1.0)
        return int(span * ratio)

    thresholds = []
    for k in range(1, span + 1):
        lo_t, hi_t = 0, t_max
        while lo_t < hi_t:  # smallest t with ceiling(t) >= k; ceiling is monotone
            mid = (lo_t + hi_t) // 2
            if ceiling(mid) >= k:
                hi_t = mid
            else:
                lo_t = mid + 1
        thresholds.append(lo_t)
    return np.asarray(thresholds, np.int64)
