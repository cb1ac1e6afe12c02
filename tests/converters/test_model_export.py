"""Compact sharded safetensors exports of whole models, and loading them back."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import CausalLM, DecoderConfig
from convert import export_model, load_export

CFG = DecoderConfig("llama", 97, 32, 48, 3, 4, 2, 8)


def test_export_is_sharded_bf16_and_loads_back(tmp_path):
    model = CausalLM(CFG, attention="coda_bounded",
                     attention_options=dict(window=8, num_landmarks_exact=4,
                                            num_landmarks_summary=4), rngs=nnx.Rngs(0))
    out = export_model(model, tmp_path / "e", max_shard_bytes=4096)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 3 and all(f.stat().st_size <= 4096 + 2048 for f in files)
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"
    back = load_export(out, dtype=jnp.float32)
    assert back.spec == model.spec
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a),
                                      np.asarray(b.astype(jnp.bfloat16).astype(jnp.float32)))
    tokens = jnp.array([[1, 2, 3, 4, 5]])
    want, _ = model.prefill(tokens, model.init_state(1, mem_init="zeros"), block_size=4)
    got, _ = back.prefill(tokens, back.init_state(1, mem_init="zeros"), block_size=4)
    assert float(jnp.abs(got - want).max()) < 0.1  # bf16 weights


def test_damaged_or_foreign_exports_are_refused(tmp_path):
    model = CausalLM(CFG, rngs=nnx.Rngs(0))
    out = export_model(model, tmp_path / "e", max_shard_bytes=8192)
    first = sorted(out.glob("*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="damaged: model-00001.safetensors does not match"):
        load_export(out)
    with pytest.raises(FileNotFoundError, match="no model export"):
        load_export(tmp_path / "nothing")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        export_model(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "a.txt").read_text() == "keep"
    export_model(model, out, overwrite=True)  # our own export: replaced
    load_export(out)


def test_pack_and_unpack_commands_round_trip_and_refuse_what_is_not_theirs(tmp_path, capsys):
    from coda_jax import load_model, save_model
    from convert.__main__ import main

    model = CausalLM(CFG, attention="coda", rngs=nnx.Rngs(1))
    ckpt = save_model(tmp_path / "ckpt", model)
    assert main(["pack", str(ckpt), str(tmp_path / "pack"), "--max-shard-mib", "0.01"]) == 0
    assert len(list((tmp_path / "pack").glob("*.safetensors"))) > 2
    assert main(["unpack", str(tmp_path / "pack"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
    assert float(jnp.abs(back(tokens)[0] - model(tokens)[0]).max()) < 0.1  # bf16 weights
    # A user's folder is never replaced, even with --overwrite; a missing input is code 2.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["pack", str(ckpt), str(mine), "--overwrite"]) == 3
    assert (mine / "notes.txt").read_text() == "keep"
    assert main(["unpack", str(tmp_path / "absent"), str(tmp_path / "x")]) == 2
    assert main(["pack", str(ckpt), str(tmp_path / "p2"), "--max-shard-mib", "0"]) == 1
    assert "--max-shard-mib" in capsys.readouterr().err


def test_low_rank_differences_from_a_base_load_back_to_their_best_approximation(tmp_path):
    base = CausalLM(CFG, attention="coda", rngs=nnx.Rngs(0))
    model = CausalLM(CFG, attention="coda", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    mlp = model.layers.mlp
    kernel = np.asarray(mlp.up_proj.kernel[...])            # (layers, in, out)
    rank_two = rng.normal(size=kernel.shape[:-1] + (2,)) @ rng.normal(
        size=kernel.shape[:1] + (2, kernel.shape[-1]))
    mlp.up_proj.kernel[...] = jnp.asarray(kernel + 0.01 * rank_two, jnp.float32)
    full = rng.normal(size=mlp.down_proj.kernel[...].shape) * 0.01
    mlp.down_proj.kernel[...] = mlp.down_proj.kernel[...] + jnp.asarray(full, jnp.float32)
    ranks = {"layers.mlp.*": 2}
    out = export_model(model, tmp_path / "e", base=base, dtype=jnp.float32, ranks=ranks)
    storage = json.loads((out / "export.json").read_text())["base"]["storage"]
    assert storage["layers.mlp.up_proj.kernel"] == "lowrank_delta"
    assert storage["layers.mlp.gate_proj.kernel"] == "base"        # unchanged: not stored
    back = load_export(out, base=base)
    # a rank-2 difference comes back exactly (float32 factors), a full-rank one as its
    # best rank-2 approximation, layer by layer
    np.testing.assert_allclose(np.asarray(back.layers.mlp.up_proj.kernel[...]),
                               np.asarray(mlp.up_proj.kernel[...]), atol=1e-5)
    u, s, vt = np.linalg.svd(full, full_matrices=False)
    best = (u[..., :2] * s[..., None, :2]) @ vt[..., :2, :]
    np.testing.assert_allclose(np.asarray(back.layers.mlp.down_proj.kernel[...]),
                               np.asarray(base.layers.mlp.down_proj.kernel[...]) + best,
                               atol=1e-5)
    with pytest.raises(ValueError, match="ranks apply to differences from a base"):
        export_model(model, tmp_path / "f", ranks=ranks)
    with pytest.raises(ValueError, match="positive integers"):
        export_model(model, tmp_path / "f", base=base, ranks={"layers.mlp.*": 0})
    assert not (tmp_path / "f").exists()
