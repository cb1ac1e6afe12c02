"""Bad inputs and dangerous outputs for every converter: one table, exact outcomes.

Each row names an input, runs one ``python -m convert`` command line (exit
code) or one library call (exception type), and expects a message fragment.
Every row also checks that nothing on disk changed: the sha256 of every file
that existed before is the same afterwards, no file or directory appeared or
vanished (so no ``.*.saving-*`` staging entry was left), no message advises
``weights_only=False``, and a pickle carrying code never ran it.
"""
from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.__main__ import main
from convert.adapters import adapter_weights, load_adapters, read_adapter_file, save_adapters
from convert.hf import load_hf_model
from convert.reference import from_reference
from convert.reference_states import import_reference_states

from bad_input_world import (BANK, MakesMarker, World, adapter_file, empty_file, evil_pickle,
                             foreign_safetensors, hf_config, hf_copy, hf_nan, hf_truncated,
                             make_world, marker_of, nan_module, plain_file, poke,
                             random_file, safetensors_truncated, snapshot, torch_file,
                             user_folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory)


# ------------------------------------------------------------- the table
@dataclass
class Row:
    id: str
    run: Callable[[Path, World], Any]  # argv (list) for main, or a zero-argument call
    expect: int | type                 # exit code or exception type
    fragment: str
    before_weights: bool = False       # must fail before any weight is read


def cli(*parts: Callable[[Path, World], Any] | str) -> Callable[[Path, World], list[str]]:
    """argv from literal strings and makers (t, w) -> path."""
    return lambda t, w: [p if isinstance(p, str) else str(p(t, w)) for p in parts]


def call(fn: Callable, *args: Callable[[Path, World], Any],
         **kwargs: Any) -> Callable[[Path, World], Callable[[], Any]]:
    """A call of ``fn``: positional arguments from makers (t, w) -> value, keyword
    arguments literal or from makers."""
    def run(t: Path, w: World) -> Callable[[], Any]:
        values = [make(t, w) for make in args]
        named = {k: v(t, w) if isinstance(v, type(run)) else v for k, v in kwargs.items()}
        return lambda: fn(*values, **named)
    return run


def out(name: str) -> Callable[[Path, World], Path]:
    return lambda t, w: t / name


def world_attr(name: str) -> Callable[[Path, World], Any]:
    return lambda t, w: getattr(w, name)


W = {name: world_attr(name) for name in ("hf", "adapters", "model", "ad", "export_pt",
                                          "export_st", "states", "loaded", "good")}
BANK_FLAGS = [part for k, v in BANK.items() for part in ("--" + k.replace("_", "-"), str(v))]

