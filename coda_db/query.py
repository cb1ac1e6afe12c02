"""Asking a document state questions: one answer streamed, or many in one batch.

A query reads the prompt (the model's template around the question) into a
copy of the document state and decodes from there; JAX arrays are immutable,
so the loaded state is never changed and every query starts from it.
:meth:`Answerer.stream` decodes one compiled step per token and yields the
text as it grows; :meth:`Answerer.many` answers every (state, question) row in
one compiled decode (:func:`coda_jax.generate`), each row at its own position.
Greedy answers agree between the two, row for row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from coda_jax.generation import generate, sample_logits
from coda_jax.runner import bind_weights
from coda_jax import BankState, LayerSteps, concat_rows, steps_by_layer, widen_buffers
from .model_source import OpenModel
from .settings import Sampling, read_block

MAX_CHUNKS_PER_CALL = 16
# Rows of one batched answer. On an H100, 192 rows or more faulted in the question's
# prefill under the default model's bank (CUDA_ERROR_ILLEGAL_ADDRESS, cause not found
# yet) where 128 ran, prefill and decode (docs/results.md): questions are read 64 rows
# at a time, and up to 128 rows decode in one loop, whose steps each read the weights
# once for all of them.
PROMPT_ROWS_PER_CALL = 64
MAX_ROWS_PER_CALL = 128


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer: its text, its token ids (without the stop token), whether a stop
    token ended it (rather than ``max_new_tokens``)."""

    text: str
    tokens: list[int]
    stopped: bool


