"""RoPE, the Givens rotation, head RMSNorm and the LF band against the reference's primitives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from coda_gqa_l import primitives as ref_prims

from coda_jax import lf_band_dims
from coda_jax.config import expansion_thresholds
from coda_jax.primitives import apply_rope, givens_rotate, head_rms_norm, rope_inv_freq
from oracle import assert_close


def _bhld(x):  # ours (B, L, H, Dh) -> reference layout (B, H, L, Dh)
    return torch.from_numpy(np.array(x)).transpose(1, 2)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("base,offset", [(10_000.0, 0), (1_000_000.0, 3000)])
def test_rope_matches_reference(interleaved, base, offset):
    key = jax.random.key(offset)
    x = jax.random.normal(key, (2, 9, 3, 16))
    rope = ref_prims.RotaryEmbedding(16, base=base)
    cos, sin = rope(seq_len=9, offset=offset, device="cpu", dtype=torch.float32)
    want = ref_prims.apply_rope(_bhld(x), cos, sin, interleaved=interleaved)
    np.testing.assert_array_equal(rope_inv_freq(16, base), rope.inv_freq.numpy())
    got = apply_rope(x, offset + jnp.arange(9)[None], rope_inv_freq(16, base),
                     interleaved=interleaved)
    assert_close(_bhld(got), want, rtol=1e-6)


def test_givens_rotation_matches_reference_and_is_orthogonal():
    q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
    theta = jax.random.uniform(jax.random.key(1), (4, 4), minval=-3, maxval=3)
    got = givens_rotate(q, theta)
    t = torch.from_numpy(np.array(theta))
    want = ref_prims._apply_pairwise_rotation(_bhld(q), torch.cos(t), torch.sin(t))
    assert_close(_bhld(got), want, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), jnp.linalg.norm(q, axis=-1),
                               rtol=1e-5)


def test_head_rms_norm_matches_reference():
    x = jax.random.normal(jax.random.key(2), (2, 5, 3, 8)) * 3
    w = jax.random.normal(jax.random.key(3), (8,))
    norm = ref_prims.HeadwiseRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.array(w)))
        want = norm(_bhld(x))
    assert_close(_bhld(head_rms_norm(x, w, 1e-6)), want, rtol=1e-6)


@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
@pytest.mark.parametrize("interleaved", [True, False])
def test_frequency_band_is_exactly_the_slowest_pairs(head_dim, interleaved):
    dims = lf_band_dims(head_dim, interleaved, "frequency")
    inv_freq = rope_inv_freq(head_dim, 10_000.0)
    half = head_dim // 2
    pair_of = (np.arange(head_dim) // 2) if interleaved else (np.arange(head_dim) % half)
    band_pairs = pair_of[dims]
    # Whole pairs only, and each of them slower than every pair left out.
    assert sorted(band_pairs.tolist()) == sorted(np.repeat(np.unique(band_pairs), 2).tolist())
    left_out = np.setdiff1d(np.arange(half), band_pairs)
    assert inv_freq[band_pairs].max() < inv_freq[left_out].min()
    assert len(np.unique(band_pairs)) == half - half // 2


def test_reference_band_is_the_upper_half_and_differs_under_contiguous_pairing():
    ref_dims = lf_band_dims(16, False, "reference")
    np.testing.assert_array_equal(ref_dims, np.arange(8, 16))
    # Contiguous pairing: [8:16] holds the second half of every pair, fast ones too.
    assert not np.array_equal(ref_dims, lf_band_dims(16, False, "frequency"))
    np.testing.assert_array_equal(lf_band_dims(16, True, "frequency"), ref_dims)


@pytest.mark.parametrize("lo,hi,t_max", [(2, 8, 40), (0, 64, 1_000_000), (5, 9, 7), (4, 4, 100)])
def test_expansion_thresholds_reproduce_the_log_ceiling(lo, hi, t_max):
    import math
    thresholds = expansion_thresholds(lo, hi, t_max)
    for t in list(range(0, 3 * t_max if t_max < 100 else 200)) + [t_max, 10 * t_max]:
        ratio = min(math.log(1 + t) / math.log(1 + t_max), 1.0)
        assert lo + int((hi - lo) * ratio) == lo + int(np.sum(t >= thresholds)), t
