"""The quick retention check of the default model's recipe: teacher-forced exact
match of the questions of held-out retention documents.

``train.default_model`` runs it on the finished model (bounded, window only and
unbounded) over a few held-out documents of its task and writes
``retention_quick.json``. Each document is followed by one question at a time,
in the task's :class:`Quiz` (``RETENTION_QUIZ``: ``train.retention``'s
documents and query prompt ``PROMPT``; ``CHAT_QUIZ``: ``train.retention_chat``'s
ingest strings, each question in its chat turn), and the answer; a question
counts as answered when the argmax is right at every answer token (what greedy
decoding would then produce). The full study, greedy answers from saved states
through the database, is ``python -m train.evaluation retention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from ..retention import PROMPT
from ..retention_chat import QUESTION_PREFIX, QUESTION_SUFFIX
from ..steps import unbounded_twin
from .greedy import greedy_tokens, rows_per_forward


@dataclass(frozen=True)
class Quiz:
    """How a document of a task is asked: the key of its text (read first), the
    prompt around each question (a ``{question}`` field) and what the answer's
    text starts with."""

    text_key: str
    prompt: str
    answer_prefix: str


RETENTION_QUIZ = Quiz("text", PROMPT, " ")
CHAT_QUIZ = Quiz("text_prefix", QUESTION_PREFIX + "{question}" + QUESTION_SUFFIX, "")


def retention_accuracy(model, tok: Tokenizer, docs: Sequence[dict[str, Any]], *,
                       bounded: bool, block_size: int = 128, batch_size: int = 8,
                       quiz: Quiz = RETENTION_QUIZ) -> list[dict[str, Any]]:
    """Teacher-forced exact match of every question of ``docs``, asked as ``quiz``
    says (a question is answered when the argmax is right at each answer token),
    one row per document cell (length, facts, depth): ``correct`` of ``total``."""
    runner = model if bounded else unbounded_twin(model)
    rows, seqs = [], []
    for doc in docs:
        ids = tok.encode(doc[quiz.text_key]).ids
        for q in doc["questions"]:
            prompt = tok.encode(quiz.prompt.replace("{question}", q["question"])).ids
            answer = tok.encode(quiz.answer_prefix + q["answer"]).ids
            seqs.append((doc, ids + prompt, answer))
    width = max(len(p) + len(a) for _, p, a in seqs)
    width = -(-width // block_size) * block_size
    cells: dict[tuple, list[int]] = {}
    batch_size = rows_per_forward(batch_size, width, runner.output_dim)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        batch = np.zeros((len(chunk), width), np.int32)
        for row, (_, prompt, answer) in enumerate(chunk):
            batch[row, :len(prompt) + len(answer)] = prompt + answer
        tokens = jnp.asarray(batch)
        if bounded:
            logits, _ = runner.prefill(tokens, runner.init_state(len(chunk), mem_init="zeros"),
                                       block_size=block_size)
        else:
            logits, _ = runner(tokens)
        guess = greedy_tokens(logits)
        for row, (doc, prompt, answer) in enumerate(chunk):
            at = len(prompt) - 1
            hit = guess[row, at:at + len(answer)].tolist() == answer
            key = (doc["length"], doc["facts"], doc["depth"])
            cells.setdefault(key, [0, 0])
            cells[key][0] += int(hit)
            cells[key][1] += 1
    for (length, facts, depth), (correct, total) in sorted(cells.items()):
        rows.append({"length": length, "facts": facts, "depth": depth, "bounded": bounded,
                     "correct": correct, "total": total, "accuracy": correct / total})
    return rows
