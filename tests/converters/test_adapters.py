"""Reference adapter files made by the reference itself, imported and exported."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil

import coda_gqa_l
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, \
    Qwen3ForCausalLM

from convert.adapters import adapter_weights, load_adapters, read_adapter_file, save_adapters
from convert.hf import load_hf_model
from oracle import assert_close, perturb_, sorted_reference_topk

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97)
BOUNDED = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4, mem_init="zeros")
SWAP = {"llama": coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers,
        "qwen3": coda_gqa_l.Qwen3CoDAAdapter.swap_qwen3_layers}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    torch.manual_seed(0)
    # Under transformers 5 the reference's adapters cannot read rope_theta from the
    # config and fall back to their defaults (10,000 for Llama, 1,000,000 for Qwen3):
    # the fixtures use exactly those, so that both sides compute the same thing.
    qwen_rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    for family, model in (("llama", LlamaForCausalLM(LlamaConfig(**TINY))),
                          ("qwen3", Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16,
                                                                 rope_parameters=qwen_rope)))):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
        dirs[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(dirs[family])
    return dirs


def reference_with_adapters(model_dir, family, bounded, path):
    """The reference's own swap, CoDA weights perturbed, saved as coda_adapters.pt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = dict(BOUNDED, block_size=8) if bounded else {}
    adapters = SWAP[family](model, bounded=bounded, **kwargs)
    for i, adapter in enumerate(adapters):
        perturb_(adapter.coda, 10 + i, scale=0.2)
        with torch.no_grad():
            adapter.coda.lambda_proj.bias.fill_(-1.0)  # make the noise stream matter
    torch.save({f"layer_{i}": a.state_dict() for i, a in enumerate(adapters)}, path)
    return model.eval()  # the swapped-in adapters start in training mode (stateless)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_unbounded_adapters_reproduce_the_reference(hf_dirs, family, tmp_path):
    path = tmp_path / "coda_adapters.pt"
    ref = reference_with_adapters(hf_dirs[family], family, False, path)
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(tokens, use_cache=False).logits
    ctx = pytest.warns(UserWarning, match="reference_compat") if family == "qwen3" else \
        contextlib.nullcontext()
    with ctx:
        ours = load_hf_model(hf_dirs[family], attention="coda", adapters=path,
                             dtype=jnp.float32, progress=False)
    got, _ = ours(jnp.asarray(tokens.numpy()))
    assert_close(got, want, rtol=1e-4)
    if family == "qwen3":  # the correct architecture (q/k norms kept) computes something else
        assert ours.reference_compat
        proper = load_hf_model(hf_dirs[family], attention="coda", adapters=path,
                               reference_compat=False, dtype=jnp.float32, progress=False)
        other, _ = proper(jnp.asarray(tokens.numpy()))
        assert np.abs(np.asarray(other) - want.numpy()).max() > 1e-2


class Payload:
    """Stands for whatever a malicious pickle would instantiate."""


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bounded_adapters_reproduce_the_reference_prefill_and_decode(hf_dirs, family,
                                                                     tmp_path):
    path = tmp_path / "coda_adapters.pt"
    ref = reference_with_adapters(hf_dirs[family], family, True, path)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 97, (1, 29), generator=gen)   # longer than the window (8)
    steps = torch.randint(0, 97, (1, 6), generator=gen)
    with torch.no_grad(), sorted_reference_topk():
        want = [ref(prompt, use_cache=False).logits]
        for t in range(steps.shape[1]):
            want.append(ref(steps[:, t:t + 1], use_cache=False).logits)
    with pytest.warns(UserWarning) if family == "qwen3" else contextlib.nullcontext():
        ours = load_hf_model(hf_dirs[family], attention="coda_bounded",
                             attention_options=BOUNDED, adapters=path, dtype=jnp.float32,
                             progress=False)
    state = ours.init_state(1)
    logits, state = ours.prefill(jnp.asarray(prompt.numpy()), state, block_size=8)
    assert_close(logits, want[0], rtol=1e-4, what="prefill")
    for t in range(steps.shape[1]):
        logits, state = ours.step(jnp.asarray(steps[:, t:t + 1].numpy()), state)
        assert_close(logits, want[t + 1], rtol=1e-4, what=f"decode step {t}")


def test_export_reimport_is_identity_and_loads_in_the_reference_strictly(hf_dirs, tmp_path):
    path = tmp_path / "coda_adapters.pt"
    reference_with_adapters(hf_dirs["llama"], "llama", True, path)
    ours = load_hf_model(hf_dirs["llama"], attention="coda_bounded", attention_options=BOUNDED,
                         adapters=path, dtype=jnp.float32, progress=False)
    original = read_adapter_file(path)
    for suffix in (".pt", ".safetensors"):
        exported = save_adapters(ours, tmp_path / f"again{suffix}")
        with pytest.raises(FileExistsError):
            save_adapters(ours, exported)
        again = read_adapter_file(exported)
        assert again.keys() == original.keys()
        for layer in original:
            assert again[layer].keys() == original[layer].keys()
            for key in original[layer]:
                np.testing.assert_array_equal(again[layer][key], original[layer][key])
        load_adapters(ours, exported)
        np.testing.assert_array_equal(adapter_weights(ours)["layer_1"]["coda.theta"],
                                      original["layer_1"]["coda.theta"])
    fresh = AutoModelForCausalLM.from_pretrained(hf_dirs["llama"])
    adapters = SWAP["llama"](fresh, bounded=True, **BOUNDED)
    saved = torch.load(tmp_path / "again.pt", weights_only=True)
    for i, adapter in enumerate(adapters):
        adapter.load_state_dict(saved[f"layer_{i}"], strict=True)


