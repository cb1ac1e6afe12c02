"""The tokenizer a GGUF file describes, as a ``tokenizers.Tokenizer`` (what a
``tokenizer.json`` holds), and the settings a checkpoint records beside it.

A GGUF file carries no ``tokenizer.json``. llama.cpp writes the vocabulary,
the merges, each token's type and the special-token ids as metadata under
``tokenizer.ggml.*``, and picks the pre-tokenizer (how text is cut into words
before BPE) by the name in ``tokenizer.ggml.pre``. This module rebuilds, with
the ``tokenizers`` API, the tokenizer llama.cpp runs for such a file:

* ``tokenizer.ggml.model == "gpt2"`` (SmolLM2, Llama 3, Qwen2/3, ...):
  byte-level BPE over the file's vocabulary and merges, split first by the
  regexes llama.cpp uses for that pre-type (``PRE_TOKENIZERS``);
* ``"llama"`` (sentencepiece vocabularies: Llama 2, Mistral, ...): BPE with
  byte fallback whose merges are recovered from the token scores, spaces
  written as ``▁`` and a space put before each stretch of text;
* anything else is refused with a ValueError naming the model type.

Control tokens (type 3) and the unknown token (type 2) become special added
tokens, user-defined ones (type 4) plain added tokens: both are matched whole
in the text before BPE, as llama.cpp does (for control tokens: when it parses
special tokens, as a chat prompt needs). The vocabulary size is the file's.

Where transformers' own GGUF loader (``integrations/gguf``) does something else
this follows llama.cpp -- the program these files are written for -- and the
place says so: SmolLM-type digit splitting, llama.cpp's "default" pre-type,
Llama 3's ``ignore_merges``, control tokens outside the byte alphabet, and
sentencepiece's space prefix.

``convert.chat_template.render_chat`` renders the file's chat template
(``tokenizer_config_from_gguf(...)["chat_template"]``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, \
    pre_tokenizers, processors

__all__ = ["PRE_TOKENIZERS", "PreTokenizer", "tokenizer_config_from_gguf", "tokenizer_from_gguf"]

# llama.cpp's token types (``tokenizer.ggml.token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

if TYPE_CHECKING:
    from gguf import GGUFReader

# A GGUFReader, or the path of a GGUF file.
ReaderOrPath = Union[str, "os.PathLike[str]", "GGUFReader"]


# --- pre-tokenizers --------------------------------------------------------------------
#
# llama.cpp splits text with a list of regexes applied in turn: each cuts every
# piece the previous ones left into its matches and the stretches between them,
# all kept. That is exactly a sequence of ``Split(..., behavior="isolated")``.
# Contractions are spelled the way llama.cpp rewrites them, ``'[sS]`` for the
# original ``(?i:'s)``: Oniguruma's case folding would also take ``'ſ`` (long s)
# as a contraction, which llama.cpp's spelling does not.

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# GPT-2's regex. llama.cpp's copy lacks the last ``|\s+``; that alternative only
# ever matches a stretch no other alternative takes, which a split keeps anyway.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken and GPT-4o: the regexes of the original tokenizer.json files. llama.cpp
# runs a rewrite whose upper/lower case classes are ASCII-based (``[^a-z]``
# among letters), which can cut words of other scripts differently.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp treats one family of ``tokenizer.ggml.pre`` names.

    ``splits``: the regexes, applied in turn; ``ignore_merges``: a word that is
    itself a token is taken whole, before any merge; ``add_bos``: llama.cpp's
    default for ``tokenizer.ggml.add_bos_token`` when the file has no such key.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2_SPLIT = PreTokenizer((_GPT2,))
# SmolLM's tokenizer.json runs Digits(individual_digits=True) before GPT-2's
# byte-level regex, and llama.cpp puts ``\p{N}`` first for these names. No token
# of SmolLM2's vocabulary with a digit in it has a second character, so cutting
# ``" 1954"`` into ``" ", "1", "9", "5", "4"`` instead of one piece changes no id
# there. What does change ids is a run of two or more whitespace characters
# before a digit: GPT-2's regex leaves the last space to the number
# (``"a  1"`` -> ``"a", " ", " 1"`` -> a, Ġ, Ġ, 1) where the digit split keeps
# the run whole (``"a", "  ", "1"`` -> a, ĠĠ, 1), as SmolLM2 was trained. We
# follow llama.cpp and the original; transformers' GGUF loader (no digit split
# for "smollm") gives the former.
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_SPLIT = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
# Qwen2's tokenizer.json also NFC-normalizes text first; llama.cpp does not, nor
# do we (nor transformers' GGUF loader): text already in NFC is unaffected.
_QWEN2_SPLIT = PreTokenizer((_QWEN2,))
# llama.cpp's "default" (also its choice for a file with no tokenizer.ggml.pre):
# punctuation runs, GPT-2's regex, digit runs, then digits in threes. transformers
# uses plain GPT-2 there instead.
_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt",
                     "olmo", "jais", "trillion", "granite-docling"), _GPT2_SPLIT),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b", "mellum2"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"), _LLAMA3_SPLIT),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"), _QWEN2_SPLIT),
    "qwen35": PreTokenizer((_QWEN35,)),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
                    PreTokenizer((_GPT4O,))),
}
"""``tokenizer.ggml.pre`` -> how llama.cpp (``llama-vocab.cpp``) pre-tokenizes. ("gpt2"
is accepted as a spelling of llama.cpp's "gpt-2".)"""


# --- the GGUF metadata -----------------------------------------------------------------

def _gguf_types():
    from gguf import GGUFValueType as T

    ints = {T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64}
    return T, ints, {T.FLOAT32, T.FLOAT64}


def _open(reader_or_path: ReaderOrPath):
    if isinstance(reader_or_path, (str, os.PathLike)):
        from gguf import GGUFReader

        return GGUFReader(os.fspath(reader_or_path), "r")
    if not hasattr(reader_or_path, "fields"):
        raise TypeError(f"expected a gguf.GGUFReader or the path of a GGUF file, got "
                        f"{type(reader_or_path).__name__}")
    return reader_or_path


_KINDS = {"str": "a string", "bool": "a boolean", "int": "an integer",
          "str[]": "an array of strings", "int[]": "an array of integers",
          "float[]": "an array of numbers"}


def _read(reader, key: str, kind: str, *, required: bool = False) -> Any:
    """The value of metadata ``key`` checked to be of ``kind``, or None if absent."""
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF tokenizer metadata {key} is missing")
        return None
    T, ints, floats = _gguf_types()
    types = list(field.types)
    head, item = (types[0] if types else None), (types[1] if len(types) > 1 else None)
    ok = {
        "str": types == [T.STRING],
        "bool": types == [T.BOOL],
        "int": len(types) == 1 and head in ints,
        "str[]": head == T.ARRAY and item in (None, T.STRING) and len(types) <= 2,
        "int[]": head == T.ARRAY and item in (None, *ints) and len(types) <= 2,
        "float[]": head == T.ARRAY and item in (None, *ints, *floats) and len(types) <= 2,
    }[kind]
    if not ok:
        stored = "[" + ", ".join(t.name for t in types) + "]"
        raise ValueError(f"GGUF tokenizer metadata {key} should be {_KINDS[kind]}, "
                         f"but the file stores {stored}")
    try:
        value = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise ValueError(f"GGUF tokenizer metadata {key} cannot be read: {e}") from e
    if kind.endswith("[]") and value is None:
        value = []
    return value


@dataclass(frozen=True)
class _Metadata:
    model: str
    tokens: list[str]                    # as the file spells them
    spelled: list[str]                   # as the BPE model sees them
    types: list[int]
    pre: PreTokenizer | None             # byte-level BPE only
    special_ids: dict[str, int | None]   # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool


_SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                 "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}
_MODELS = ("gpt2", "llama")


def _metadata(reader) -> _Metadata:
    """What both public functions need, checked; llama.cpp's defaults filled in."""
    model = _read(reader, "tokenizer.ggml.model", "str", required=True)
    if model not in _MODELS:
        raise ValueError(f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported: "
                         f"only {', '.join(map(repr, _MODELS))} are")
    tokens = _read(reader, "tokenizer.ggml.tokens", "str[]", required=True)
    if not tokens:
        raise ValueError("GGUF tokenizer metadata tokenizer.ggml.tokens is empty")
    # llama.cpp names an empty token after its id rather than keep "" in the vocabulary.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = _read(reader, "tokenizer.ggml.token_type", "int[]")
    if types is None:
        types = [NORMAL] * len(tokens)
    elif len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer metadata tokenizer.ggml.token_type has {len(types)} "
                         f"entries for {len(tokens)} tokens")
    pre = _pre_tokenizer(reader) if model == "gpt2" else None
    # llama.cpp's defaults before the file's own keys: sentencepiece vocabularies
    # are <unk>=0, <s>=1, </s>=2 and add BOS; byte-level BPE ones have no default
    # ids we take (llama.cpp's 11 is GPT-NeoX's) and add BOS for Llama-3-like
    # pre-types only.
    special_ids: dict[str, int | None] = (
        {"bos": 1, "eos": 2, "unk": 0, "pad": None} if model == "llama"
        else dict.fromkeys(_SPECIAL_KEYS))
    for name, key in _SPECIAL_KEYS.items():
        value = _read(reader, key, "int")
        if value is not None:
            if not 0 <= value < len(tokens):
                raise ValueError(f"GGUF tokenizer metadata {key} = {value} is outside the "
                                 f"vocabulary of {len(tokens)} tokens")
            special_ids[name] = int(value)
        elif special_ids[name] is not None and special_ids[name] >= len(tokens):
            special_ids[name] = None
    add_bos = _read(reader, "tokenizer.ggml.add_bos_token", "bool")
    add_eos = _read(reader, "tokenizer.ggml.add_eos_token", "bool")
    add_bos = (model == "llama" or pre.add_bos) if add_bos is None else bool(add_bos)
    add_eos = False if add_eos is None else bool(add_eos)
    for flag, name, key in ((add_bos, "bos", "tokenizer.ggml.add_bos_token"),
                            (add_eos, "eos", "tokenizer.ggml.add_eos_token")):
        if flag and special_ids[name] is None:
            raise ValueError(f"GGUF tokenizer metadata {key} is true, but "
                             f"{_SPECIAL_KEYS[name]} is not set")
    types = [int(t) for t in types]
    spelled = _byte_level_spelling(tokens, types) if model == "gpt2" else list(tokens)
    return _Metadata(model, tokens, spelled, types, pre, special_ids, add_bos, add_eos)


