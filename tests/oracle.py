"""Helpers that drive the PyTorch reference (coda-gqa-l 1.3.1) as a test oracle."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
import torch

import coda_gqa_l

_TORCH_TOPK = torch.topk


def _stable_topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


@contextlib.contextmanager
def sorted_reference_topk() -> Iterator[None]:
    """Pin the reference's unspecified top-k order to sorted, ties to the lower index.

    The reference calls ``torch.topk(..., sorted=False)`` and then slices the
    first ``exact_candidates_per_block`` of the summary's candidates: on CPU
    that is an arbitrary subset, and ties (e.g. ``write_policy='none'``, where
    every gate is 1) come out in an arbitrary order. Any fixed order is valid
    under its spec; we define and implement the sorted one.
    """
    torch.topk = _stable_topk
    try:
        yield
    finally:
        torch.topk = _TORCH_TOPK


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter away from its init (so gates, thetas, eta... all matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module


def to_jnp(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().copy())


def to_np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().numpy()
    return np.asarray(a, dtype=np.float64) if np.asarray(a).dtype != bool else np.asarray(a)


def assert_close(ours: Any, ref: Any, rtol: float = 1e-5, what: str = "") -> None:
    """max |ours - ref| <= rtol * max(|ref|, 1): relative to the tensor's scale."""
    a, b = np.asarray(to_np(ours), np.float64), np.asarray(to_np(ref), np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    err = np.max(np.abs(a - b)) if a.size else 0.0
    scale = max(np.max(np.abs(b)) if b.size else 0.0, 1.0)
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


def reference_landmark(seed: int = 0, **kwargs: Any) -> coda_gqa_l.CoDAGQALandmarkPerf2:
    torch.manual_seed(seed)
    return perturb_(coda_gqa_l.CoDAGQALandmarkPerf2(**kwargs), seed + 1).eval()


def run_reference(ref, state, x: torch.Tensor, block_size: int, decode_xs: torch.Tensor):
    """Prefill then decode with the reference; returns (prefill y, [decode y], state)."""
    with torch.no_grad(), sorted_reference_topk():
        y, state = ref.prefill_chunked(x, state, block_size=block_size)
        steps = []
        for t in range(decode_xs.shape[1]):
            y_t, state = ref.step(decode_xs[:, t:t + 1], state)
            steps.append(y_t)
    return y, steps, state