def test_bad_adapter_files_are_refused_and_change_nothing(hf_dirs, tmp_path):
    path = tmp_path / "coda_adapters.pt"
    reference_with_adapters(hf_dirs["llama"], "llama", False, path)
    ours = load_hf_model(hf_dirs["llama"], attention="coda", adapters=path, dtype=jnp.float32,
                         progress=False)
    before = adapter_weights(ours)
    good = read_adapter_file(path)

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"layer_0": Payload()}, f)
    torch.save({"layer_0": Payload()}, tmp_path / "evil2.pt", pickle_module=pickle)
    for bad in (evil, tmp_path / "evil2.pt"):
        with pytest.raises(ValueError, match="refused"):
            load_adapters(ours, bad)
    with pytest.raises(ValueError, match="missing \\['layer_1'\\]"):
        load_adapters(ours, {"layer_0": good["layer_0"]})
    with pytest.raises(ValueError, match="unexpected \\['layer_2'\\]"):
        load_adapters(ours, good | {"layer_2": good["layer_0"]})
    extra = {k: dict(v) for k, v in good.items()}
    extra["layer_1"]["coda.bogus"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="bogus"):
        load_adapters(ours, extra)
    wrong_heads = {k: dict(v) for k, v in good.items()}
    wrong_heads["layer_1"]["coda.theta"] = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="num_heads=4"):
        load_adapters(ours, wrong_heads)
    after = adapter_weights(ours)
    for layer in before:
        for key in before[layer]:
            np.testing.assert_array_equal(before[layer][key], after[layer][key])


def test_bad_checkpoints_are_clear_errors(hf_dirs, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(hf_dirs["llama"], target)
        return target

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_hf_model(truncated, progress=False)
    mismatch = copy("mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] = 128
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp.*has shape .* the config implies"):
        load_hf_model(mismatch, progress=False)
    other = copy("other")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        load_hf_model(other, progress=False)
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(hf_dirs["llama"]).save_pretrained(sharded,
                                                                       max_shard_size="40KB")
    first_shard = sorted(sharded.glob("model-0000*.safetensors"))[0]
    first_shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        load_hf_model(sharded, progress=False)


def test_reference_neural_states_carry_over_without_unpickling_code(hf_dirs, tmp_path):
    from coda_gqa_l import NeuralDatabase

    from convert.reference_states import import_reference_states

    path = tmp_path / "coda_adapters.pt"
    ref = reference_with_adapters(hf_dirs["llama"], "llama", True, path)
    gen = torch.Generator().manual_seed(5)
    document = torch.randint(0, 97, (1, 37), generator=gen)
    question = torch.randint(0, 97, (1, 4), generator=gen)
    with torch.no_grad(), sorted_reference_topk():
        ref(document, use_cache=False)
        states = {i: layer.self_attn.get_state() for i, layer in enumerate(ref.model.layers)}
        NeuralDatabase.save_state({"states": states, "metadata": {"num_tokens": 37}},
                                  str(tmp_path / "doc.pt"))
        want = [ref(question[:, t:t + 1], use_cache=False).logits for t in range(4)]
    ours = load_hf_model(hf_dirs["llama"], attention="coda_bounded", attention_options=BOUNDED,
                         adapters=path, dtype=jnp.float32, progress=False)
    state, meta = import_reference_states(tmp_path / "doc.pt", ours)
    assert meta == {"num_tokens": 37} and state.pos.tolist() == [[37], [37]]
    for t in range(4):
        logits, state = ours.step(jnp.asarray(question[:, t:t + 1].numpy()), state)
        assert_close(logits, want[t], rtol=1e-4, what=f"query token {t}")
    evil = tmp_path / "evil_state.pt"
    torch.save({"states": {0: Payload()}, "metadata": {}}, evil)
    with pytest.raises(ValueError, match="refused"):
        import_reference_states(evil, ours)


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("options", [
    dict(head_dim=8),
    dict(head_dim=16, qkv_bias=True, o_bias=True, head_norm_mode="full", qk_norm=True),
])
def test_the_adapter_shape_table_is_the_layers_own(bounded, options):
    """The model-free check of adapter files (``convert adapters``) derives every
    key's shape from one (num_heads, num_kv_heads, head_dim, embed_dim): the
    table agrees with the layers' reference state_dicts."""
    from flax import nnx

    from coda_jax import CoDAGQA, CoDAGQALandmark
    from convert.adapters import ADAPTER_SHAPES, HF_OWNED, AdapterDims, check_adapter_weights
    from convert.reference import reference_state_dict

    cls = CoDAGQALandmark if bounded else CoDAGQA
    extra = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4) if bounded else {}
    layer = cls(embed_dim=32, num_heads=4, num_kv_heads=2, **options, **extra,
                rngs=nnx.Rngs(0))
    sd = {"coda." + k: v for k, v in reference_state_dict(layer).items()
          if not k.startswith(HF_OWNED)}
    dims = AdapterDims(4, 2, options["head_dim"], 32)
    for key, value in sd.items():
        assert value.shape == ADAPTER_SHAPES[key[len("coda."):]](dims), key
    tensors, found = check_adapter_weights({"layer_0": sd, "layer_1": sd}, "table")
    assert found == dims and set(tensors["layer_1"]) == {k[len("coda."):] for k in sd}
