"""Bridge to the PyTorch reference (``coda-gqa-l``): modules, weights and states.

``from_reference`` rebuilds a reference attention module as the equivalent
JAX layer; ``load_reference_weights``/``reference_state_dict`` move weights
(with or without the ``coda.`` prefix of the reference's Llama/Qwen3
adapters); ``state_from_reference``/``state_to_reference`` move bounded states.
torch is imported lazily: only these functions need it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_jax import BaselineGQA, BankMetrics, BankState, CoDAGQA, CoDAGQALandmark
from coda_jax.primitives import l2_normalize

ADAPTER_PREFIX = "coda."
_ADAPTER_CLASSES = {"LlamaCoDAAdapter", "Qwen3CoDAAdapter", "EveCoDAAdapter"}


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (any dtype, bf16 included) or array -> a numpy *copy*, float32 for floats.

    Copying matters: on CPU both torch and JAX may alias host memory, and the
    reference mutates its state tensors in place.
    """
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.numpy().copy()
    return np.array(tensor, copy=True)


def check_finite(value: np.ndarray, what: str) -> None:
    """``ValueError`` naming ``what`` when a floating-point array holds NaN or Inf."""
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return
    finite = np.isfinite(value)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise ValueError(f"{what} holds NaN or Inf ({bad:,} of {finite.size:,} values)")


def _rope_base(inv_freq: np.ndarray, head_dim: int) -> float:
    """Recover the RoPE base from the reference's float32 inverse frequencies.

    float32 keeps ~7 digits, so the estimate is snapped to the nearest
    integer when within 1e-5 relative (every base in practice is one).
    """
    if inv_freq.size < 2:
        return 10_000.0
    estimate = float(inv_freq[1]) ** (-head_dim / 2.0)
    nearest = float(round(estimate))
    return nearest if abs(estimate - nearest) <= 1e-5 * estimate else estimate


def _unwrap(module: Any) -> Any:
    return module.coda if type(module).__name__ in _ADAPTER_CLASSES else module