def _pre_tokenizer(reader) -> PreTokenizer:
    name = _read(reader, "tokenizer.ggml.pre", "str")
    if name is None:
        warnings.warn("this GGUF file has no tokenizer.ggml.pre; using llama.cpp's 'default' "
                      "pre-tokenizer, which may not split text the way the model was trained",
                      stacklevel=4)
        return _DEFAULT
    if name not in PRE_TOKENIZERS:
        warnings.warn(f"unknown GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre); splitting "
                      f"text with GPT-2's regex instead", stacklevel=4)
        return _GPT2_SPLIT
    return PRE_TOKENIZERS[name]


# --- building the tokenizer ------------------------------------------------------------

def _byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of the 256 bytes as printable characters: bytes that
    print as themselves keep their character, the others take 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


_BYTE_SPELLING = _byte_alphabet()
_BYTE_CHARS = frozenset(_BYTE_SPELLING.values())


def _vocabulary(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            raise ValueError(f"GGUF tokenizer metadata tokenizer.ggml.tokens holds {token!r} "
                             f"twice (ids {vocab[token]} and {i})")
    return vocab


def _byte_level_spelling(tokens: Sequence[str], types: Sequence[int]) -> list[str]:
    """The tokens as the BPE model sees them.

    A byte-level vocabulary spells every token in GPT-2's byte alphabet. A normal
    token with another character in it is respelled byte by byte (UTF-8), as
    transformers does. Control, unknown and user-defined tokens keep their text:
    llama.cpp matches them in the raw text, never through BPE (DeepSeek's
    ``<｜begin▁of▁sentence｜>`` is one such; transformers respells it and then does
    not add it as a special token, so it cannot be typed).
    """
    return [token if ttype in (UNKNOWN, CONTROL, USER_DEFINED) or set(token) <= _BYTE_CHARS
            else "".join(_BYTE_SPELLING[b] for b in token.encode("utf-8"))
            for token, ttype in zip(tokens, types)]


def _merges(reader, vocab: dict[str, int]) -> list[tuple[str, str]]:
    key = "tokenizer.ggml.merges"
    merges = []
    for rank, merge in enumerate(_read(reader, key, "str[]", required=True)):
        cut = merge.find(" ", 1)   # where llama.cpp cuts it
        left, right = (merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, "")
        if cut <= 0 or not right:
            raise ValueError(f"GGUF tokenizer metadata {key}[{rank}] = {merge!r} is not two "
                             f"tokens separated by a space")
        for part in (left, right, left + right):
            if part not in vocab:
                raise ValueError(f"GGUF tokenizer metadata {key}[{rank}] = {merge!r}: "
                                 f"{part!r} is not in the vocabulary")
        merges.append((left, right))
    return merges


def _byte_level_bpe(reader, meta: _Metadata) -> Tokenizer:
    pre = meta.pre
    vocab = _vocabulary(meta.spelled)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(reader, vocab), dropout=None,
                                     unk_token=None, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # tokenizer.ggml.add_space_prefix is not read: llama.cpp's BPE never adds one.
    return tokenizer


def _recovered_merges(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float],
                      vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges equivalent to llama.cpp's sentencepiece tokenizer.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is a token
    with the highest score. As BPE merges: every way of cutting a token into two
    tokens, ranked by the whole token's score (ties: lower id first; llama.cpp
    breaks them by position instead, which only matters for equal scores).
    Control, unknown, user-defined and byte tokens are never made by joining.
    """
    never = (UNKNOWN, CONTROL, USER_DEFINED, BYTE)   # matched whole, or byte fallback
    mergeable = {token for token, t in zip(tokens, types) if t not in never}
    ranked = []
    for i, token in enumerate(tokens):
        if types[i] in never or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[i]), i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(reader, meta: _Metadata) -> Tokenizer:
    scores = _read(reader, "tokenizer.ggml.scores", "float[]", required=True)
    if len(scores) != len(meta.tokens):
        raise ValueError(f"GGUF tokenizer metadata tokenizer.ggml.scores has {len(scores)} "
                         f"entries for {len(meta.tokens)} tokens")
    vocab = _vocabulary(meta.tokens)
    unk = meta.special_ids["unk"]
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab, merges=_recovered_merges(meta.tokens, meta.types, scores, vocab),
        dropout=None, unk_token=None if unk is None else meta.tokens[unk], fuse_unk=True,
        byte_fallback=True))
    add_space_prefix = _read(reader, "tokenizer.ggml.add_space_prefix", "bool")
    add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
    # llama.cpp puts a space before every stretch of text that starts the input or
    # follows an added token, then writes spaces as ▁, and runs BPE on the whole
    # stretch. A normalizer runs once per such stretch, so Prepend + Replace do
    # exactly that. (transformers' Metaspace(prepend_scheme="first") prefixes only
    # the start of the input, and none when the text already starts with a space:
    # " hi" is ▁▁hi in llama.cpp and sentencepiece, ▁hi there.)
    replace = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend("▁"), replace])
                            if add_space_prefix else replace)
    tokenizer.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        steps + ([decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []))
    return tokenizer


def _post_processor(meta: _Metadata, byte_level: bool):
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    ends = {name: meta.special_ids[name] for name, add in (("bos", meta.add_bos),
                                                           ("eos", meta.add_eos)) if add}
    if ends:
        # Pieces are named "bos"/"eos" and mapped to the tokens, so that a token
        # with a space or a colon in it cannot upset the template syntax.
        single = [*(["bos"] if "bos" in ends else []), "$A", *(["eos"] if "eos" in ends else [])]
        pair = single + [piece + ":1" if piece in ends else "$B:1" for piece in single]
        steps.append(processors.TemplateProcessing(
            single=single, pair=pair,
            special_tokens=[{"id": name, "ids": [i], "tokens": [meta.spelled[i]]}
                            for name, i in ends.items()]))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def tokenizer_from_gguf(reader_or_path: ReaderOrPath) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes, as llama.cpp runs it.

    ``reader_or_path``: a ``gguf.GGUFReader`` or the file's path. The result's
    ``encode(text).ids`` are the ids llama.cpp gives ``text`` with special-token
    parsing on; ``save(path)`` writes a ``tokenizer.json``. BOS (EOS) is added
    when the file's ``tokenizer.ggml.add_bos_token`` (``add_eos_token``) says so,
    or by llama.cpp's default where it says nothing.

    Raises ValueError, naming the key, for a tokenizer model other than "gpt2"
    or "llama" and for missing or malformed tokenizer metadata; warns for an
    unknown ``tokenizer.ggml.pre`` (split with GPT-2's regex instead).
    """
    reader = _open(reader_or_path)
    meta = _metadata(reader)
    byte_level = meta.model == "gpt2"
    tokenizer = (_byte_level_bpe if byte_level else _sentencepiece_bpe)(reader, meta)
    spelled = meta.spelled
    # Added tokens are matched in the raw text (normalized=False), longest first.
    special = [AddedToken(spelled[i], special=True, normalized=False)
               for i, t in enumerate(meta.types) if t in (UNKNOWN, CONTROL)]
    user = [AddedToken(spelled[i], special=False, normalized=False)
            for i, t in enumerate(meta.types) if t == USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    post = _post_processor(meta, byte_level)
    if post is not None:
        tokenizer.post_processor = post
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != len(meta.tokens):   # the vocabulary check above should make this impossible
        raise AssertionError(f"built a vocabulary of {size} tokens for a file of "
                             f"{len(meta.tokens)}")
    return tokenizer


def tokenizer_config_from_gguf(reader_or_path: ReaderOrPath) -> dict[str, Any]:
    """What a checkpoint records beside its ``tokenizer.json`` (tokenizer_config.json).

    Keys: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` (the token
    strings, or None) with ``bos_token_id`` ... ``unk_token_id``; ``add_bos_token``
    and ``add_eos_token`` (the file's flags, else llama.cpp's defaults);
    ``chat_template`` (``tokenizer.chat_template``, or None; named templates,
    ``tokenizer.chat_template.<name>``, are not read); and ``tokenizer_class``
    ("PreTrainedTokenizerFast"), so that transformers loads the pair as it is.
    """
    reader = _open(reader_or_path)
    meta = _metadata(reader)
    config: dict[str, Any] = {}
    for name in ("bos", "eos", "pad", "unk"):
        token_id = meta.special_ids[name]
        config[f"{name}_token"] = None if token_id is None else meta.spelled[token_id]
        config[f"{name}_token_id"] = token_id
    config["add_bos_token"] = meta.add_bos
    config["add_eos_token"] = meta.add_eos
    config["chat_template"] = _read(reader, "tokenizer.chat_template", "str")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config
