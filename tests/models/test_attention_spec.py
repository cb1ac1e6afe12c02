"""The typed attention configuration of a model and its flat-keyword constructor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from coda_jax import AttentionSpec, BankConfig, CausalLM, DecoderConfig, load_model, save_model

CFG = DecoderConfig("llama", 11, 16, 8, 2, 2, 2, 8)
DATA = Path(__file__).parents[1] / "data"


def test_typed_spec_and_flat_options_build_the_same_model():
    typed = CausalLM(CFG, attention=AttentionSpec(
        kind="coda_bounded", bank=BankConfig(window=4, num_landmarks_exact=2,
                                             num_landmarks_summary=2, exact_match_threshold=0.8),
        theta_init=0.0), rngs=nnx.Rngs(0))
    flat = CausalLM(CFG, attention="coda_bounded", attention_options=dict(
        window=4, num_landmarks_exact=2, num_landmarks_summary=2, exact_match_threshold=0.8,
        theta_init=0.0), rngs=nnx.Rngs(0))
    assert typed.spec == flat.spec
    assert typed.layers.self_attn.bank_cfg == flat.layers.self_attn.bank_cfg
    for a, b in zip(jax.tree.leaves(nnx.state(typed)), jax.tree.leaves(nnx.state(flat))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(typed.layers.self_attn.theta[...].max()) == 0.0


def test_spec_defaults_and_round_trip():
    bounded = AttentionSpec(kind="coda_bounded")
    assert (bounded.bank.window, bounded.bank.num_exact, bounded.bank.num_summary) == (256, 64, 64)
    assert AttentionSpec.from_dict(bounded.to_dict()) == bounded
    coda = AttentionSpec.from_options("coda", {"head_norm_mode": "full"})
    assert coda.head_norm_mode == "full" and coda.bank is None
    assert "window" not in coda.layer_options()


@pytest.mark.parametrize("kind,options,fragment", [
    ("coda", {"window": 8}, "unknown option(s) for attention 'coda': ['window']"),
    ("coda_bounded", {"windw": 8}, "unknown option(s) for attention 'coda_bounded': ['windw']"),
    ("gqa", {"window": 8}, "attention 'gqa' (the HuggingFace attention) takes no options"),
    ("flash", {}, "attention must be 'gqa', 'coda' or 'coda_bounded'"),
    ("coda_bounded", {"window": 0}, "window must be a positive integer"),
])
def test_bad_options_are_named(kind, options, fragment):
    with pytest.raises(ValueError) as caught:
        CausalLM(CFG, attention=kind, attention_options=options, rngs=nnx.Rngs(0))
    assert fragment in str(caught.value)


def test_a_spec_with_options_too_is_refused():
    with pytest.raises(ValueError, match="inside the AttentionSpec"):
        CausalLM(CFG, attention=AttentionSpec(kind="coda"), attention_options={"eps": 1e-5},
                 rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs kind='coda_bounded'"):
        AttentionSpec(kind="coda", bank=BankConfig(4, 2, 2))


def test_models_saved_with_flat_options_still_load(tmp_path):
    with pytest.warns(UserWarning, match="without checksums"):
        old = load_model(DATA / "model_format1")  # saved by the previous release
    assert old.spec == AttentionSpec.from_options(
        "coda_bounded", dict(window=4, num_landmarks_exact=2, num_landmarks_summary=2))
    save_model(tmp_path / "m", old)
    again = load_model(tmp_path / "m")
    assert again.spec == old.spec and dataclasses.asdict(again.cfg) == dataclasses.asdict(old.cfg)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(old))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
