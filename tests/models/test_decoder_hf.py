"""Decoder models loaded from HF checkpoints vs transformers' own models (float32, 1e-4)."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from coda_jax.decoder import CausalLM
from coda_jax.model_config import DecoderConfig
from convert.hf import load_hf_model
from oracle import assert_close

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)),
    "llama3-scaled-rope": lambda: LlamaForCausalLM(LlamaConfig(**TINY,
                                                               rope_parameters=LLAMA3_ROPE)),
    "mistral-sharded": lambda: MistralForCausalLM(MistralConfig(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    "qwen3-tied": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32,
                                                      tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = MODELS[request.param]().eval()
    with torch.no_grad():  # norms and biases away from their trivial init
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    shard = "40KB" if "sharded" in request.param else "5GB"
    hf.save_pretrained(path, max_shard_size=shard)
    if "sharded" in request.param:
        assert (path / "model.safetensors.index.json").exists()
    return hf, load_hf_model(path, dtype=jnp.float32, progress=False)


def test_prefill_logits_match_transformers(hf_pair):
    hf, ours = hf_pair
    tokens = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    got, _ = ours(jnp.asarray(tokens.numpy()))
    assert_close(got, want, rtol=1e-4)


def test_incremental_decode_matches_transformers(hf_pair):
    hf, ours = hf_pair
    tokens = torch.randint(0, 101, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(tokens).logits
    ids = jnp.asarray(tokens.numpy())
    logits, cache = ours(ids[:, :9])
    pieces = [logits]
    for t in range(9, 15):
        logits, cache = ours(ids[:, t:t + 1], cache)
        pieces.append(logits)
    assert_close(jnp.concatenate(pieces, axis=1), want, rtol=1e-4)
    assert cache[0].shape == (3, 2, 15, 2, ours.cfg.head_dim)


def test_rope_settings_come_from_the_config(hf_pair):
    hf, ours = hf_pair
    attn = ours.layers.self_attn  # stacked; its config is every layer's
    theta = hf.config.rope_parameters["rope_theta"]
    assert attn.attn_cfg.rope_base == theta
    with torch.no_grad():
        inv_freq = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(attn.inv_freq, inv_freq, rtol=1e-6)


# ----------------------------------------------------------------- sliding windows
def _saved(make, path, seed=5):
    torch.manual_seed(seed)
    hf = make().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


WINDOWED = {  # every layer windowed (4 keys); the same model without a window
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**TINY, sliding_window=4),
                lambda: MistralConfig(**TINY, sliding_window=None)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**TINY, head_dim=16, use_sliding_window=True,
                                                    sliding_window=4, max_window_layers=0),
              lambda: Qwen3Config(**TINY, head_dim=16)),
}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_sliding_window_matches_transformers_prefill_and_decode(family, tmp_path):
    model_class, config, no_window = WINDOWED[family]
    hf = _saved(lambda: model_class(config()), tmp_path)
    ours = load_hf_model(tmp_path, dtype=jnp.float32, progress=False)
    assert ours.cfg.sliding_window == 4 and ours.layers.self_attn.sliding_window == 4
    tokens = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = hf(tokens).logits
        unwindowed = model_class.from_pretrained(tmp_path, config=no_window()).eval()(
            tokens).logits
    # The window matters here (only after its first 4 tokens), so ignoring it would fail.
    assert_close(unwindowed[:, :4], want[:, :4], rtol=1e-5)
    assert (unwindowed[:, 4:] - want[:, 4:]).abs().max() > 1e-2
    ids = jnp.asarray(tokens.numpy())
    got, _ = ours(ids)
    assert_close(got, want, rtol=1e-4, what="prefill")
    # Incremental: a 13-token prompt, then one token, a block of 3 after the past, ones.
    logits, cache = ours(ids[:, :13])
    pieces = [logits]
    for start, stop in ((13, 14), (14, 17), (17, 18), (18, 19)):
        logits, cache = ours(ids[:, start:stop], cache)
        pieces.append(logits)
    assert_close(jnp.concatenate(pieces, axis=1), want, rtol=1e-4, what="decode with a past")
    assert cache[0].shape == (3, 2, 19, 2, ours.cfg.head_dim)  # the cache keeps every key


def test_sliding_window_is_read_as_transformers_does():
    hf_cfg = dict(TINY, model_type="mistral", rope_theta=10_000.0)
    assert DecoderConfig.from_hf(MistralConfig(**TINY, sliding_window=7)).sliding_window == 7
    assert DecoderConfig.from_hf(hf_cfg | {"sliding_window": None}).sliding_window is None
    assert DecoderConfig.from_hf(hf_cfg).sliding_window == 4096  # MistralConfig's default
    # Llama has no sliding window in transformers, whatever the config says.
    llama = hf_cfg | {"model_type": "llama", "sliding_window": 4}
    assert DecoderConfig.from_hf(llama).sliding_window is None
    # Qwen3: only with use_sliding_window, and only in layers >= max_window_layers.
    assert DecoderConfig.from_hf(Qwen3Config(**TINY, sliding_window=4)).sliding_window is None
    assert DecoderConfig.from_hf(Qwen3Config(**TINY, use_sliding_window=True, sliding_window=4)
                                 ).sliding_window is None  # max_window_layers 28 >= 3 layers
    with pytest.raises(ValueError, match=r"sliding window \(4\) in layers \[1, 2\] only"):
        DecoderConfig.from_hf(Qwen3Config(**TINY, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1))
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        DecoderConfig.from_hf(hf_cfg | {"sliding_window": 0})


def test_saved_metadata_without_sliding_window_still_loads():
    cfg = DecoderConfig.from_hf(MistralConfig(**TINY, sliding_window=4))
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert DecoderConfig.from_dict(saved) == cfg
    del saved["sliding_window"]  # metadata written before the field existed
    assert DecoderConfig.from_dict(saved) == dataclasses.replace(cfg, sliding_window=None)


@pytest.mark.parametrize("attention,options", [
    ("coda", None), ("coda_bounded", dict(window=8, num_landmarks_exact=4,
                                          num_landmarks_summary=4))])
def test_coda_kinds_warn_that_the_sliding_window_is_not_applied(attention, options):
    cfg = DecoderConfig.from_hf(MistralConfig(**TINY, sliding_window=4))
    with pytest.warns(UserWarning, match=f"sliding_window=4 is not applied to "
                                         f"attention='{attention}'"):
        CausalLM(cfg, attention=attention, attention_options=options, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CausalLM(dataclasses.replace(cfg, sliding_window=None), attention=attention,
                 attention_options=options, rngs=nnx.Rngs(0))


# ------------------------------------------------------------ unsupported RoPE types
UNSUPPORTED_ROPE = {
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 32}},
    "dynamic": {"rope_theta": 10_000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "longrope": {"rope_theta": 10_000.0,
                 "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8}},
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED_ROPE))
def test_unsupported_rope_types_are_refused_with_the_config(kind):
    d = dict(TINY, model_type="llama", **UNSUPPORTED_ROPE[kind])
    with pytest.raises(ValueError, match=f"RoPE scaling type '{kind}' is not supported; "
                                         "supported types: default, linear, llama3"):
        DecoderConfig.from_hf(d)


def test_rope_type_missing_its_parameters_is_refused():
    d = dict(TINY, model_type="llama", rope_parameters={"rope_type": "llama3",
                                                        "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(ValueError, match="'llama3' needs low_freq_factor, high_freq_factor, "
                                         "original_max_position_embeddings"):
        DecoderConfig.from_hf(d)


def test_load_hf_model_refuses_yarn_before_reading_weights(tmp_path):
    config = dict(TINY, model_type="llama", **UNSUPPORTED_ROPE["yarn"])
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights at all
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        load_hf_model(tmp_path, dtype=jnp.float32, progress=False)


@pytest.mark.parametrize("change,fragment", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"vocab_size": None}, "the config lacks vocab_size"),
])
def test_configs_the_decoder_would_compute_wrongly_are_refused(change, fragment):
    d = dict(TINY, model_type="llama", rope_theta=1e4) | change
    with pytest.raises(ValueError, match=re.escape(fragment)):
        DecoderConfig.from_hf(d)
