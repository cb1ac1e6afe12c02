"""How a model is asked questions: prompt template, sampling defaults, stop tokens, blocks.

A model checkpoint may carry its own recommendations in its metadata under
the key ``"database"`` (written with ``save_model(..., extra_meta={"database":
{...}})``); every field is optional and falls back to the reference's values:

    {"prompt": "\\n\\nQuestion: {question}\\nAnswer:",   # appended to the document state
     "document_prefix": "", "document_suffix": "",  # read before and after each document
                                  # (a chat model: its turn markers around the document)
     "temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_new_tokens": 256,
     "stop_tokens": [2],          # token ids that end an answer (default: the tokenizer's
                                  # end-of-text token, when it has a known one)
     "block_size": 1024}          # prefill block of documents (the reference's adapters')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


from coda_jax.validation import check_integer, check_number
from .errors import RefusedError

METADATA_KEY = "database"
REFERENCE_PROMPT = "\n\nQuestion: {question}\nAnswer:"
MIN_PROMPT_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling of one answer: ``temperature=0`` is greedy; ``top_k=0`` and
    ``top_p=1`` switch those filters off."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    seed: int = 0

    def checked(self, vocab_size: int) -> "Sampling":
        """This, after checking every value (``RefusedError`` naming the bad one)."""
        check_integer("max_new_tokens", self.max_new_tokens, 1, error=RefusedError)
        check_integer("top_k", self.top_k, 0, vocab_size, error=RefusedError)
        check_integer("seed", self.seed, 0, error=RefusedError)
        temperature = check_number("temperature", self.temperature, error=RefusedError)
        if temperature < 0:
            raise RefusedError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        top_p = check_number("top_p", self.top_p, error=RefusedError)
        if not 0.0 < top_p <= 1.0:
            raise RefusedError(f"top_p must be in (0, 1], got {top_p}")
        return self

    def with_overrides(self, **values: Any) -> "Sampling":
        """A copy with the given fields replaced (``None`` keeps the current value)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


STATE_DTYPES = ("", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuerySettings:
    """A model's prompt template (with a ``{question}`` field), default sampling,
    stop tokens, document prefill block, the text read around each document, and
    the dtype of document states (empty: the weights')."""

    prompt: str = REFERENCE_PROMPT
    sampling: Sampling = Sampling()
    stop_tokens: tuple[int, ...] = ()
    block_size: int = 1024
    document_prefix: str = ""
    document_suffix: str = ""
    # A bank's keys and values in bfloat16 halve a state beside float32 weights (the
    # adapter bundle assembles in float32): 9.6 MB instead of 19.2 for SmolLM2's bank.
    state_dtype: str = ""

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], *, default_stops: tuple[int, ...] = ()
                      ) -> "QuerySettings":
        """The settings a model's metadata recommends (its ``"database"`` entry), else
        the reference's; ``RefusedError`` for an entry that is not well formed."""
        entry = meta.get(METADATA_KEY) or {}
        if not isinstance(entry, Mapping):
            raise RefusedError(f"the model's {METADATA_KEY!r} metadata must be a JSON object, "
                               f"got {type(entry).__name__}")
        known = {"prompt", "temperature", "top_k", "top_p", "max_new_tokens", "stop_tokens",
                 "block_size", "document_prefix", "document_suffix", "state_dtype"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise RefusedError(f"the model's {METADATA_KEY!r} metadata has unknown fields "
                               f"{unknown}; known: {sorted(known)}")
        prompt = entry.get("prompt", REFERENCE_PROMPT)
        if not isinstance(prompt, str) or "{question}" not in prompt:
            raise RefusedError("the model's recommended prompt must be a string with a "
                               f"{{question}} field, got {prompt!r}")
        sampling = Sampling().with_overrides(
            **{k: entry.get(k) for k in ("temperature", "top_k", "top_p", "max_new_tokens")})
        stops = entry.get("stop_tokens", list(default_stops))
        if not isinstance(stops, (list, tuple)):
            raise RefusedError(f"stop_tokens must be a list of token ids, got {stops!r}")
        stops = tuple(check_integer("a stop token", t, 0, error=RefusedError) for t in stops)
        block = check_integer("block_size", entry.get("block_size", 1024), 1, error=RefusedError)
        frame = {k: entry.get(k, "") for k in ("document_prefix", "document_suffix")}
        for key, value in frame.items():
            if not isinstance(value, str):
                raise RefusedError(f"{key} must be a string, got {value!r}")
        state_dtype = entry.get("state_dtype", "")
        if state_dtype not in STATE_DTYPES:
            raise RefusedError(f"state_dtype must be one of {sorted(STATE_DTYPES)} (empty: the "
                               f"weights' dtype), got {state_dtype!r}")
        return cls(prompt=prompt, sampling=sampling, stop_tokens=stops, block_size=block,
                   state_dtype=state_dtype, **frame)

    def prompt_for(self, question: str) -> str:
        """The text read after the document state for ``question``."""
        if not isinstance(question, str) or not question.strip():
            raise RefusedError("the question is empty")
        return self.prompt.replace("{question}", question)


def read_block(block_size: int, longest: int) -> int:
    """The prefill block for inputs of at most ``longest`` tokens: the document
    block, or, when every input fits in one block, the smallest power of two
    (at least 16) that holds the longest. An input inside one block reads the
    same in any block that holds it, so this changes no result; it only sizes
    the compiled call to the real tokens (short questions do not pay for a
    1024-token block, nor 128 rows for 128 of them)."""
    if longest >= block_size:
        return block_size
    return min(block_size, max(MIN_PROMPT_BLOCK, 1 << max(0, math.ceil(math.log2(longest)))))
