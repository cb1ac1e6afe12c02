"""Asking an instruct model in the chat format it was trained with.

A model checkpoint converted from a GGUF file (``python -m convert gguf``)
carries its ``tokenizer.json`` and, in its metadata, its chat template and
special tokens. :func:`load_chat_model` opens all three; :func:`chat` renders
the conversation with the template (in Jinja2's sandbox,
:mod:`coda_jax.chat_template`), reads it into a fresh cache (a K/V cache
sized to the prompt and the answer for the unbounded kinds, the fixed-size
state for a bounded model) and generates the assistant's reply until the
model's end-of-turn token.

    python -m coda_jax.chat MODEL_DIR "What is the capital of France?"
    python -m coda_jax.chat MODEL_DIR --document notes.txt "Who signed the lease?"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from .chat_template import render_chat
from .decoder import CausalLM
from .generation import generate
from .model_io import load_model, read_model_metadata

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class ChatModel:
    """A model with the tokenizer and chat template it was trained with."""

    model: CausalLM
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str
    special_tokens: dict[str, str | None]  # bos_token, eos_token, ... (the template's variables)
    stop_tokens: tuple[int, ...]


def load_chat_model(path: str | Path) -> ChatModel:
    """A saved model directory with its ``tokenizer.json`` and chat template.

    ``FileNotFoundError`` when the tokenizer is missing; ``ValueError`` when the
    checkpoint records no chat template (convert it from a GGUF file, or pass
    a template to :func:`chat` with a model you load yourself).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    meta = read_model_metadata(path)
    template = meta.get("chat_template")
    if not template:
        raise ValueError(f"the model at {path} records no chat template")
    if not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    recorded = meta.get("tokenizer") or {}
    special = {k: recorded.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    stops = tuple(i for i in {tokenizer.token_to_id(t) for t in (special["eos_token"],) if t}
                  if i is not None)
    return ChatModel(load_model(path), tokenizer, template, special, stops)


def chat_prompt(chat_model: ChatModel, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` in the model's chat format, ending with the
    header of the assistant's turn."""
    text = render_chat(chat_model.chat_template, messages, add_generation_prompt=True,
                       **{k: v for k, v in chat_model.special_tokens.items() if v})
    # The template writes the special tokens itself: no post-processor tokens added.
    return chat_model.tokenizer.encode(text, add_special_tokens=False).ids


def chat(chat_model: ChatModel, messages: list[dict[str, str]], *,
         max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
         top_p: float = 1.0, seed: int = 0) -> str:
    """The assistant's reply to ``messages`` (dicts with ``role`` and
    ``content``); greedy unless ``temperature > 0``."""
    model = chat_model.model
    prompt = chat_prompt(chat_model, messages)
    dtype = jnp.dtype(model.embed_tokens.embedding[...].dtype)
    if model.attention == "coda_bounded":
        state = model.init_state(1, dtype, key=jax.random.key(seed))
    else:
        state = model.init_state(1, dtype, max_length=len(prompt) + max_new_tokens)
    logits, state = model.prefill(jnp.asarray([prompt], jnp.int32), state, last_only=True)
    tokens, counts, _ = generate(model, state, logits, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 key=jax.random.key(seed), stop_tokens=chat_model.stop_tokens)
    reply = [int(t) for t in tokens[0, :int(counts[0])] if int(t) not in chat_model.stop_tokens]
    return chat_model.tokenizer.decode(reply).strip()


def ask(chat_model: ChatModel, question: str, *, document: str | None = None,
        **options: Any) -> str:
    """The reply to one question, about ``document`` if given (the document,
    then the question, in one user turn)."""
    content = question if document is None else f"{document.strip()}\n\n{question}"
    return chat(chat_model, [{"role": "user", "content": content}], **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coda_jax.chat", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("model", metavar="MODEL_DIR", help="a converted model with its "
                                                           "tokenizer and chat template")
    parser.add_argument("question", help="the question")
    parser.add_argument("--document", type=Path, help="a text file the question is about")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args(argv)
    try:
        document = args.document.read_text() if args.document else None
        chat_model = load_chat_model(args.model)
        print(ask(chat_model, args.question, document=document,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2 if isinstance(err, FileNotFoundError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
