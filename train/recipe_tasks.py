"""The tasks a default-model recipe trains on (its ``task`` field, read by
``train.default_model``): how a stage's training sequences are made, the quick
check's held-out documents and how they are asked, the query settings the model
card recommends to the database, and what the card says of the task.

``retention`` (``RetentionTask``): ``train.retention``'s facts buried in corpus
filler, asked after the query prompt ``PROMPT``; an answer ends at its line's end.

``retention_chat`` (``ChatTask``): ``train.retention_chat``'s documents and
questions in SmolLM2's chat template; the database reads each document inside
the template's first user turn (``document_prefix`` / ``document_suffix``), asks
each question in a user turn and stops the answer at ``<|im_end|>``.

A stage may mix in plain corpus text (:func:`plain_sequences`): windows of the
corpus's training split as they are, marked nowhere; they hold no loss start, so
``data.plain_text_loss`` weighs them (``train.config``).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

from . import chat_facts, retention, retention_chat
from .evaluation.retention_quick import CHAT_QUIZ, RETENTION_QUIZ, Quiz

Rows = Iterator[tuple[np.ndarray, np.ndarray]]
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}


def plain_sequences(filler: np.ndarray, *, seq_len: int, count: int,
                    rng: np.random.Generator) -> Rows:
    """``count`` windows of ``seq_len + 1`` consecutive tokens of ``filler`` from
    random starts (read round again from its start where it is shorter), each
    with all-zero marks."""
    for _ in range(count):
        ids = retention.filler_window(filler, seq_len + 1, rng, wrap=True)
        yield ids, np.zeros(len(ids), np.uint8)


def stop_token_ids(tok: Tokenizer) -> list[int]:
    """Every token whose text holds a newline: an answer ends at its line's end."""
    return sorted(i for i in range(tok.get_vocab_size()) if "\n" in tok.decode([i]))


class RetentionTask:
    """``train.retention``: facts in corpus filler, asked after ``PROMPT``."""

    name = "retention"
    quiz: Quiz = RETENTION_QUIZ
    quick_keys = frozenset({"lengths", "facts", "depths", "count"})
    tiny_seq_len = 256      # the sequences of a --tiny run

    def sequences(self, tok: Tokenizer, filler: np.ndarray, *, seq_len: int, count: int,
                  max_facts: int, seed: int) -> Rows:
        """``count`` training sequences of ``seq_len + 1`` tokens and their marks."""
        return retention.training_sequences(tok, filler, seq_len=seq_len, count=count,
                                            max_facts=max_facts, seed=seed)

    def eval_documents(self, tok: Tokenizer, heldout: np.ndarray, quick: dict[str, Any],
                       *, seed: int) -> list[dict[str, Any]]:
        """The quick check's held-out documents (``quick``: the recipe's cells)."""
        return list(retention.eval_documents(
            tok, heldout, lengths=quick["lengths"], facts_per_doc=quick["facts"],
            depths=quick["depths"], count=quick["count"], seed=seed))

    def database_settings(self, tok: Tokenizer) -> dict[str, Any]:
        """The recommended query settings the model carries (``coda_db``)."""
        return {"prompt": retention.PROMPT, **GREEDY, "max_new_tokens": 24,
                "stop_tokens": stop_token_ids(tok), "block_size": 128}

    def card(self) -> dict[str, Any]:
        """What the model card says of the task."""
        return {"facts": {k: {"sentence": v[0], "question": v[1]}
                          for k, v in retention.FACTS.items()},
                "prompt": retention.PROMPT}


class ChatTask:
    """``train.retention_chat``: documents and questions in SmolLM2's chat template."""

    name = "retention_chat"
    quiz: Quiz = CHAT_QUIZ
    quick_keys = frozenset({"lengths", "facts", "depths", "count", "passages"})
    tiny_seq_len = 640      # room for the chat framing and turns in a tiny tokenizer

    def sequences(self, tok: Tokenizer, filler: np.ndarray, *, seq_len: int, count: int,
                  max_facts: int, seed: int) -> Rows:
        """``count`` training sequences of ``seq_len + 1`` tokens and their marks."""
        return retention_chat.training_sequences(tok, filler, seq_len=seq_len, count=count,
                                                 max_facts=max_facts, seed=seed)

    def eval_documents(self, tok: Tokenizer, heldout: np.ndarray, quick: dict[str, Any],
                       *, seed: int) -> list[dict[str, Any]]:
        """The quick check's held-out documents (``quick``: the recipe's cells)."""
        return list(retention_chat.eval_documents(
            tok, heldout, lengths=quick["lengths"], facts_per_doc=quick["facts"],
            depths=quick["depths"], passages=quick["passages"], count=quick["count"],
            seed=seed))

    def database_settings(self, tok: Tokenizer) -> dict[str, Any]:
        """The recommended query settings: each document read inside the chat's
        first user turn, each question in a user turn, greedy answers that stop at
        the end of the assistant's turn."""
        stop = tok.token_to_id(retention_chat.LOSS_STOP)
        if stop is None:
            raise ValueError(f"the tokenizer has no {retention_chat.LOSS_STOP} token")
        return {"prompt": CHAT_QUIZ.prompt, "document_prefix": retention_chat.DOCUMENT_PREFIX,
                "document_suffix": retention_chat.DOCUMENT_SUFFIX, **GREEDY,
                "max_new_tokens": 48, "stop_tokens": [stop], "block_size": 128,
                "state_dtype": "bfloat16"}  # half the state of the float32 assembly

    def card(self) -> dict[str, Any]:
        """What the model card says of the task: the chat template it was trained
        in and how its loss was counted."""
        return {"chat_template": retention_chat.CHAT_TEMPLATE,
                "facts_file": f"train/data_files/{chat_facts.FACTS_FILE.name}",
                "loss_start": retention_chat.LOSS_START, "loss_stop": retention_chat.LOSS_STOP}


TASKS: dict[str, RetentionTask | ChatTask] = {t.name: t for t in (RetentionTask(), ChatTask())}
