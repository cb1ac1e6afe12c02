"""Training data: a byte-level BPE tokenizer, token shards, and packed batches.

The pieces, in the order a corpus goes through them:

* :func:`train_tokenizer` trains a byte-level BPE tokenizer offline with the
  ``tokenizers`` package (every byte is in its alphabet, so any text encodes
  and decodes back exactly). With ``split_digits`` each token holds at most
  one digit, so numbers and codes are copied digit by digit. Its special
  tokens are ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1).
* :func:`encode_documents` turns documents into one id array with an
  end-of-text id after every document; :func:`write_shards` stores it as
  ``.npy`` shards plus ``shards.json``; :func:`read_tokens` reads those back
  memory-mapped (or a single ``.npy``, or a ``.txt``/``.jsonl`` file through a
  tokenizer).
* :class:`PackedBatches` cuts the array into non-overlapping sequences and
  serves them in an order fixed by a seed: epoch ``e`` is a permutation drawn
  from ``(seed, e)``, and the number of sequences consumed so far (the
  *position*) is all a resumed run needs to continue exactly where it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from coda_jax import safe_paths

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
TOKENIZER_FILE = "tokenizer.json"
SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "coda_jax.token_shards"

# GPT-2's pre-tokenisation (contractions, words with their leading space,
# punctuation runs, whitespace) with digits taken one at a time, or in runs
# when digits are not split.
_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}%s| ?[^\s\p{L}\p{N}]+"
            r"|\s+(?!\S)|\s+")
# End-of-text tokens of common HF tokenizers, for encode_documents' default.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_ENCODE_CHUNK = 256  # documents per encode_batch call


# ---------------------------------------------------------------- tokenizer


def _tokenizer_file(out_path: Path) -> Path:
    """``out_path`` itself, or ``out_path/tokenizer.json`` when it is a directory."""
    return out_path / TOKENIZER_FILE if out_path.is_dir() else out_path


def _is_tokenizer_file(path: Path) -> bool:
    try:
        Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 (tokenizers raises plain Exceptions for bad files)
        return False
    return True


def save_tokenizer(tok: Tokenizer, out_path: str | os.PathLike) -> Path:
    """Write ``tok`` as JSON at ``out_path`` (``out_path/tokenizer.json`` when it is
    an existing directory; missing parent directories are made), atomically:
    written beside it, then renamed over it. An existing file is replaced only
    if it is a tokenizer file (``ValueError`` otherwise). Returns the path."""
    path = _tokenizer_file(Path(out_path)).absolute()
    if (path.exists() or path.is_symlink()) and (
            path.is_symlink() or not path.is_file() or not _is_tokenizer_file(path)):
        raise ValueError(f"refusing to overwrite {path}: it is "
                         f"{safe_paths.describe_path(path)}, not a tokenizer.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = safe_paths.staging_path(path)
    try:
        staged.write_text(tok.to_str(pretty=True), encoding="utf-8")
        os.replace(staged, path)
    finally:
        if staged.exists():
            staged.unlink()
    return path


def new_tokenizer(*, split_digits: bool = True) -> Tokenizer:
    """An untrained byte-level BPE tokenizer with our pre-tokenisation and decoder."""
    tok = Tokenizer(models.BPE())
    pattern = _PATTERN % ("" if split_digits else "+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *,
                    split_digits: bool = True, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` ids on ``texts`` and save it.

    ``<|endoftext|>`` is id 0 and ``<|pad|>`` id 1; the 256 byte tokens follow,
    then the learned merges. With ``split_digits`` no token holds more than one
    digit. The vocabulary can come out smaller than ``vocab_size`` when the
    texts do not support that many merges. Saved atomically at ``out_path``
    (see :func:`save_tokenizer`); returns the tokenizer.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an integer >= {minimum} (the special tokens "
                         f"and the 256 bytes), got {vocab_size!r}")
    target = _tokenizer_file(Path(out_path))
    if target.exists() and not _is_tokenizer_file(target):  # refuse before training
        raise ValueError(f"refusing to overwrite {target.absolute()}: it is "
                         f"{safe_paths.describe_path(target)}, not a tokenizer.json")
    seen = {"any": False}

    def nonempty() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            if text:
                seen["any"] = True
                yield text

    tok = new_tokenizer(split_digits=split_digits)
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(nonempty(), trainer)
    if not seen["any"]:
        raise ValueError("cannot train a tokenizer on no text (all texts were empty)")
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected:  # a guard on the tokenizers package
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, not {expected}")
    save_tokenizer(tok, out_path)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` (ours or any HF one), or from a
    directory holding one. ``FileNotFoundError`` / ``ValueError`` name the path."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 (tokenizers raises plain Exceptions)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable tokenizer.json: {first}") from None


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 (hex) of the tokenizer's JSON: equal fingerprints, identical tokenizers."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def default_eos_id(tok: Tokenizer) -> int:
    """The id of the tokenizer's end-of-text token (``<|endoftext|>`` or a common
    HF equivalent); ``ValueError`` when it has none of them."""
    for token in _EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has no end-of-text token (none of "
                     f"{', '.join(_EOS_CANDIDATES)}); pass eos_id")


def encode_each(tok: Tokenizer, docs: Iterable[str], *,
                eos_id: int | None = None) -> Iterator[np.ndarray]:
    """One uint32 id array per document, each ending with the end-of-text id."""
    eos = default_eos_id(tok) if eos_id is None else int(eos_id)
    if not 0 <= eos < 2 ** 32:
        raise ValueError(f"eos_id must be a non-negative 32-bit id, got {eos_id}")
    chunk: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for encoding in tok.encode_batch(chunk, add_special_tokens=False):
            ids = np.empty(len(encoding.ids) + 1, np.uint32)
            ids[:-1] = encoding.ids
            ids[-1] = eos
            yield ids
        chunk.clear()

    for doc in docs:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be strings, got {type(doc).__name__}")
        chunk.append(doc)
        if len(chunk) >= _ENCODE_CHUNK:
            yield from flush()
    if chunk:
        yield from flush()


def encode_documents(tok: Tokenizer, docs: Iterable[str], *,
                     eos_id: int | None = None) -> np.ndarray:
    """The documents' ids concatenated (uint32), an end-of-text id after each.

    ``eos_id`` defaults to the tokenizer's ``<|endoftext|>`` (or a common HF
    equivalent, see :func:`default_eos_id`).
    """
    parts = list(encode_each(tok, docs, eos_id=eos_id))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


def check_vocab(tok_or_vocab_size: Tokenizer | int, model_vocab_size: int) -> None:
    """``ValueError`` when the tokenizer can produce ids the model has no embedding
    for (an id >= ``model_vocab_size``). A smaller tokenizer vocabulary fits."""
    if isinstance(model_vocab_size, bool) or not isinstance(model_vocab_size, (int, np.integer)) \
            or model_vocab_size < 1:
        raise ValueError(f"model_vocab_size must be a positive integer, got {model_vocab_size!r}")
    if isinstance(tok_or_vocab_size, Tokenizer):
        vocab = tok_or_vocab_size.get_vocab(with_added_tokens=True)
        needed = max(vocab.values()) + 1 if vocab else 0
        what = f"the tokenizer's ids go up to {needed - 1} ({needed} ids)"
    elif isinstance(tok_or_vocab_size, (int, np.integer)) \
            and not isinstance(tok_or_vocab_size, bool):
        needed = int(tok_or_vocab_size)
        if needed < 1:
            raise ValueError(f"a vocabulary size must be positive, got {needed}")
        what = f"the tokenizer has {needed} ids"
    else:
        raise TypeError("check_vocab takes a tokenizers.Tokenizer or a vocabulary size, got "
                        f"{type(tok_or_vocab_size).__name__}")
    if needed > model_vocab_size:
        raise ValueError(f"{what} but the model's vocabulary has {int(model_vocab_size)}: "
                         "ids past it have no embedding; train the tokenizer with a vocab_size "
                         f"<= {int(model_vocab_size)} or build the model with vocab_size "
                         f">= {needed}")


# ------------------------------------------------------------------- shards


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def write_shards(ids: np.ndarray, out_dir: str | os.PathLike, *, shard_tokens: int = 1 << 24,
                 meta: dict | None = None) -> list[Path]:
    """Store a 1-D id array as ``shard_00000.npy``, ... of at most ``shard_tokens``
    ids each, plus ``shards.json`` (format tag, dtype, counts, ``meta``).

    Ids are stored as uint16 when every one fits, else uint32. ``out_dir`` must
    not exist or be empty (``FileExistsError`` otherwise); it is built beside
    its final place and renamed there, so it is never seen half-written.
    Returns the shard paths, in order.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("refusing to write an empty token array")
    if ids.min() < 0 or int(ids.max()) >= 2 ** 32:
        raise ValueError(f"ids must lie in [0, 2**32), got [{ids.min()}, {ids.max()}]")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, (int, np.integer)) \
            or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if meta is not None:
        json.dumps(meta)  # fail before writing anything if it is not JSON
    out = Path(out_dir).absolute()
    if (out.exists() or out.is_symlink()) and not _is_empty_dir(out):
        raise FileExistsError(f"{out} already exists ({safe_paths.describe_path(out)}); "
                              "write_shards needs a new or empty directory")
    dtype = np.uint16 if int(ids.max()) < 2 ** 16 else np.uint32
    starts = range(0, ids.size, int(shard_tokens))
    names = [f"shard_{i:05d}.npy" for i in range(len(starts))]

    def write(staged: Path) -> None:
        staged.mkdir()
        shards = []
        for name, start in zip(names, starts):
            part = ids[start:start + int(shard_tokens)].astype(dtype)
            np.save(staged / name, part, allow_pickle=False)
            shards.append({"file": name, "num_tokens": int(part.size)})
        record = {"format": SHARDS_FORMAT, "version": 1, "dtype": np.dtype(dtype).name,
                  "num_tokens": int(ids.size), "shards": shards, "meta": meta or {}}
        (staged / SHARDS_FILE).write_text(json.dumps(record, indent=2) + "\n")

    safe_paths.write_atomically(out, write, overwrite=True, is_ours=_is_empty_dir,
                                what="empty directory")
    return [out / name for name in names]