ROWS = [
    # --- python -m convert adapters
    Row("adapters: missing input", cli("adapters", out("nowhere.pt"), out("o")), 2,
        "no adapter file at"),
    Row("adapters: a user's folder as input", cli("adapters", lambda t, w: user_folder(t),
                                                  out("o")), 3,
        "is not a saved coda_jax adapter checkpoint"),
    Row("adapters: empty file", cli("adapters", lambda t, w: empty_file(t, "e.pt"), out("o")), 3,
        "is not a PyTorch adapter file (it is empty)"),
    Row("adapters: random bytes", cli("adapters", lambda t, w: random_file(t, "r.pt"), out("o")),
        3, "is not a PyTorch adapter file (neither a torch archive nor a pickle)"),
    Row("adapters: text file", cli("adapters", lambda t, w: plain_file(t, "r.pt"), out("o")),
        3, "is not a PyTorch adapter file"),
    Row("adapters: torch file with code", cli("adapters", lambda t, w: evil_pickle(t, how="torch"),
                                              out("o")), 3,
        "refused: it holds objects other than tensors (posix.mkdir)"),
    Row("adapters: pickle (protocol 2) with code",
        cli("adapters", lambda t, w: evil_pickle(t, how="pickle2"), out("o")), 3,
        "refused: it holds objects other than tensors (posix.mkdir)"),
    Row("adapters: pickle (protocol 4) with code",
        cli("adapters", lambda t, w: evil_pickle(t, how="pickle4"), out("o")), 3,
        "refused: it is not a plain file of tensors"),
    Row("adapters: a non-tensor value", cli("adapters", lambda t, w: torch_file(
        t / "int.pt", {"layer_0": {"coda.theta": 3}}), out("o")), 3,
        "refused: it holds objects other than tensors (layer_0: 'coda.theta' is of type int, "
        "not a tensor)"),
    Row("adapters: a list", cli("adapters", lambda t, w: torch_file(t / "l.pt", [1, 2]),
                                out("o")), 3, "holds a list, expected a dict"),
    Row("adapters: truncated torch archive", cli("adapters", lambda t, w: (
        t / "cut.pt").write_bytes(w.adapters.read_bytes()[:5000]) and t / "cut.pt", out("o")), 3,
        "is not a PyTorch adapter file (a damaged or truncated torch archive"),
    Row("adapters: a layer missing (gap)", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd.update(layer_2=sd.pop("layer_1"))), out("o")), 3,
        "layers must be named layer_0 .. layer_1 without gaps: missing ['layer_1'], "
        "unexpected ['layer_2']"),
    Row("adapters: an extra layer", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd.update(extra=sd["layer_0"])), out("o")), 3,
        "missing ['layer_2'], unexpected ['extra']"),
    Row("adapters: an extra key", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd["layer_1"].update({"coda.bogus": torch.zeros(3)})), out("o")), 3,
        "layer_1: missing [], unexpected ['bogus']"),
    Row("adapters: a key missing in one layer", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd["layer_1"].pop("coda.write_proj.bias")), out("o")), 3,
        "layer_1 has other keys than layer_0: missing ['write_proj.bias']"),
    Row("adapters: a key missing in all layers", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: [s.pop("coda.theta") for s in sd.values()]), out("o")), 3,
        "layer_0: missing ['theta'], unexpected []"),
    Row("adapters: a wrong shape", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd["layer_1"].update({"coda.theta": torch.zeros(8, 8)})), out("o")), 3,
        "layer_1: 'theta' has shape (8, 8), what layer_0 implies (num_heads=4, num_kv_heads=2, "
        "head_dim=8, embed_dim=32) is (4, 4)"),
    Row("adapters: inconsistent head counts", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: [s.update({"coda.k_proj.weight": torch.zeros(24, 32)})
                          for s in sd.values()]), out("o")), 3,
        "num_heads=4 (from 'theta' (4, 4)) is not a multiple of num_kv_heads=3"),
    Row("adapters: v_proj of other head counts", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd["layer_0"].update({"coda.v_proj.weight": torch.zeros(24, 32)})),
        out("o")), 3,
        "layer_0: 'v_proj.weight' has shape (24, 32), what layer_0 implies (num_heads=4, "
        "num_kv_heads=2, head_dim=8, embed_dim=32) is (16, 32)"),
    Row("adapters: NaN", cli("adapters", lambda t, w: adapter_file(
        t, w, poke("layer_1", "coda.lambda_proj.weight", float("nan"))), out("o")), 3,
        "layer_1: 'lambda_proj.weight' holds NaN or Inf (1 of 128 values)"),
    Row("adapters: Inf", cli("adapters", lambda t, w: adapter_file(
        t, w, poke("layer_0", "coda.o_proj.weight", float("-inf"))), out("o")), 3,
        "layer_0: 'o_proj.weight' holds NaN or Inf"),
    Row("adapters: integer tensor", cli("adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd["layer_0"].update({"coda.write_proj.bias": torch.ones(
            1, dtype=torch.int64)})), out("o")), 3,
        "layer_0: 'write_proj.bias' has dtype int64, not a floating-point type"),
    Row("adapters: truncated safetensors", cli("adapters", safetensors_truncated, out("o")), 3,
        "is truncated"),
    Row("adapters: safetensors with a bad header", cli("adapters", lambda t, w: (
        t / "h.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00[1] ")
        and t / "h.safetensors", out("o")), 3, "has a malformed safetensors header"),
    Row("adapters: output is the input", cli("adapters", W["adapters"], W["adapters"],
                                             "--overwrite"), 3,
        "is the input", before_weights=True),
    Row("adapters: output inside the input", cli("adapters", W["ad"],
                                                 lambda t, w: w.ad / "inner"), 3,
        "lies inside the input", before_weights=True),
    Row("adapters: output contains the input", cli("adapters", W["adapters"],
                                                   lambda t, w: w.root, "--overwrite"), 3,
        "contains the input", before_weights=True),
    Row("adapters: output a user's folder", cli("adapters", W["adapters"],
                                                lambda t, w: user_folder(t), "--overwrite"), 3,
        "refusing to overwrite", before_weights=True),
    Row("adapters: output a plain file", cli("adapters", W["adapters"],
                                             lambda t, w: plain_file(t, "o"), "--overwrite"), 3,
        "refusing to overwrite", before_weights=True),
    Row("adapters: output a model checkpoint", cli("adapters", W["adapters"], W["model"],
                                                   "--overwrite"), 3,
        "not a saved adapter checkpoint written by coda_jax", before_weights=True),
    Row("adapters: output exists", cli("adapters", W["adapters"], W["ad"]), 3,
        "already exists (a directory of", before_weights=True),
    # --- python -m convert hf
    Row("hf: missing model dir", cli("hf", out("nowhere"), out("o")), 2,
        "no HuggingFace model directory at"),
    Row("hf: a file as model dir", cli("hf", W["adapters"], out("o")), 3,
        "is a file of", ),
    Row("hf: a folder without config.json", cli("hf", lambda t, w: user_folder(t), out("o")), 2,
        "no config.json in"),
    Row("hf: config.json a directory", cli("hf", lambda t, w: (
        (t / "d" / "config.json").mkdir(parents=True) or t / "d"), out("o")), 3,
        "config.json is an empty directory, not a config file"),
    Row("hf: bad model_type", cli("hf", lambda t, w: hf_config(
        t, w, lambda c: c.update(model_type="gpt2")), out("o")), 3,
        "model_type 'gpt2' is not supported"),
    Row("hf: config.json not JSON", cli("hf", lambda t, w: hf_config(t, w, lambda c: "{oops"),
                                        out("o")), 3, "config.json is not valid JSON"),
    Row("hf: config.json lacks a field", cli("hf", lambda t, w: hf_config(
        t, w, lambda c: c.pop("hidden_size")), out("o")), 3,
        "config.json: the config lacks hidden_size"),
    Row("hf: no weights", cli("hf", lambda t, w: hf_copy(t, w).joinpath(
        "model.safetensors").unlink() or t / "hf", out("o")), 2,
        "no model.safetensors or model.safetensors.index.json"),
    Row("hf: truncated safetensors", cli("hf", hf_truncated, out("o")), 3, "is truncated"),
    Row("hf: NaN weight", cli("hf", hf_nan, out("o")), 3,
        "weight 'model.layers.1.mlp.up_proj.weight' holds NaN or Inf (1 of 1,536 values)"),
    Row("hf: adapters missing", cli("hf", W["hf"], out("o"), "--attention", "coda",
                                    "--adapters", out("nowhere.pt")), 2, "no adapter file at"),
    Row("hf: adapters with NaN", cli("hf", W["hf"], out("o"), "--attention", "coda_bounded",
                                     "--adapters", lambda t, w: adapter_file(
                                         t, w, poke("layer_0", "coda.theta", float("nan"))),
                                     *BANK_FLAGS), 3,
        "layer_0: 'theta' holds NaN or Inf"),
    Row("hf: adapters with code", cli("hf", W["hf"], out("o"), "--attention", "coda",
                                      "--adapters", lambda t, w: evil_pickle(t, how="torch")), 3,
        "refused: it holds objects other than tensors"),
    Row("hf: adapters of other head counts", cli("hf", W["hf"], out("o"), "--attention", "coda",
                                                 "--adapters", lambda t, w: adapter_file(
        t, w, lambda sd: [s.update({"coda.theta": torch.zeros(8, 2),
                                    "coda.lambda_proj.weight": torch.zeros(8, 32),
                                    "coda.lambda_proj.bias": torch.zeros(8),
                                    "coda.summary_eta_logit": torch.zeros(4)})
                          for s in sd.values()])), 3, "does not fit"),
    Row("hf: adapters with an extra layer", cli("hf", W["hf"], out("o"), "--attention", "coda",
                                                "--adapters", lambda t, w: adapter_file(
        t, w, lambda sd: sd.update(layer_2=sd["layer_0"]))), 3,
        "the adapter has 3 layers"),
    Row("hf: --window with --attention gqa", cli("hf", W["hf"], out("o"), "--window", "8"), 1,
        "--window applies only to --attention coda_bounded, not --attention gqa"),
    Row("hf: --adapters with --attention gqa", cli("hf", W["hf"], out("o"), "--adapters",
                                                   W["adapters"]), 1,
        "--adapters needs --attention coda or --attention coda_bounded"),
    Row("hf: output is the input", cli("hf", W["hf"], W["hf"], "--overwrite"), 3,
        "is the input", before_weights=True),
    Row("hf: output inside the input", cli("hf", W["hf"], lambda t, w: w.hf / "out"), 3,
        "lies inside the input", before_weights=True),
    Row("hf: output is the adapter file", cli("hf", W["hf"], W["adapters"], "--attention", "coda",
                                              "--adapters", W["adapters"], "--overwrite"), 3,
        "is the input", before_weights=True),
    Row("hf: output a user's folder", cli("hf", W["hf"], lambda t, w: user_folder(t),
                                          "--overwrite"), 3,
        "refusing to overwrite", before_weights=True),
    Row("hf: output a plain file", cli("hf", W["hf"], lambda t, w: plain_file(t, "o"),
                                       "--overwrite"), 3,
        "refusing to overwrite", before_weights=True),
    Row("hf: output an adapter checkpoint", cli("hf", W["hf"], W["ad"], "--overwrite"), 3,
        "not a saved model written by coda_jax", before_weights=True),
    Row("hf: output exists", cli("hf", W["hf"], W["model"]), 3,
        "already exists (a directory of", before_weights=True),
    # --- python -m convert export
    Row("export: missing model", cli("export", out("nowhere"), out("o.pt")), 2,
        "no saved model at"),
    Row("export: a file as model", cli("export", W["adapters"], out("o.pt")), 3,
        "is a file of"),
    Row("export: a user's folder as model", cli("export", lambda t, w: user_folder(t),
                                                out("o.pt")), 3,
        "is not a saved coda_jax model"),
    Row("export: an adapter checkpoint as model", cli("export", W["ad"], out("o.pt")), 3,
        "is not a saved coda_jax model (format 'coda_jax.adapters/1'"),
    Row("export: unknown suffix", cli("export", W["model"], out("o.bin")), 1,
        "cannot tell the export format from OUT's suffix '.bin'"),
    Row("export: --format contradicts suffix", cli("export", W["model"], out("o.safetensors"),
                                                   "--format", "pt"), 1,
        "--format pt contradicts OUT's suffix .safetensors"),
    Row("export: output inside the model", cli("export", W["model"],
                                               lambda t, w: w.model / "a.pt"), 3,
        "lies inside the input", before_weights=True),
    Row("export: output a user's .pt", cli("export", W["model"],
                                           lambda t, w: random_file(t, "mine.pt"),
                                           "--overwrite"), 3,
        "refusing to overwrite", before_weights=True),
    Row("export: output a .pt of other content", cli("export", W["model"], lambda t, w: torch_file(
        t / "list.pt", [torch.zeros(2)]), "--overwrite"), 3,
        "not a pt adapter file written by coda_jax", before_weights=True),
    Row("export: output a foreign safetensors", cli("export", W["model"],
                                                    lambda t, w: foreign_safetensors(t),
                                                    "--overwrite"), 3,
        "not a safetensors adapter file written by coda_jax", before_weights=True),
    Row("export: output a folder", cli("export", W["model"],
                                       lambda t, w: user_folder(t).rename(t / "f.pt") or
                                       t / "f.pt", "--overwrite"), 3,
        "refusing to overwrite", before_weights=True),
    Row("export: output exists", cli("export", W["model"], W["export_pt"]), 3,
        "already exists (a file of", before_weights=True),
    # --- library functions
    Row("load_hf_model: missing", call(load_hf_model, out("nowhere")), FileNotFoundError,
        "no HuggingFace model directory at"),
    Row("load_hf_model: a file", call(load_hf_model, W["adapters"]), ValueError, "is a file of"),
    Row("load_hf_model: bad model_type", call(load_hf_model, lambda t, w: hf_config(
        t, w, lambda c: c.update(model_type="bert"))), ValueError,
        "model_type 'bert' is not supported"),
    Row("load_hf_model: truncated", call(load_hf_model, hf_truncated, progress=False),
        ValueError, "is truncated"),
    Row("load_hf_model: NaN", call(load_hf_model, hf_nan, progress=False), ValueError,
        "weight 'model.layers.1.mlp.up_proj.weight' holds NaN or Inf"),
    Row("load_hf_model: bad adapters", call(load_hf_model, W["hf"], attention="coda",
                                            adapters=lambda t, w: adapter_file(
        t, w, lambda sd: sd["layer_0"].pop("coda.q_proj.weight"))), ValueError,
        "layer_0: missing ['q_proj.weight']"),
    Row("load_adapters: missing layer", call(load_adapters, W["loaded"], lambda t, w: adapter_file(
        t, w, lambda sd: sd.pop("layer_1"))), ValueError,
        "adapter layers do not match the model's 2: missing ['layer_1'], unexpected []"),
    Row("load_adapters: extra layer", call(load_adapters, W["loaded"], lambda t, w: w.good | {
        "layer_2": w.good["layer_0"]}), ValueError, "missing [], unexpected ['layer_2']"),
    Row("load_adapters: extra key", call(load_adapters, W["loaded"], lambda t, w: w.good | {
        "layer_1": w.good["layer_1"] | {"coda.bogus": np.zeros(3)}}), ValueError,
        "layer_1: missing [], unexpected ['bogus']"),
    Row("load_adapters: missing key", call(load_adapters, W["loaded"], lambda t, w: {
        k: {n: v for n, v in sd.items() if n != "coda.write_proj.weight"}
        for k, sd in w.good.items()}), ValueError,
        "missing ['write_proj.weight'], unexpected []"),
    Row("load_adapters: wrong shape", call(load_adapters, W["loaded"], lambda t, w: w.good | {
        "layer_1": w.good["layer_1"] | {"coda.theta": np.zeros((8, 8), np.float32)}}),
        ValueError, "'theta' has shape (8, 8), the model's (num_heads=4, num_kv_heads=2, "
                    "head_dim=8) is (4, 4)"),
    Row("load_adapters: Inf", call(load_adapters, W["loaded"], lambda t, w: w.good | {
        "layer_1": w.good["layer_1"] | {
            "coda.summary_eta_logit": np.array([0.0, np.inf], np.float32)}}),
        ValueError, "layer_1: 'summary_eta_logit' holds NaN or Inf"),
    Row("load_adapters: code in the file", call(load_adapters, W["loaded"],
                                                lambda t, w: evil_pickle(t, how="torch")),
        ValueError, "refused"),
    Row("read_adapter_file: missing", call(read_adapter_file, out("x.pt")), FileNotFoundError,
        "no adapter file at"),
    Row("read_adapter_file: a folder", call(read_adapter_file, lambda t, w: user_folder(t)),
        ValueError, "without meta/ and tree/"),
    Row("read_adapter_file: empty", call(read_adapter_file, lambda t, w: empty_file(t, "e.pt")),
        ValueError, "is not a PyTorch adapter file (it is empty)"),
    Row("read_adapter_file: random bytes", call(read_adapter_file,
                                                lambda t, w: random_file(t, "r.pt")),
        ValueError, "is not a PyTorch adapter file"),
    Row("read_adapter_file: code", call(read_adapter_file,
                                        lambda t, w: evil_pickle(t, how="pickle2")),
        ValueError, "refused: it holds objects other than tensors (posix.mkdir)"),
    Row("read_adapter_file: truncated safetensors", call(read_adapter_file,
                                                         safetensors_truncated),
        ValueError, "is truncated"),
    Row("read_adapter_file: NaN", call(read_adapter_file, lambda t, w: adapter_file(
        t, w, poke("layer_1", "coda.q_proj.weight", float("nan")))), ValueError,
        "layer_1: 'q_proj.weight' holds NaN or Inf"),
    Row("save_adapters: output exists", call(save_adapters, W["loaded"], W["export_pt"]),
        FileExistsError, "already exists"),
    Row("save_adapters: a user's file", call(save_adapters, W["loaded"],
                                             lambda t, w: random_file(t, "mine.pt"),
                                             overwrite=True),
        ValueError, "refusing to overwrite"),
    Row("save_adapters: a user's folder", call(save_adapters, W["loaded"], lambda t, w: (
        user_folder(t).rename(t / "f.safetensors")), overwrite=True), ValueError,
        "refusing to overwrite"),
    Row("save_adapters: our pt as safetensors", call(save_adapters, W["loaded"], lambda t, w: (
        Path(shutil.copy(w.export_pt, t / "x.bin"))), overwrite=True, format="safetensors"),
        ValueError, "not a safetensors adapter file written by coda_jax"),
    Row("save_adapters: unknown suffix", call(save_adapters, W["loaded"], out("a.bin")),
        ValueError, "from its suffix '.bin': expected .pt (pt) or .safetensors (safetensors)"),
    Row("import_reference_states: missing", call(import_reference_states, out("s.pt"),
                                                 W["loaded"]),
        FileNotFoundError, "no reference neural state file at"),
    Row("import_reference_states: empty", call(import_reference_states,
                                               lambda t, w: empty_file(t, "s.pt"), W["loaded"]),
        ValueError, "is not a reference neural state file (it is empty)"),
    Row("import_reference_states: random bytes", call(import_reference_states, lambda t, w: (
        random_file(t, "s.pt")), W["loaded"]),
        ValueError, "is not a reference neural state file (neither a torch archive"),
    Row("import_reference_states: code", call(import_reference_states, lambda t, w: torch_file(
        t / "s.pt", {"states": {0: MakesMarker(marker_of(t))}, "metadata": {}}), W["loaded"]),
        ValueError, "refused: it holds objects other than tensors (posix.mkdir)"),
    Row("import_reference_states: adapters instead", call(import_reference_states,
                                                          W["adapters"], W["loaded"]),
        ValueError, "is not a reference neural state file (expected"),
    Row("import_reference_states: a folder", call(import_reference_states,
                                                  lambda t, w: user_folder(t), W["loaded"]),
        ValueError, "is a directory of 2 entries"),
    Row("import_reference_states: missing layer", call(import_reference_states, lambda t, w: (
        torch_file(t / "s.pt", {"states": {0: torch.load(w.states, weights_only=False)[
            "states"][0]}, "metadata": {}})), W["loaded"]),
        ValueError, "holds states of layers [0], the model has 2"),
    Row("from_reference: NaN", call(from_reference, lambda t, w: nan_module()), ValueError,
        "CoDAGQA weight 'lambda_proj.weight' holds NaN or Inf"),
]