def _projection_biases(module: Any) -> tuple[bool, bool]:
    qkv = [getattr(module, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")]
    if len(set(qkv)) != 1:
        raise ValueError(f"q/k/v projections must all have or all lack a bias, got {qkv}")
    return qkv[0], module.o_proj.bias is not None


def _common_kwargs(module: Any) -> dict[str, Any]:
    head_dim = int(module.head_dim)
    qkv_bias, o_bias = _projection_biases(module)
    return dict(embed_dim=int(module.embed_dim), num_heads=int(module.num_heads),
                num_kv_heads=int(module.num_kv_heads), head_dim=head_dim,
                rope_base=_rope_base(to_numpy(module.rope.inv_freq), head_dim),
                qkv_bias=qkv_bias, o_bias=o_bias)


def _differential_kwargs(module: Any) -> dict[str, Any]:
    mode = getattr(module, "head_norm_mode", "full")
    return dict(head_norm_mode=mode,
                eps=float(module.head_norm.eps) if mode == "full" else 1e-6,
                rope_interleaved=bool(getattr(module, "rope_interleaved", True)))


def _landmark_kwargs(m: Any) -> dict[str, Any]:
    return dict(
        window=int(m.window), num_landmarks_exact=int(m.Me_max),
        num_landmarks_summary=int(m.Ms_max), write_policy=m.write_policy,
        write_gate_threshold_exact=m.write_gate_threshold_exact,
        write_gate_threshold_summary=m.write_gate_threshold_summary,
        exact_match_threshold=m.exact_match_threshold,
        exact_novelty_threshold=m.exact_novelty_threshold,
        exact_refresh_on_hit=m.exact_refresh_on_hit,
        exact_candidates_per_block=m.exact_candidates_per_block,
        summary_candidates_per_block=m.summary_candidates_per_block,
        summary_overwrite_on_insert=m.summary_overwrite_on_insert,
        min_landmarks_exact=int(m.Me_min), max_landmarks_exact=int(m.Me_max),
        min_landmarks_summary=int(m.Ms_min), max_landmarks_summary=int(m.Ms_max),
        expansion_t_max=int(m.expansion_t_max), mem_init=m.mem_init,
        mask_unused_memory=m.mask_unused_memory, detach_evicted=m.detach_evicted,
        collect_metrics=m.collect_metrics)


def from_reference(module: Any, *, param_dtype=jnp.float32, **overrides: Any):
    """The JAX layer equivalent to a reference module, with the same weights.

    Accepts ``CoDAGQALandmarkPerf2`` (-> :class:`CoDAGQALandmark`), ``CoDAGQA``,
    ``BaselineGQA``, or one of the reference's model adapters (its ``.coda``
    module is used). ``overrides`` change constructor keywords (for example
    ``lf_band="frequency"``).
    """
    inner = _unwrap(module)
    name = type(inner).__name__
    if name not in ("CoDAGQALandmarkPerf2", "CoDAGQA", "BaselineGQA"):
        raise ValueError(f"from_reference does not know {name}; expected CoDAGQALandmarkPerf2, "
                         f"CoDAGQA, BaselineGQA or a reference adapter")
    kwargs = _common_kwargs(inner)
    if name == "CoDAGQALandmarkPerf2":
        cls = CoDAGQALandmark
        kwargs |= _differential_kwargs(inner) | _landmark_kwargs(inner)
    elif name == "CoDAGQA":
        cls = CoDAGQA
        kwargs |= _differential_kwargs(inner)
    else:
        cls = BaselineGQA
        kwargs["rope_interleaved"] = bool(getattr(inner, "rope_interleaved", True))
    layer = cls(**(kwargs | overrides), param_dtype=param_dtype, rngs=nnx.Rngs(0))
    load_reference_weights(layer, inner.state_dict())
    return layer


def variable_for(layer: nnx.Module, key: str) -> tuple[nnx.Variable, bool]:
    """The variable behind a reference state_dict key, and whether it is transposed."""
    *path, leaf = key.split(".")
    owner = layer
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise KeyError(key)
    if isinstance(owner, nnx.Linear) and leaf == "weight":
        return owner.kernel, True
    variable = getattr(owner, leaf, None)
    if not isinstance(variable, nnx.Variable):
        raise KeyError(key)
    return variable, False


def reference_state_dict(layer: nnx.Module) -> dict[str, np.ndarray]:
    """The layer's parameters under the reference's state_dict names (numpy, torch layout)."""
    out = {}
    for path, variable in nnx.iter_graph(layer):
        if not isinstance(variable, nnx.Param):
            continue
        names = [str(p) for p in path]
        value = np.asarray(variable[...])
        if names[-1] == "kernel":
            names[-1], value = "weight", np.swapaxes(value, -1, -2)  # stacks keep axis 0
        out[".".join(names)] = value
    return out


def load_reference_weights(layer: nnx.Module, state_dict: Mapping[str, Any]) -> None:
    """Copy a reference state_dict (torch tensors or arrays) into ``layer``, in place.

    Keys may carry the adapters' ``coda.`` prefix. Missing or unexpected keys,
    shape mismatches and NaN/Inf values raise ``ValueError`` before anything is written.
    """
    keys = list(state_dict)
    strip = bool(keys) and all(k.startswith(ADAPTER_PREFIX) for k in keys)
    incoming = {(k[len(ADAPTER_PREFIX):] if strip else k): v for k, v in state_dict.items()
                if not k.endswith("inv_freq")}
    expected = reference_state_dict(layer)
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match {type(layer).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    arrays = {k: to_numpy(v) for k, v in incoming.items()}
    for key, value in arrays.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"weight {key!r} has shape {value.shape}, expected "
                             f"{expected[key].shape}")
        check_finite(value, f"{type(layer).__name__} weight {key!r}")
    for key, value in arrays.items():
        variable, transposed = variable_for(layer, key)
        variable[...] = jnp.asarray(value.T if transposed else value, variable[...].dtype)


_METRIC_NAMES = tuple(BankMetrics.__dataclass_fields__)


def state_from_reference(ref_state: Any, layer: CoDAGQALandmark, *, dtype=None) -> BankState:
    """Convert a reference ``CoDAGQALandmarkStatePerf2`` for ``layer`` (same config;
    the reference keeps no exact slot's position, so not a layer with
    ``max_key_distance``)."""
    if layer.bank_cfg.max_key_distance is not None:
        raise ValueError("the reference's state keeps no exact slot's position: it cannot "
                         "become the state of a layer with max_key_distance")
    k = to_numpy(ref_state.k_buf)
    batch = k.shape[0]
    dtype = dtype or jnp.float32

    def per_row(value):
        return jnp.full((batch,), int(value), jnp.int32)

    last = np.asarray(to_numpy(ref_state.mem_last_exact), np.int64)
    if last.size and (last.max() > np.iinfo(np.int32).max or last.min() < 0):
        raise ValueError("LRU stamps of the reference state do not fit int32 positions")
    metrics = None
    if layer.bank_cfg.collect_metrics:
        source = ref_state.metrics or {}
        metrics = BankMetrics(**{n: per_row(source.get(n, 0)) for n in _METRIC_NAMES})
    state = BankState(
        k_buf=jnp.asarray(k.transpose(0, 2, 1, 3), dtype),
        v_buf=jnp.asarray(to_numpy(ref_state.v_buf).transpose(0, 2, 1, 3), dtype),
        allowed=jnp.asarray(to_numpy(ref_state.allowed), jnp.bool_),
        g_recent=jnp.asarray(to_numpy(ref_state.g_recent), jnp.float32),
        recent_idx=per_row(ref_state.recent_idx), recent_filled=per_row(ref_state.recent_filled),
        mem_last_exact=jnp.asarray(last, jnp.int32), pos=per_row(ref_state.pos),
        active_exact=per_row(ref_state.active_exact),
        active_summary=per_row(ref_state.active_summary),
        nonfinite=jnp.asarray(~np.isfinite(k).all(axis=(1, 2, 3))
                              | ~np.isfinite(to_numpy(ref_state.v_buf)).all(axis=(1, 2, 3))),
        metrics=metrics)
    layer.check_state(state)
    return state


def state_to_reference(state: BankState, layer: CoDAGQALandmark, *, dtype=None):
    """Convert our state into a reference ``CoDAGQALandmarkStatePerf2`` (torch tensors).

    The reference keeps one position per batch, so every row must share
    position, ring index, fill and active sizes.
    """
    import torch
    from coda_gqa_l import CoDAGQALandmarkStatePerf2

    if layer.bank_cfg.lf_band != "reference":
        raise ValueError("the reference only knows lf_band='reference'")
    if layer.bank_cfg.max_key_distance is not None:
        raise ValueError("the reference has no max_key_distance: it would read far keys "
                         "where they are, so the state would answer otherwise there")
    scalars = {}
    for name in ("recent_idx", "recent_filled", "pos", "active_exact", "active_summary"):
        values = np.unique(np.asarray(getattr(state, name)))
        if values.size != 1:
            raise ValueError(f"rows differ in {name} ({values.tolist()}); the reference "
                             "holds one value per batch")
        scalars[name] = int(values[0])
    dtype = dtype or torch.float32
    k = np.asarray(state.k_buf, np.float32).transpose(0, 2, 1, 3)   # (B, Hkv, Lbuf, Dh)
    v = np.asarray(state.v_buf, np.float32).transpose(0, 2, 1, 3)
    layout = layer.layout
    ex, su = layout.exact_slice, layout.summary_slice
    lf = int(layout.lf_dims[0])
    to_torch = lambda a: torch.from_numpy(np.array(a, np.float32)).to(dtype)  # noqa: E731
    normed = lambda a: to_torch(l2_normalize(jnp.asarray(a)))  # noqa: E731
    ref = CoDAGQALandmarkStatePerf2(
        k_buf=to_torch(k), v_buf=to_torch(v), allowed=torch.from_numpy(np.array(state.allowed)),
        g_recent=torch.from_numpy(np.array(state.g_recent, np.float32)),
        mem_last_exact=torch.from_numpy(np.array(state.mem_last_exact, np.int64)),
        **scalars)
    if layer.bank_cfg.num_exact > 0:
        ref._exact_v_norm = normed(v[:, :, ex])
    if layer.bank_cfg.num_summary > 0:
        ref._sum_lf_k_norm = normed(k[:, :, su, lf:])
    return ref


__all__ = ["from_reference", "load_reference_weights", "reference_state_dict",
           "state_from_reference", "state_to_reference", "to_numpy", "variable_for"]
