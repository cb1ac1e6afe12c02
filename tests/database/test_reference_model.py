"""A reference-format model (a HuggingFace Llama plus the reference's trained
coda_adapters.pt) serves the database: opened directly, it answers as the same
model converted through ``convert``; its adapters are really used."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from coda_db import NeuralDatabase

from database_fixtures import TEXT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
coda_gqa_l = pytest.importorskip("coda_gqa_l")

GREEDY = dict(temperature=0.0, max_new_tokens=5)
BANK_FLAGS = ("--window", "32", "--num-landmarks-exact", "8", "--num-landmarks-summary", "8")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    from train.data import train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root)
    adapters = coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers(
        model, bounded=True, window=32, num_landmarks_exact=8, num_landmarks_summary=8,
        block_size=8)
    with torch.no_grad():  # "trained" adapters: far from their initial values
        for adapter in adapters:
            for p in adapter.coda.parameters():
                p.add_(0.3 * torch.randn_like(p))
    torch.save({f"layer_{i}": a.state_dict() for i, a in enumerate(adapters)},
               root / "coda_adapters.pt")
    train_tokenizer([TEXT], 320, root / "tokenizer.json")
    return root


def test_a_reference_model_answers_as_its_converted_checkpoint(reference_dir, tmp_path):
    from convert.__main__ import main as convert

    ckpt = tmp_path / "ckpt"
    assert convert(["hf", str(reference_dir), str(ckpt), "--attention", "coda_bounded",
                    "--adapters", str(reference_dir / "coda_adapters.pt"),
                    *BANK_FLAGS]) == 0  # bf16, as the HF directory opened directly
    shutil.copy(reference_dir / "tokenizer.json", ckpt / "tokenizer.json")
    converted = NeuralDatabase(ckpt, library=tmp_path / "lib1")
    converted.ingest(TEXT[:400])
    want = converted.query("How many seals?", **GREEDY).tokens
    # The HF directory opened directly: the adapters next to it, the same bank.
    with pytest.warns(UserWarning, match="do not record the bank"):
        assumed = NeuralDatabase(reference_dir, library=tmp_path / "lib2")
    assert assumed.opened.model.spec.bank.window == 256  # the default, said loudly
    direct = NeuralDatabase(reference_dir, library=tmp_path / "lib2",
                            bank_options=dict(window=32, num_landmarks_exact=8,
                                              num_landmarks_summary=8))
    assert len(want) == GREEDY["max_new_tokens"]
    # The adapter file's weights are the ones used (they were moved off their init).
    saved = torch.load(reference_dir / "coda_adapters.pt", weights_only=True)
    theta = next(v for k, v in saved["layer_0"].items() if k.endswith("theta"))
    ours = np.asarray(direct.opened.model.layers.self_attn.theta[...][0], np.float32)
    np.testing.assert_allclose(ours, theta.float().numpy(), atol=1e-2)  # bf16
    assert not np.allclose(ours, ours.flat[0])
    # Saved and loaded again, the converted model's state answers as before.
    converted.save("seals")
    again = NeuralDatabase(ckpt, library=tmp_path / "lib1")
    again.load("seals")
    assert again.query("How many seals?", **GREEDY).tokens == want
    direct.ingest(TEXT[:400])
    assert direct.query("How many seals?", **GREEDY).tokens == want
