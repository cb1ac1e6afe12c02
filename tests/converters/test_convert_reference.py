"""The bridge to the reference: modules, adapter weights (coda. prefix) and states."""

from __future__ import annotations

import coda_gqa_l
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from coda_jax import BaselineGQA, CoDAGQA, CoDAGQALandmark
from convert import (from_reference, load_reference_weights, reference_state_dict,
                     state_from_reference, state_to_reference)
from oracle import assert_close, perturb_, reference_landmark, sorted_reference_topk, to_jnp


@pytest.mark.parametrize("make,cls", [
    (lambda: coda_gqa_l.CoDAGQALandmarkPerf2(embed_dim=64, num_heads=4, num_kv_heads=2,
                                             window=8, num_landmarks_exact=4,
                                             num_landmarks_summary=2, rope_base=500_000.0,
                                             min_landmarks_exact=1, exact_refresh_on_hit=True,
                                             head_norm_mode="identity",
                                             rope_interleaved=False), CoDAGQALandmark),
    (lambda: coda_gqa_l.CoDAGQA(embed_dim=64, num_heads=8, num_kv_heads=8), CoDAGQA),
    (lambda: coda_gqa_l.BaselineGQA(embed_dim=64, num_heads=4, num_kv_heads=1), BaselineGQA),
])
def test_from_reference_keeps_config_and_weights(make, cls):
    ref = perturb_(make(), 0)
    layer = from_reference(ref)
    assert isinstance(layer, cls)
    ours = reference_state_dict(layer)
    theirs = {k: v for k, v in ref.state_dict().items() if not k.endswith("inv_freq")}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
    # The export loads back into a fresh reference module, strictly.
    fresh = make()
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.items()}, strict=True)
    if cls is CoDAGQALandmark:
        assert layer.bank_cfg.min_landmarks_exact == 1
        assert layer.bank_cfg.exact_refresh_on_hit
        assert layer.attn_cfg.rope_base == 500_000.0
        assert not layer.attn_cfg.rope_interleaved


def test_adapter_weights_with_the_coda_prefix_run_like_the_adapter():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                         rope_theta=10_000.0)
    model = LlamaForCausalLM(config).eval()
    adapters = coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers(model, bounded=True, window=8,
                                                             num_landmarks_exact=4,
                                                             num_landmarks_summary=4)
    adapter = perturb_(adapters[0], 3)
    state_dict = adapter.state_dict()
    assert all(k.startswith("coda.") for k in state_dict)
    layer = from_reference(adapter)            # the adapter module itself
    fresh = from_reference(adapter.coda)
    load_reference_weights(fresh, state_dict)  # a saved adapter state_dict
    x = torch.randn(1, 20, 64)
    with torch.no_grad(), sorted_reference_topk():
        want, _ = adapter.coda.prefill_chunked(
            x, adapter.coda.init_state(batch_size=1, device="cpu", dtype=torch.float32,
                                       mem_init="zeros"), block_size=8)
    for ours in (layer, fresh):
        y, _ = ours.prefill(to_jnp(x), ours.init_state(1, mem_init="zeros"), block_size=8)
        assert_close(y, want)


def test_weight_mismatches_are_reported_before_anything_changes():
    layer = from_reference(perturb_(coda_gqa_l.CoDAGQA(embed_dim=64, num_heads=4,
                                                       num_kv_heads=2), 1))
    before = reference_state_dict(layer)
    good = {k: torch.from_numpy(v.copy()) for k, v in before.items()}
    with pytest.raises(ValueError, match="missing \\['theta'\\]"):
        load_reference_weights(layer, {k: v for k, v in good.items() if k != "theta"})
    with pytest.raises(ValueError, match="unexpected \\['write_proj.bias'\\]"):
        load_reference_weights(layer, good | {"write_proj.bias": torch.zeros(1)})
    bad_shape = dict(good)
    bad_shape["q_proj.weight"] = torch.zeros(64, 32)
    bad_shape["theta"] = torch.zeros_like(good["theta"])
    with pytest.raises(ValueError, match="q_proj.weight"):
        load_reference_weights(layer, bad_shape)
    after = reference_state_dict(layer)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    with pytest.raises(ValueError, match="does not know"):
        from_reference(torch.nn.Linear(3, 3))


def test_states_convert_both_ways_and_continue_in_the_reference():
    ref = reference_landmark(4, embed_dim=64, num_heads=4, num_kv_heads=2, window=4,
                             num_landmarks_exact=4, num_landmarks_summary=4)
    layer = from_reference(ref)
    x = torch.randn(2, 23, 64)
    state = layer.init_state(2, key=jax.random.key(0))
    _, state = layer.prefill(to_jnp(x), state, block_size=8)
    ref_state = state_to_reference(state, layer)
    back = state_from_reference(ref_state, layer)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The reference picks up where we stopped, and so do we.
    tokens = torch.randn(2, 6, 64)
    with torch.no_grad(), sorted_reference_topk():
        for t in range(6):
            want, ref_state = ref.step(tokens[:, t:t + 1], ref_state)
            got, state = layer.step(to_jnp(tokens[:, t:t + 1]), state)
            assert_close(got, want)
    uneven = state.replace(pos=jnp.array([5, 6], jnp.int32))
    with pytest.raises(ValueError, match="rows differ in pos"):
        state_to_reference(uneven, layer)
    far = from_reference(ref, max_key_distance=64)
    with pytest.raises(ValueError, match="no max_key_distance"):
        state_to_reference(far.init_state(2, key=jax.random.key(0)), far)
    with pytest.raises(ValueError, match="keeps no exact slot's position"):
        state_from_reference(ref_state, far)