def read_shards_meta(path: str | os.PathLike) -> dict:
    """The ``shards.json`` record of a shard directory (its ``meta`` included)."""
    path = Path(path)
    record_path = path / SHARDS_FILE
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a token shard directory: it has no {SHARDS_FILE} "
                         f"(it is {safe_paths.describe_path(path)})") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{record_path} is unreadable: {err}") from None
    if not isinstance(record, dict) or record.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{record_path} is not a {SHARDS_FORMAT} record")
    return record


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npy file: {err}") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path} holds a {array.dtype} array of shape {array.shape}, "
                         "not a 1-D array of token ids")
    return array


def _read_shard_dir(path: Path) -> np.ndarray:
    record = read_shards_meta(path)
    parts = []
    for shard in record.get("shards", []):
        shard_path = path / shard["file"]
        if not shard_path.is_file():
            raise ValueError(f"the token shard {shard_path} listed in {path / SHARDS_FILE} "
                             "is missing")
        part = _load_npy(shard_path)
        if part.size != shard["num_tokens"]:
            raise ValueError(f"the token shard {shard_path} holds {part.size} ids, "
                             f"{path / SHARDS_FILE} says {shard['num_tokens']}: it is damaged")
        parts.append(part)
    if not parts or sum(p.size for p in parts) == 0:
        raise ValueError(f"the token shard directory {path} holds no tokens")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not JSON: {err}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
                    f"{path}:{number} is not a JSON object with a \"text\" string")
            yield record["text"]


