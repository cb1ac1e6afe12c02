"""Reading a document into a model's fixed-size state, in bounded memory.

The text is read in pieces (``PIECE_CHARS`` characters, cut before a
space so the tokenizer sees whole words), each piece tokenised on its
own, and the tokens prefilled in segments of whole blocks; only the tokens of
an unfinished segment are carried over, and the last one is padded to a whole
segment, so documents of any length share one compiled call (a document
shorter than one block is read in the smallest block that holds it). Host
memory is a few pieces and device memory one segment, whatever the document's
size. The result is exactly the prefill of the whole token sequence in the
same block size.
A ``KeyboardInterrupt`` simply propagates: nothing is written while reading.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from tqdm import tqdm

from coda_jax.segments import long_chunks_per_call
from coda_jax.state import BankState, tree_bytes
from .errors import NotFoundError, RefusedError
from .model_source import OpenModel
from .settings import read_block

PIECE_CHARS = 1 << 18
DOCUMENT_FORMAT = "coda_db_document/1"
INIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DocumentState:
    """A document read into a model: every layer's bank state (batch of one) and
    what produced it (``meta``: model and tokenizer fingerprints, bank config,
    tokens read, source, time)."""

    state: BankState
    meta: dict[str, Any]

    @property
    def tokens(self) -> int:
        """How many tokens of the document the state has read."""
        return int(self.meta["tokens"])

    def describe_state(self) -> dict[str, Any]:
        """Bytes in memory and the fill of each bank (used slots over all layers'
        slots, from 0 to 1): what ``info`` shows."""
        bank = self.meta["model"]["bank"]
        window, exact = bank["window"], bank["num_landmarks_exact"]
        allowed = np.asarray(self.state.allowed)
        parts = {"recent": allowed[..., :window], "exact": allowed[..., window:window + exact],
                 "summary": allowed[..., window + exact:]}
        return {"bytes_in_memory": tree_bytes(self.state),
                "fill": {name: float(part.mean()) if part.size else 0.0
                         for name, part in parts.items()}}


def _pieces(stream: io.TextIOBase, piece_chars: int) -> Iterator[str]:
    """The text in pieces of about ``piece_chars``, each cut just before a space (the
    space starts the next piece, as byte-level tokenizers attach it to the word
    after it), so no word is cut in two; text without spaces is cut every
    ``4 * piece_chars`` characters."""
    carry = ""
    while True:
        block = stream.read(piece_chars)
        if not block:
            break
        if "\x00" in block:
            raise RefusedError("the document holds NUL bytes: it is a binary file, not text")
        text = carry + block
        cut = text.rfind(" ")
        if cut <= 0:
            if len(text) < 4 * piece_chars:
                carry = text
                continue
            cut = len(text)
        yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


def open_text(source: str | os.PathLike) -> tuple[io.TextIOBase, str, int]:
    """(a text stream, the source's name, its size in bytes) for a path."""
    path = Path(source)
    if not path.exists():
        raise NotFoundError(f"no document at {path}")
    if not path.is_file():
        raise RefusedError(f"{path} is not a file")
    return open(path, encoding="utf-8", errors="strict", newline=""), path.name, \
        path.stat().st_size


def read_document(opened: OpenModel, text: str | None = None, *,
                  path: str | os.PathLike | None = None, source: str | None = None,
                  progress: bool = False, piece_chars: int = PIECE_CHARS) -> DocumentState:
    """Read ``text`` (or the UTF-8 file at ``path``) into a fresh state of the model.

    ``RefusedError`` for an empty or whitespace-only document, a binary or
    non-UTF-8 file; ``NotFoundError`` for a missing file.
    """
    if (text is None) == (path is None):
        raise RefusedError("give either the document's text or its path")
    if text is not None:
        if not isinstance(text, str):
            raise RefusedError(f"the document must be text (str), got {type(text).__name__}")
        stream, name, size = io.StringIO(text), source or "text", len(text.encode())
    else:
        stream, name, size = open_text(path)
        name = source or name
    settings = opened.settings
    with stream:
        try:
            # A chat model reads the document inside its turn markers (its settings).
            pieces = itertools.chain([settings.document_prefix], _pieces(stream, piece_chars),
                                     [settings.document_suffix])
            return _read(opened, pieces, name, size, progress)
        except UnicodeDecodeError as err:
            raise RefusedError(f"{name} is not UTF-8 text (byte {err.start} of a block: "
                               f"{err.reason})") from None


def _read(opened: OpenModel, pieces: Iterator[str], name: str, size: int,
          progress: bool) -> DocumentState:
    model, block = opened.model, opened.settings.block_size
    # The engine's long call (segments.long_chunks_per_call): the document streams
    # through in whole long calls; what is left goes in the engine's short ones.
    chunks = long_chunks_per_call(block)
    segment = block * chunks
    state = empty_state(opened)
    pending = np.zeros((0,), np.int32)
    tokens = chars = 0
    started = time.perf_counter()
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {name}",
              disable=not progress, leave=False) as bar:
        for piece, ids in _tokenised(opened, pieces):
            chars += len(piece)
            pending = np.concatenate([pending, ids])
            whole = len(pending) // segment * segment
            if whole:
                _, new_state = model.prefill(pending[None, :whole], state, block_size=block,
                                             last_only=True, chunks_per_call=chunks)
                # One segment in flight at most: the host may not queue the document up.
                jax.block_until_ready(state)
                state = new_state
                tokens += whole
                pending = pending[whole:]
            bar.update(len(piece.encode()))
            bar.set_postfix(tokens=tokens,
                            tok_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
        if tokens + len(pending) == 0:
            raise RefusedError(f"the document {name} is empty (no text to read)")
        if len(pending):
            if tokens == 0 and len(pending) < block:
                # Alone, the document fits one block: read it in the smallest block that
                # holds it.
                size_block, rest_chunks = read_block(block, len(pending)), 1
            else:
                # The rest in the engine's short calls, the last padded (padding changes
                # nothing): one more compiled call, not one per remainder length.
                size_block, rest_chunks = block, None
            _, state = model.prefill(pending[None], state, block_size=size_block,
                                     last_only=True, chunks_per_call=rest_chunks)
            tokens += len(pending)
    jax.block_until_ready(state)
    meta = {"format": DOCUMENT_FORMAT, "source": name, "tokens": tokens, "chars": chars,
            "bytes": size, "created": time.time(), "model": opened.describe(),
            "seconds": time.perf_counter() - started}
    return DocumentState(state=state, meta=meta)


def empty_state(opened: OpenModel, batch_size: int = 1) -> BankState:
    """The state before any token, in the model's ``state_dtype`` setting (else the
    weights' dtype); its random memory initialisation uses the fixed key 0, so a
    document reads the same each time."""
    model = opened.model
    weights = model.embed_tokens.embedding[...]
    dtype = opened.settings.state_dtype or weights.dtype
    state = model.init_state(batch_size, dtype, key=jax.random.key(INIT_SEED))
    devices = weights.devices()
    if len(devices) == 1:
        # Placed where the weights are, as every later state is: a state the compiler
        # sees as unplaced would compile the first segment's call a second time.
        state = jax.device_put(state, next(iter(devices)))
    return state


def _tokenised(opened: OpenModel, pieces: Iterator[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(piece, its ids) pairs; whitespace-only pieces count as text but add no ids;
    special tokens (e.g. BOS) only before the first piece with ids."""
    first = True
    for piece in pieces:
        if not piece.strip():
            yield piece, np.zeros((0,), np.int32)
            continue
        ids = opened.tokenizer.encode(piece, add_special_tokens=first).ids
        first = False
        yield piece, np.asarray(ids, np.int32)
