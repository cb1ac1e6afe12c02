"""`python -m convert`: HF -> Orbax model, reference adapters -> Orbax, and export back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import coda_gqa_l
from coda_jax.model_config import BOUNDED_DEFAULTS
from coda_jax.model_io import load_model, read_model_metadata
from convert.__main__ import main
from convert.adapters import read_adapter_file
from convert.hf import load_hf_model
import pytest

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
    assert {k: meta["attention_spec"][k] for k in BOUNDED_DEFAULTS} == {
        "window": 8, "num_landmarks_exact": 4, "num_landmarks_summary": 4}
    direct = load_hf_model(tmp_path / "hf", attention="coda_bounded",
                           attention_options=dict(window=8, num_landmarks_exact=4,
                                                  num_landmarks_summary=4),
                           adapters=tmp_path / "coda_adapters.pt", dtype=jnp.float32,
                           progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(direct))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    capsys.readouterr()
    assert main(["adapters", str(tmp_path / "coda_adapters.pt"), str(tmp_path / "ad")]) == 0
    assert "layers" in capsys.readouterr().err  # a progress bar, on stderr
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.pt")]) == 0
    result = capsys.readouterr()
    assert "format: reference coda_adapters.pt (torch pickle of tensors)" in result.out
    assert "layers" in result.err
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.safetensors")]) == 0
    assert "format: safetensors" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.bin"),
                 "--format", "safetensors"]) == 0
    assert (tmp_path / "back.bin").read_bytes()[8:9] == b"{"  # a safetensors header
    assert b"coda_jax.qk_norm" in (tmp_path / "back.safetensors").read_bytes()[:4096]
    assert (tmp_path / "back.pt").read_bytes()[:4] == b"PK\x03\x04"  # torch's archive
    original = read_adapter_file(tmp_path / "coda_adapters.pt")
    for other in ("ad", "back.pt", "back.safetensors", "back.bin"):
        again = read_adapter_file(tmp_path / other)
        assert again.keys() == original.keys()
        for layer, sd in original.items():
            assert again[layer].keys() == sd.keys()
            for key, value in sd.items():
                np.testing.assert_array_equal(again[layer][key], value)
    # Errors are one line on stderr; an existing output is never replaced silently
    # (exit code 3, pointing at --overwrite), and with --overwrite only our own kind.
    capsys.readouterr()
    before = {name: (tmp_path / name).read_bytes() for name in ("back.pt", "back.safetensors")}
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.pt")]) == 3
    assert main(["adapters", str(tmp_path / "coda_adapters.pt"), str(tmp_path / "ad")]) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and line.endswith(
        "use --overwrite to replace it") and "exists" in line for line in err)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "back.pt"),
                 "--overwrite"]) == 0
    assert main(["adapters", str(tmp_path / "back.pt"), str(tmp_path / "ad"),
                 "--overwrite"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging
    capsys.readouterr()
    assert main(["hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: no HuggingFace model directory at")


def test_bounded_conversion_without_bank_flags_warns_and_records_what_it_assumed(
        tmp_path, capsys):

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=61)).save_pretrained(tmp_path / "hf")
    hf = str(tmp_path / "hf")
    assert main(["hf", hf, str(tmp_path / "none"), "--attention", "coda_bounded",
                 "--dtype", "float32"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("warning:")]
    assert len(warning) == 1
    assert ("ASSUMING --window 256, --num-landmarks-exact 64, --num-landmarks-summary 64"
            in warning[0])
    meta = read_model_metadata(tmp_path / "none")
    assert meta["assumed_bank_options"] == BOUNDED_DEFAULTS == dict(
        window=256, num_landmarks_exact=64, num_landmarks_summary=64)
    # Every bank value is in the metadata explicitly, not left to defaults.
    assert {k: meta["attention_spec"][k] for k in BOUNDED_DEFAULTS} == BOUNDED_DEFAULTS
    assert load_model(tmp_path / "none").layers.self_attn.window == 256

    assert main(["hf", hf, str(tmp_path / "some"), "--attention", "coda_bounded",
                 "--window", "8"]) == 0
    err = capsys.readouterr().err
    assert "ASSUMING --num-landmarks-exact 64, --num-landmarks-summary 64" in err
    assert "--window 256" not in err
    meta = read_model_metadata(tmp_path / "some")
    assert meta["assumed_bank_options"] == {"num_landmarks_exact": 64,
                                            "num_landmarks_summary": 64}
    assert {k: meta["attention_spec"][k] for k in BOUNDED_DEFAULTS} == {
        "window": 8, "num_landmarks_exact": 64, "num_landmarks_summary": 64}
    # Replacing our own model checkpoint is allowed, atomically; no bank flags for coda.
    assert main(["hf", hf, str(tmp_path / "some"), "--attention", "coda", "--overwrite"]) == 0
    assert "warning:" not in capsys.readouterr().err
    meta = read_model_metadata(tmp_path / "some")
    assert meta["attention"] == "coda" and "assumed_bank_options" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "none", "some"]


def test_help_shows_every_default_and_the_exit_codes(capsys):
    import argparse

    from convert.__main__ import EXIT_CODES, HelpFormatter, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(commands.choices) == ["adapters", "export", "gguf", "hf", "pack", "unpack"]
    for name, sub in commands.choices.items():
        formatter = HelpFormatter(prog=name)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            assert text, (name, action.dest)
            if action.option_strings:
                assert "(default:" in text, (name, action.option_strings, text)
            else:
                assert "(required)" in text, (name, action.dest, text)
        assert EXIT_CODES in sub.format_help()
    assert EXIT_CODES in parser.format_help()
    import convert.__main__ as cli

    assert "exit codes:" in cli.__doc__ and "3  refused" in cli.__doc__
    for argv in (["export", "only-one-path"], ["hf", "a", "b", "--no-such-flag"], ["nothing"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 1, argv  # usage errors: 1; 2 means "not found"
