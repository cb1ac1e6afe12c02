"""Passkey retrieval: a random number buried in held-out filler at a chosen depth,
asked for at the end of the context.

Each sample is ``filler[:a] + NEEDLE + filler[a:b] + QUESTION + ANSWER`` cut to
exactly ``length`` tokens, the needle starting at ``depth`` (0 = the start, 1 =
just before the question) of the filler. The answer is scored teacher-forced:
a sample is retrieved when the model's argmax is right at every answer token
(what greedy decoding would then produce), and digit accuracy is the share of
answer tokens it gets right. Bounded models read the context into their
bounded state block by block, so the needle must survive the banks; the
unbounded run (the model's unbounded twin) sees the whole KV cache. The
``perplexity`` command runs it with ``--passkey-lengths``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from coda_jax import CausalLM

from ..steps import param_dtype, unbounded_twin
from .greedy import greedy_tokens, rows_per_forward

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


def passkey_samples(tok: Tokenizer, filler: np.ndarray, *, length: int, depth: float,
                    count: int, digits: int = 5, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` samples (count, length) int32, the answer mask (count, length)
    bool (True at the positions whose *next* token is an answer token) and the keys."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    rows, masks, keys = [], [], []
    for i in range(count):
        key = "".join(str(d) for d in rng.integers(0, 10, digits))
        key = str(rng.integers(1, 10)) + key[1:]  # no leading zero
        needle = tok.encode(NEEDLE.format(key=key)).ids
        tail = tok.encode(QUESTION).ids
        answer = tok.encode(ANSWER.format(key=key)).ids
        n_filler = length - len(needle) - len(tail) - len(answer)
        if n_filler < 0:
            raise ValueError(f"a context of {length} tokens cannot hold the needle, question "
                             f"and answer ({length - n_filler} tokens)")
        if len(filler) < n_filler:
            raise ValueError(f"the filler ({len(filler)} tokens) is shorter than the "
                             f"{n_filler} tokens a {length}-token sample needs")
        start = int(rng.integers(0, len(filler) - n_filler + 1))
        text = np.asarray(filler[start:start + n_filler], np.int64)
        at = int(round(depth * n_filler))
        ids = np.concatenate([text[:at], needle, text[at:], tail, answer]).astype(np.int32)
        mask = np.zeros(length, bool)
        mask[length - len(answer) - 1:length - 1] = True
        rows.append(ids)
        masks.append(mask)
        keys.append(key)
    return np.stack(rows), np.stack(masks), keys


def score_passkey(model: CausalLM, samples: np.ndarray, masks: np.ndarray, *, bounded: bool,
                  block_size: int = 128, batch_size: int = 8) -> dict[str, float]:
    """Retrieval (all answer tokens right) and digit accuracy, teacher-forced."""
    runner = model if bounded else unbounded_twin(model)
    found, right, total = 0, 0, 0
    batch_size = rows_per_forward(batch_size, samples.shape[1], runner.output_dim)
    for start in range(0, len(samples), batch_size):
        batch = jnp.asarray(samples[start:start + batch_size])
        if bounded:
            state = runner.init_state(batch.shape[0], param_dtype(runner), mem_init="zeros")
            logits, _ = runner.prefill(batch, state, block_size=block_size)
        else:
            logits, _ = runner(batch)
        guess = greedy_tokens(logits)[:, :-1]
        target = np.asarray(batch[:, 1:])
        mask = masks[start:start + batch_size, :-1]
        hit = (guess == target) | ~mask
        found += int(hit.all(axis=1).sum())
        right += int(((guess == target) & mask).sum())
        total += int(mask.sum())
    return {"retrieved": found / len(samples), "digit_accuracy": right / max(total, 1)}


def passkey_table(model: CausalLM, tok: Tokenizer, filler: np.ndarray, *,
                  lengths: Sequence[int], depths: Sequence[float], count: int = 16,
                  block_size: int = 128, modes: Sequence[bool] = (False, True),
                  seed: int = 0, batch_size: int = 8) -> list[dict[str, Any]]:
    """One row per (length, depth, bounded): retrieval and digit accuracy."""
    rows = []
    for length in lengths:
        for depth in depths:
            samples, masks, _ = passkey_samples(tok, filler, length=length, depth=depth,
                                                count=count, seed=seed)
            for bounded in modes:
                rows.append({"length": length, "depth": depth, "bounded": bounded,
                             "samples": count,
                             **score_passkey(model, samples, masks, bounded=bounded,
                                             block_size=block_size, batch_size=batch_size)})
    return rows
