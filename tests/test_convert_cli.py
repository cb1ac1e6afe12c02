"""`python -m convert`: HF -> Orbax model, reference adapters -> Orbax, and export back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import coda_gqa_l
from coda_jax.model_io import load_model, read_model_metadata
from convert.__main__ import main
from convert.adapters import read_adapter_file
from convert.hf import load_hf_model
from oracle import perturb_


def test_cli_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=61))
    hf.save_pretrained(tmp_path / "hf")
    adapters = coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers(
        hf, bounded=True, window=8, num_landmarks_exact=4, num_landmarks_summary=4)
    for a in adapters:
        perturb_(a.coda, 1)
    torch.save({f"layer_{i}": a.state_dict() for i, a in enumerate(adapters)},
               tmp_path / "coda_adapters.pt")

    assert main(["hf", str(tmp_path / "hf"), str(tmp_path / "model"), "--dtype", "float32",
                 "--attention", "coda_bounded", "--adapters", str(tmp_path / "coda_adapters.pt"),
                 "--window", "8", "--num-landmarks-exact", "4",
                 "--num-landmarks-summary", "4"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "float32" in out and "bytes" in out
    model = load_model(tmp_path / "model")
    meta = read_model_metadata(tmp_path / "model")
    assert meta["attention_options"] == {"window": 8, "num_landmarks_exact": 4,
                                         "num_landmarks_summary": 4}
    direct = load_hf_model(tmp_path / "hf", attention="coda_bounded",
                           attention_options=dict(window=8, num_landmarks_exact=4,
                                                  num_landmarks_summary=4),
                           adapters=tmp_path / "coda_adapters.pt", dtype=jnp.float32,
                           progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(direct))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert main(["adapters", str(tmp_path / "coda_adapters.pt"), str(tmp_path / "ad")]) == 0
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.pt")]) == 0
    original = read_adapter_file(tmp_path / "coda_adapters.pt")
    for other in (read_adapter_file(tmp_path / "ad"), read_adapter_file(tmp_path / "back.pt")):
        for layer, sd in original.items():
            for key, value in sd.items():
                np.testing.assert_array_equal(other[layer][key], value)
    # Errors are one line on stderr and exit code 2; nothing is overwritten.
    capsys.readouterr()
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.pt")]) == 2
    assert main(["adapters", str(tmp_path / "coda_adapters.pt"), str(tmp_path / "ad")]) == 2
    assert capsys.readouterr().err.count("exists") == 2
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.pt"),
                 "--overwrite"]) == 0
    assert main(["hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
