"""Unbounded CoDA and baseline GQA against the reference, with and without a past K/V."""

from __future__ import annotations

import coda_gqa_l
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import from_reference
from oracle import assert_close, perturb_, to_jnp


def _reference(kind: str, seed: int, **kw):
    torch.manual_seed(seed)
    base = dict(embed_dim=64, num_heads=8, num_kv_heads=2)
    if kind == "coda":
        module = coda_gqa_l.CoDAGQA(**base, **kw)
    else:
        module = coda_gqa_l.BaselineGQA(**base, **kw)
    return perturb_(module, seed + 7).eval()


def _ref_kv(kv):  # reference cache (B, Hkv, L, Dh) -> ours (B, L, Hkv, Dh)
    return tuple(to_jnp(t.transpose(1, 2)) for t in kv)


VARIANTS = [("coda", {}), ("coda", {"head_norm_mode": "identity", "rope_interleaved": False}),
            ("coda", {"rope_base": 500_000.0}), ("baseline", {})]


@pytest.mark.parametrize("kind,kw", VARIANTS)
def test_matches_reference_without_past(kind, kw):
    ref = _reference(kind, 1, **kw)
    layer = from_reference(ref)
    x = torch.randn(2, 13, 64)
    with torch.no_grad():
        want, want_kv = ref(x)
    y, kv = layer(to_jnp(x))
    assert_close(y, want, what="output")
    for ours, theirs in zip(kv, _ref_kv(want_kv)):
        assert_close(ours, theirs, what="kv")


@pytest.mark.parametrize("kind,kw", VARIANTS)
@pytest.mark.parametrize("new_tokens", [1, 5])
def test_matches_reference_with_past(kind, kw, new_tokens):
    """With a past cache the reference's ``is_causal`` is aligned to the upper
    left (each new query sees only the first keys), so it is given the correct
    lower-right mask explicitly; our default causal mask must equal that."""
    ref = _reference(kind, 2, **kw)
    layer = from_reference(ref)
    past_x, x = torch.randn(2, 9, 64), torch.randn(2, new_tokens, 64)
    with torch.no_grad():
        _, past = ref(past_x)
        total = past[0].shape[2] + new_tokens
        lower_right = torch.ones(new_tokens, total, dtype=torch.bool).tril(total - new_tokens)
        want, _ = ref(x, attention_mask=lower_right, past_key_value=past)
    y, kv = layer(to_jnp(x), past_key_value=_ref_kv(past))
    assert_close(y, want, what="causal output with past")
    assert kv[0].shape == (2, 9 + new_tokens, 2, 8)
    # An explicit mask is used as given, on both sides.
    y2, _ = layer(to_jnp(x), attention_mask=jnp.asarray(lower_right.numpy()),
                  past_key_value=_ref_kv(past))
    assert_close(y2, want, what="explicit mask output")


def test_incremental_decode_equals_full_sequence():
    """What the reference gets wrong with a past cache: ours is consistent."""
    layer = from_reference(_reference("coda", 3))
    x = to_jnp(torch.randn(1, 12, 64))
    full, _ = layer(x)
    y, cache = layer(x[:, :7])
    outs = [y]
    for t in range(7, 12):
        y, cache = layer(x[:, t:t + 1], past_key_value=cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_additive_float_mask_equals_boolean_mask():
    layer = from_reference(_reference("baseline", 4))
    x = to_jnp(torch.randn(2, 6, 64))
    keep = np.tril(np.ones((6, 6), bool))
    keep[:, 0] = True
    additive = np.where(keep, 0.0, -1e9).astype(np.float32)
    y_bool, _ = layer(x, attention_mask=jnp.asarray(keep))
    y_add, _ = layer(x, attention_mask=jnp.asarray(additive))
    np.testing.assert_allclose(y_bool, y_add, rtol=1e-6, atol=1e-6)


def test_wrong_input_width_is_a_clear_error():
    layer = from_reference(_reference("coda", 5))
    with pytest.raises(ValueError, match="embed_dim=64"):
        layer(jnp.zeros((1, 3, 32)))
