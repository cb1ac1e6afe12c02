"""Decoder models loaded from HF checkpoints vs transformers' own models (float32, 1e-4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

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
