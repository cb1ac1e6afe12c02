"""Greedy tokens of long logits without a second copy of them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Positions per argmax: XLA's argmax keeps an index array and a value array as large
# as its input (a row of 32K tokens of SmolLM2's 49K vocabulary asked for 12 GiB).
_POSITIONS_PER_ARGMAX = 1024


def greedy_tokens(logits: jnp.ndarray) -> np.ndarray:
    """The argmax over the vocabulary of (batch, length, vocab) logits, 1,024
    positions of one row at a time, as a (batch, length) numpy array."""
    batch, length = logits.shape[:2]
    out = np.empty((batch, length), np.int32)
    for row in range(batch):
        for start in range(0, length, _POSITIONS_PER_ARGMAX):
            stop = min(start + _POSITIONS_PER_ARGMAX, length)
            out[row, start:stop] = np.asarray(jnp.argmax(logits[row, start:stop], axis=-1))
    return out


def rows_per_forward(requested: int, length: int, vocab: int,
                     logits_budget_bytes: int = 4 << 30) -> int:
    """How many of ``requested`` rows of ``length`` tokens to run through one forward:
    the model returns float32 logits for every position, so 8 rows of 8K tokens of
    SmolLM2's vocabulary are 12 GiB; at least one row."""
    return max(1, min(requested, logits_budget_bytes // (length * vocab * 4)))