def read_tokens(path: str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike | None = None
                ) -> np.ndarray:
    """The token ids of a corpus, as a 1-D unsigned integer array.

    ``path`` is a shard directory of :func:`write_shards` (memory-mapped; several
    shards are concatenated in memory), a single ``.npy`` (memory-mapped), or a
    text corpus tokenised with ``tokenizer`` (a Tokenizer or a path to one):
    a ``.txt`` file is one document, a ``.jsonl`` file one document per line
    (a JSON object with a ``"text"`` field); each document ends with the
    end-of-text id. ``FileNotFoundError`` for a missing path, ``ValueError``
    for an empty corpus or anything else unreadable, naming the path.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"no token corpus at {path}")
    if path.is_dir():
        return _read_shard_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _load_npy(path)
        if array.size == 0:
            raise ValueError(f"the token file {path} is empty")
        return array
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: expected a shard directory, a .npy, a .txt or a .jsonl file")
    if tokenizer is None:
        raise ValueError(f"{path} is text: reading it needs a tokenizer "
                         "(read_tokens(path, tokenizer=...))")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        docs: Iterable[str] = [text] if text.strip() else []
    else:
        docs = (text for text in _jsonl_texts(path) if text.strip())
    ids = encode_documents(tok, docs)
    if ids.size == 0:
        raise ValueError(f"the text corpus {path} is empty (no non-blank document)")
    return ids


# ------------------------------------------------------------------ batches


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PackedBatches:
    """Fixed-length training sequences cut from one token array, in a deterministic
    order from a seed: each epoch is a permutation (seed, epoch) of the sequence
    starts; the position (sequences consumed so far) fully determines what comes next.

    The array is cut into ``len(tokens) // (seq_len + 1)`` non-overlapping
    sequences of ``seq_len + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``); the
    tail that does not fill one is dropped. Sequence ``k`` of the stream is
    sequence ``permutation(seed, k // n)[k % n]`` of the array, so within an
    epoch every token is used at most once, and a batch may run across an
    epoch boundary.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                 targets: np.ndarray | None = None):
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if targets is not None and np.shape(targets) != tokens.shape:
            raise ValueError(f"the per-token targets ({np.shape(targets)}) do not align with "
                             f"the tokens ({tokens.shape})")
        self.targets = targets
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} "
                             f"of shape {tokens.shape}")
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.tokens = tokens
        self._n = tokens.size // (self.seq_len + 1)
        if self._n == 0:
            raise ValueError(f"the corpus has {tokens.size} tokens, fewer than one sequence "
                             f"of seq_len + 1 = {self.seq_len + 1}")
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def sequences_per_epoch(self) -> int:
        return self._n

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens an epoch covers (the dropped tail excluded)."""
        return self._n * (self.seq_len + 1)

    def epoch_of(self, position: int) -> int:
        """The epoch that the sequence at ``position`` belongs to."""
        return int(position) // self._n

    def permutation(self, epoch: int) -> np.ndarray:
        """The order (sequence indices) of ``epoch``, drawn from (seed, epoch)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch touches at most two epochs in a row
                self._permutations.pop(min(self._permutations))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._permutations[epoch] = rng.permutation(self._n)
        return self._permutations[epoch]

    def batch(self, position: int) -> tuple[np.ndarray, int]:
        """(int32 array ``(batch_size, seq_len + 1)``, the next position) for the
        ``batch_size`` sequences starting at stream ``position``."""
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                or position < 0:
            raise ValueError(f"position must be a non-negative integer, got {position!r}")
        position = int(position)
        out = np.empty((self.batch_size, self.seq_len + 1), np.int32)
        for row, start in enumerate(self._starts(position)):
            sequence = self.tokens[start:start + out.shape[1]]
            if sequence.size and int(sequence.max()) > np.iinfo(np.int32).max:
                raise ValueError(f"token id {int(sequence.max())} does not fit int32")
            out[row] = sequence
        return out, position + self.batch_size

    def target_batch(self, position: int) -> np.ndarray:
        """The per-token targets (float32 ``(batch_size, seq_len + 1)``) of the
        sequences :meth:`batch` gives at ``position``."""
        if self.targets is None:
            raise ValueError("these batches have no per-token targets")
        width = self.seq_len + 1
        return np.stack([np.asarray(self.targets[s:s + width], np.float32)
                         for s in self._starts(int(position))])

    def _starts(self, position: int) -> list[int]:
        width = self.seq_len + 1
        return [int(self.permutation(k // self._n)[k % self._n]) * width
                for k in range(position, position + self.batch_size)]

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches from position 0 on, without end."""
        position = 0
        while True:
            batch, position = self.batch(position)
            yield batch


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "PackedBatches", "check_vocab",
           "default_eos_id", "encode_documents", "encode_each", "load_tokenizer",
           "new_tokenizer", "read_shards_meta", "read_tokens", "save_tokenizer",
           "tokenizer_fingerprint", "train_tokenizer", "write_shards"]