def _choose_token(logits, key, temperature, top_p, *, greedy: bool, top_k: int) -> jax.Array:
    """One token per row (B,) int32 from ``logits`` (B, V): greedy, or sampled."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, key, temperature=temperature, top_k=top_k,
                         top_p=top_p).astype(jnp.int32)


def _next_token(model, state, logits, key, temperature, top_p, *, greedy: bool, top_k: int,
                storage_dtype):
    """Sample one token per row from ``logits`` and step every layer on it (a state
    widened from ``storage_dtype``: :func:`~coda_jax.state.widen_buffers`)."""
    token = _choose_token(logits, key, temperature, top_p, greedy=greedy, top_k=top_k)
    new_logits, state = model.decode_step(token[:, None], state, training=False,
                                          storage_dtype=storage_dtype)
    return token, new_logits[:, 0], state


class Answerer:
    """Answers questions from document states of one opened model."""

    def __init__(self, opened: OpenModel):
        self.opened = opened
        self._steps: dict[tuple, object] = {}
        self._choosers: dict[tuple, object] = {}
        self._layer_steps: LayerSteps | None = None

    # ------------------------------------------------------------ prompt
    def prompt_ids(self, question: str) -> np.ndarray:
        """The prompt's token ids (no special tokens: it continues the document)."""
        text = self.opened.settings.prompt_for(question)
        return np.asarray(self.opened.tokenizer.encode(text, add_special_tokens=False).ids,
                          np.int32)

    def read_prompts(self, state: BankState, prompts: Sequence[np.ndarray]
                     ) -> tuple[jax.Array, BankState]:
        """Read each row's prompt after its state -> (last-token logits (B, V), state)."""
        longest = max(len(p) for p in prompts)
        padded = np.zeros((len(prompts), longest), np.int32)
        for row, ids in enumerate(prompts):
            padded[row, :len(ids)] = ids
        block = read_block(self.opened.settings.block_size, longest)
        chunks = min(MAX_CHUNKS_PER_CALL, -(-longest // block))
        logits, state = self.opened.model.prefill(
            padded, state, block_size=block, lengths=np.array([len(p) for p in prompts]),
            last_only=True, chunks_per_call=chunks)
        return logits[:, 0], state

    def _text(self, ids: list[int]) -> str:
        return self.opened.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------ answers
    def stream(self, state: BankState, question: str, sampling: Sampling) -> Iterator[str]:
        """The answer to ``question`` from ``state`` (batch of one), as text pieces
        while it is decoded; the finished :class:`Answer` is the generator's return
        value."""
        model = self.opened.model
        sampling = sampling.checked(model.cfg.vocab_size)
        stops = set(self.opened.settings.stop_tokens)
        logits, st = self.read_prompts(state, [self.prompt_ids(question)])
        next_token = self._token_source(st, logits, sampling)
        key = jax.random.key(sampling.seed)
        ids: list[int] = []
        shown = ""
        stopped = False
        for _ in range(sampling.max_new_tokens):
            key, sub = jax.random.split(key)
            token = next_token(sub)
            if token in stops:
                stopped = True
                break
            ids.append(token)
            text = self._text(ids)
            if not text.endswith("\ufffd") and len(text) > len(shown):  # whole characters
                yield text[len(shown):]
                shown = text
        text = self._text(ids)
        if len(text) > len(shown):
            yield text[len(shown):]
        return Answer(text=text, tokens=ids, stopped=stopped)

    def _token_source(self, state: BankState, logits: jax.Array, sampling: Sampling
                      ) -> Callable[[jax.Array], int]:
        """``next_token(key) -> id``: a token sampled (with ``key``) from the logits
        after ``state`` and the tokens before it. On a CPU the model steps a layer per
        call (:class:`~coda_jax.layer_steps.LayerSteps`: its weights read in place, not
        copied out of the stacked arrays), and only when a next token is asked for."""
        greedy, top_k = sampling.temperature == 0, sampling.top_k
        temperature = jnp.float32(max(sampling.temperature, 1e-6))
        top_p = jnp.float32(sampling.top_p)
        if steps_by_layer():
            if self._layer_steps is None:
                self._layer_steps = LayerSteps(self.opened.model)
            steps, choose = self._layer_steps, self._choose(greedy, top_k)
            # Split copies: stepping them in place leaves ``state`` as it was.
            carry = [logits, steps.start(state), None]   # logits, states, last token

            def next_token(key: jax.Array) -> int:
                logits, states, last = carry
                if last is not None:
                    logits, states = steps(last, states)
                carry[:] = [logits, states, choose(logits, key, temperature, top_p)]
                return int(carry[2][0])

            return next_token
        st, storage_dtype = widen_buffers(state)  # the step writes in place (a CPU)
        # The steps donate the state they step: copied once here, no array of it can
        # be one of ``state``'s (a compiled call may pass an input through as an output).
        carry = [jax.tree.map(jnp.copy, st), logits]
        step = self._step(greedy, top_k, storage_dtype)

        def next_token(key: jax.Array) -> int:
            token, carry[1], carry[0] = step(carry[0], carry[1], key, temperature, top_p)
            return int(token[0])

        return next_token

    def _choose(self, greedy: bool, top_k: int):
        if (greedy, top_k) not in self._choosers:
            self._choosers[greedy, top_k] = jax.jit(
                functools.partial(_choose_token, greedy=greedy, top_k=top_k))
        return self._choosers[greedy, top_k]

    def _step(self, greedy: bool, top_k: int, storage_dtype):
        if (greedy, top_k, storage_dtype) not in self._steps:
            # The stepped state is donated: the loop in stream never reuses it, and
            # a copy of it each token cost a third of a CPU step.
            self._steps[greedy, top_k, storage_dtype] = bind_weights(
                self.opened.model, functools.partial(_next_token, greedy=greedy, top_k=top_k,
                                                     storage_dtype=storage_dtype),
                donate_args=(0,))
        return self._steps[greedy, top_k, storage_dtype]

    def many(self, states: Sequence[BankState], questions: Sequence[str], sampling: Sampling
             ) -> list[Answer]:
        """Row i answers ``questions[i]`` from ``states[i]`` (each a batch of one),
        up to :data:`MAX_ROWS_PER_CALL` rows in one compiled decode (the rows of a
        later call sample from ``jax.random.fold_in`` of the seed's key), their
        questions read :data:`PROMPT_ROWS_PER_CALL` rows at a time."""
        sampling = sampling.checked(self.opened.model.cfg.vocab_size)
        if len(states) != len(questions) or not states:
            raise ValueError(f"one state per question: got {len(states)} state(s) and "
                             f"{len(questions)} question(s)")
        key = jax.random.key(sampling.seed)
        answers = []
        for call, start in enumerate(range(0, len(states), MAX_ROWS_PER_CALL)):
            rows = slice(start, start + MAX_ROWS_PER_CALL)
            answers += self._answer_rows(states[rows], questions[rows], sampling,
                                         key if call == 0 else jax.random.fold_in(key, call))
        return answers

    def _answer_rows(self, states: Sequence[BankState], questions: Sequence[str],
                     sampling: Sampling, key: jax.Array) -> list[Answer]:
        """:meth:`many`'s rows of one compiled decode."""
        model = self.opened.model
        prompts = [self.prompt_ids(q) for q in questions]
        read = [self.read_prompts(concat_rows(*states[start:start + PROMPT_ROWS_PER_CALL]),
                                  prompts[start:start + PROMPT_ROWS_PER_CALL])
                for start in range(0, len(prompts), PROMPT_ROWS_PER_CALL)]
        logits, state = read[0] if len(read) == 1 else (
            jnp.concatenate([part_logits for part_logits, _ in read]),
            concat_rows(*[part_state for _, part_state in read]))
        del read  # the parts' states: the joined one replaces them
        stops = self.opened.settings.stop_tokens
        tokens, counts, _ = generate(
            model, state, logits, max_new_tokens=sampling.max_new_tokens, key=key,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            stop_tokens=stops, return_state=False)
        answers = []
        for row, count in zip(np.asarray(tokens), np.asarray(counts)):
            ids = row[:count].tolist()
            stopped = bool(ids) and ids[-1] in stops
            ids = ids[:-1] if stopped else ids
            answers.append(Answer(text=self._text(ids), tokens=ids, stopped=stopped))
        return answers