def model_weights(model) -> list[np.ndarray]:
    return [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


@pytest.fixture
def no_weights_read(monkeypatch):
    """Reading any input's weights fails the test."""
    import coda_jax.model_io
    import convert.adapters
    import convert.hf

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were read before the output was checked")

    monkeypatch.setattr(convert.hf, "load_hf_model", forbidden)
    monkeypatch.setattr(convert.adapters, "read_adapter_file", forbidden)
    monkeypatch.setattr(coda_jax.model_io, "load_model", forbidden)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, world: World, tmp_path: Path, capsys, request):
    t = tmp_path / "t"
    t.mkdir()
    action = row.run(t, world)
    before = snapshot(world.root, tmp_path)
    weights_before = model_weights(world.loaded)
    capsys.readouterr()
    if row.before_weights:
        request.getfixturevalue("no_weights_read")
    if isinstance(action, list):
        assert isinstance(row.expect, int)
        code = main(action)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == row.expect, err
        assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
        assert row.fragment in errors[0], errors[0]
        messages = err
    else:
        with pytest.raises(row.expect) as info:
            action()
        assert row.fragment in str(info.value), str(info.value)
        assert "\n" not in str(info.value)
        messages = str(info.value) + str(info.value.__cause__) + str(info.value.__context__)
    assert "weights_only=False" not in messages and "weights_only` set to `False" not in messages
    assert snapshot(world.root, tmp_path) == before
    assert not marker_of(t).exists(), "a pickle's code ran"
    for a, b in zip(weights_before, model_weights(world.loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_marker_pickle_does_run_code_when_unpickled_unsafely(tmp_path):
    """The table's code-carrying pickles are real: plain pickle runs them."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(MakesMarker(marker)))
    assert marker.is_dir()


def test_every_command_and_library_function_is_in_the_table():
    ids = " ".join(r.id for r in ROWS)
    for name in ("adapters:", "hf:", "export:", "load_hf_model:", "load_adapters:",
                 "read_adapter_file:", "save_adapters:", "import_reference_states:"):
        assert name in ids


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_failed_export_leaves_the_old_file_whole(world, tmp_path, monkeypatch, fmt):
    """A crash while writing (here: after half the bytes) leaves the old export
    byte-identical and no staging file behind; a later retry replaces it."""
    import safetensors.numpy

    target = tmp_path / f"a.{fmt}"
    shutil.copy(world.export_pt if fmt == "pt" else world.export_st, target)
    before = snapshot(tmp_path)

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", crash)
    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        save_adapters(world.loaded, target, overwrite=True)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    save_adapters(world.loaded, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    again = read_adapter_file(target)
    for layer, sd in adapter_weights(world.loaded).items():
        for key, value in sd.items():
            np.testing.assert_array_equal(again[layer][key], value)


def test_export_of_a_nan_model_is_refused(world, tmp_path):
    model = load_hf_model(world.hf, attention="coda", progress=False, dtype=jnp.float32)
    theta = model.layers.self_attn.theta
    theta[...] = theta[...].at[1, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=re.escape("layer_1: 'theta' holds NaN or Inf")):
        save_adapters(model, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []
