"""Unbounded CoDA and baseline GQA against the reference, with and without a past K/V."""

from __future__ import annotations

import coda_gqa_l
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from coda_jax import BaselineGQA, CoDAGQA, CoDAGQALandmark
from coda_jax.config import AttentionConfig
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


# ------------------------------------------------------------- sliding window (gqa)
def _band(q_len: int, total: int, window: int) -> np.ndarray:
    """Mistral's visibility for the last q_len of total positions: i - W < j <= i."""
    q_pos = np.arange(total - q_len, total)[:, None]
    k_pos = np.arange(total)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


@pytest.mark.parametrize("past_len,new_tokens", [(0, 13), (9, 1), (9, 5), (2, 3)])
def test_sliding_window_equals_the_reference_given_the_band_mask(past_len, new_tokens):
    ref = _reference("baseline", 6)
    layer = from_reference(ref, sliding_window=4)
    assert layer.sliding_window == 4
    gen = torch.Generator().manual_seed(20 + past_len + new_tokens)
    past_x, x = torch.randn(2, past_len, 64, generator=gen), torch.randn(2, new_tokens, 64,
                                                                       generator=gen)
    band = torch.as_tensor(_band(new_tokens, past_len + new_tokens, 4))
    with torch.no_grad():
        past = ref(past_x)[1] if past_len else None
        want, _ = ref(x, attention_mask=band, past_key_value=past)
    y, kv = layer(to_jnp(x), past_key_value=None if past is None else _ref_kv(past))
    assert_close(y, want, what="windowed output")
    assert kv[0].shape == (2, past_len + new_tokens, 2, 8)


def test_sliding_window_incremental_decode_equals_full_sequence():
    layer = from_reference(_reference("baseline", 7), sliding_window=3)
    x = to_jnp(torch.randn(1, 14, 64, generator=torch.Generator().manual_seed(21)))
    full, _ = layer(x)
    y, cache = layer(x[:, :6])
    outs = [y]
    for start, stop in ((6, 7), (7, 11), (11, 12), (12, 14)):
        y, cache = layer(x[:, start:stop], past_key_value=cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_sliding_window_applies_on_top_of_an_explicit_mask():
    ref = _reference("baseline", 8)
    plain, windowed = from_reference(ref), from_reference(ref, sliding_window=3)
    x = to_jnp(torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(22)))
    keep = np.tril(np.ones((9, 9), bool))
    keep[5, 4] = False  # a hole inside the window
    want, _ = plain(x, attention_mask=jnp.asarray(keep & _band(9, 9, 3)))
    got_bool, _ = windowed(x, attention_mask=jnp.asarray(keep))
    got_add, _ = windowed(x, attention_mask=jnp.asarray(np.where(keep, 0.0, -1e9), jnp.float32))
    np.testing.assert_allclose(got_bool, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_add, want, rtol=1e-6, atol=1e-6)
    # A window at least as long as the sequence changes nothing.
    wide = from_reference(ref, sliding_window=9)
    np.testing.assert_allclose(wide(x)[0], plain(x)[0], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(windowed(x)[0] - plain(x)[0])).max() > 1e-3


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_sliding_window_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        BaselineGQA(embed_dim=64, num_heads=8, num_kv_heads=2, sliding_window=bad,
                    rngs=nnx.Rngs(0))


# ------------------------------------------------- unsupported RoPE types, at construction
BOUNDED = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4)


@pytest.mark.parametrize("layer_class", [BaselineGQA, CoDAGQA, CoDAGQALandmark])
@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0},
                                     {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "longrope"}])
def test_unsupported_rope_scaling_is_refused_when_the_layer_is_built(layer_class, scaling):
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(ValueError, match=f"RoPE scaling type '{kind}' is not supported; "
                                         "supported types: default, linear, llama3"):
        layer_class(embed_dim=64, num_heads=8, num_kv_heads=2, rope_scaling=scaling,
                    rngs=nnx.Rngs(0), **(BOUNDED if layer_class is CoDAGQALandmark else {}))
    with pytest.raises(ValueError, match=f"'{kind}' is not supported"):
        AttentionConfig(embed_dim=64, num_heads=8, num_kv_heads=2, rope_scaling=scaling)
    with pytest.raises(ValueError, match="'linear' needs factor"):
        AttentionConfig(embed_dim=64, num_heads=8, num_kv_heads=2,
                        rope_scaling={"rope_type": "linear"})
