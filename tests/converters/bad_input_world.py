"""The world the converters' bad-input table runs in: a tiny HF Llama, reference
adapters, saved models and exports made once per module, and the makers of each
bad input (damaged, foreign or dangerous files, users' folders)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import coda_gqa_l
import jax.numpy as jnp
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coda_jax.model_io import save_model
from convert.__main__ import main
from convert.adapters import read_adapter_file, save_adapters
from convert.hf import load_hf_model
from oracle import perturb_

BANK = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4)


class MakesMarker:
    """Unpickling this runs ``os.mkdir(marker)``: the stand-in for code in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@dataclass
class World:
    root: Path
    hf: Path              # a tiny HF Llama directory
    adapters: Path        # the reference's coda_adapters.pt for it
    model: Path           # `convert hf` output (coda_bounded)
    ad: Path              # `convert adapters` output
    export_pt: Path
    export_st: Path
    states: Path          # the reference's saved neural state
    good: dict            # the adapter file's weights, as read
    loaded: Any           # the bounded model (for load_adapters / import_reference_states)


def make_world(tmp_path_factory) -> World:
    """The inputs every row may use, written once under a fresh temporary directory."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=61))
    hf.save_pretrained(root / "hf")
    adapters = coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers(hf, bounded=True, **BANK)
    for a in adapters:
        perturb_(a.coda, 1)
    torch.save({f"layer_{i}": a.state_dict() for i, a in enumerate(adapters)},
               root / "coda_adapters.pt")
    hf.eval()
    with torch.no_grad():
        hf(torch.randint(0, 61, (1, 13)), use_cache=False)
        states = {i: layer.self_attn.get_state() for i, layer in enumerate(hf.model.layers)}
    coda_gqa_l.NeuralDatabase.save_state({"states": states, "metadata": {"num_tokens": 13}},
                                         str(root / "states.pt"))
    model = load_hf_model(root / "hf", attention="coda_bounded", attention_options=BANK,
                          adapters=root / "coda_adapters.pt", dtype=jnp.float32,
                          progress=False)
    save_model(root / "model", model)
    save_adapters(model, root / "export.pt")
    save_adapters(model, root / "export.safetensors")
    assert main(["adapters", str(root / "coda_adapters.pt"), str(root / "ad")]) == 0
    return World(root, root / "hf", root / "coda_adapters.pt", root / "model", root / "ad",
                 root / "export.pt", root / "export.safetensors", root / "states.pt",
                 read_adapter_file(root / "coda_adapters.pt"), model)


# ------------------------------------------------------------- input makers
def torch_file(path: Path, value: Any, **kwargs) -> Path:
    torch.save(value, path, **kwargs)
    return path


def tensors(w: World) -> dict:
    return {layer: {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
            for layer, sd in w.good.items()}


def adapter_file(t: Path, w: World, change: Callable[[dict], None], name="bad.pt") -> Path:
    sd = tensors(w)
    change(sd)
    return torch_file(t / name, sd)


def poke(layer: str, key: str, value: float) -> Callable[[dict], None]:
    def change(sd):
        sd[layer][key] = sd[layer][key].clone()
        sd[layer][key].view(-1)[3] = value
    return change


def user_folder(t: Path) -> Path:
    folder = t / "my_folder"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "todo.txt").write_text("do not delete me")
    (folder / "photo.jpg").write_bytes(os.urandom(300))
    return folder


def plain_file(t: Path, name: str) -> Path:
    (t / name).write_text("a user's file\n")
    return t / name


def empty_file(t: Path, name: str) -> Path:
    (t / name).write_bytes(b"")
    return t / name


def random_file(t: Path, name: str) -> Path:
    (t / name).write_bytes(np.random.default_rng(0).bytes(4096))
    return t / name


def hf_copy(t: Path, w: World, name="hf") -> Path:
    shutil.copytree(w.hf, t / name)
    return t / name


def hf_config(t: Path, w: World, change: Callable[[dict], Any]) -> Path:
    d = hf_copy(t, w)
    config = json.loads((d / "config.json").read_text())
    result = change(config)
    (d / "config.json").write_text(result if isinstance(result, str) else json.dumps(config))
    return d


def hf_truncated(t: Path, w: World) -> Path:
    d = hf_copy(t, w)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return d


def hf_nan(t: Path, w: World) -> Path:
    from safetensors.numpy import load_file, save_file

    d = hf_copy(t, w)
    weights = load_file(d / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][2, 3] = np.nan
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def safetensors_truncated(t: Path, w: World) -> Path:
    data = w.export_st.read_bytes()
    (t / "cut.safetensors").write_bytes(data[:len(data) - 64])
    return t / "cut.safetensors"


def foreign_safetensors(t: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, t / "theirs.safetensors")
    return t / "theirs.safetensors"


def evil_pickle(t: Path, *, how: str) -> Path:
    payload = {"layer_0": {"coda.theta": MakesMarker(t.parent / f"{t.name}-MARKER")}}
    path = t / "evil.pt"
    if how == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2 if how == "pickle2" else 4)
    return path


def marker_of(t: Path) -> Path:
    return t.parent / f"{t.name}-MARKER"


def nan_module():
    module = coda_gqa_l.CoDAGQA(embed_dim=32, num_heads=4, num_kv_heads=2)
    with torch.no_grad():
        module.lambda_proj.weight[0, 1] = float("nan")
    return module


def snapshot(*roots: Path) -> dict[str, str | None]:
    """Every path under the roots: sha256 for files, None for directories."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest()
                              if path.is_file() and not path.is_symlink() else None)
    return out
