"""Perplexities of shorter contexts from per-token NLLs, and bootstrap intervals
over held-out rows for statistics that compare cells scored on the same rows.

Every cell of a study is scored on the same rows (``token_nll``), so a
statistic such as a bounded penalty or the 2x2 interaction is a function of
the rows' mean NLLs; resampling the rows with replacement (the same draw for
every cell) gives its sampling spread.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

Statistic = Callable[[Mapping[str, float]], float]


def row_means(nll: np.ndarray, context: int) -> np.ndarray:
    """Each row's mean NLL over a ``context``-token prefix (its first context - 1
    predictions): (n, L - 1) -> (n,)."""
    if not 2 <= context <= nll.shape[1] + 1:
        raise ValueError(f"context {context} does not fit rows of {nll.shape[1] + 1} tokens")
    return nll[:, :context - 1].astype(np.float64).mean(axis=1)


def perplexity(nll: np.ndarray, context: int) -> float:
    """PPL of ``context``-token prefixes of the rows (every row the same length,
    so the mean of row means is the token mean)."""
    return math.exp(float(row_means(nll, context).mean()))


def bootstrap(per_row: Mapping[str, np.ndarray], statistics: Mapping[str, Statistic], *,
              samples: int = 2000, seed: int = 0, level: float = 0.95
              ) -> dict[str, dict[str, float]]:
    """``{name: {"value", "low", "high"}}`` for each statistic of the cells' PPLs.

    ``per_row`` maps a cell to its rows' mean NLLs (all of the same rows); a
    statistic takes ``{cell: ppl}`` and returns a number. ``value`` is the
    statistic on all rows; ``low``/``high`` the percentile interval of
    ``samples`` resamplings of the rows (one draw shared by every cell).
    """
    lengths = {len(v) for v in per_row.values()}
    if len(lengths) != 1:
        raise ValueError(f"every cell must be scored on the same rows; got row counts {lengths}")
    n = lengths.pop()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    resampled = {cell: np.exp(rows[draws].mean(axis=1)) for cell, rows in per_row.items()}
    full = {cell: math.exp(float(rows.mean())) for cell, rows in per_row.items()}
    tail = (1.0 - level) / 2 * 100
    out = {}
    for name, stat in statistics.items():
        values = np.array([stat({c: float(v[i]) for c, v in resampled.items()})
                           for i in range(samples)])
        out[name] = {"value": stat(full), "low": float(np.percentile(values, tail)),
                     "high": float(np.percentile(values, 100 - tail))}
    return out


def contexts_table(nll: np.ndarray, contexts: Sequence[int]) -> list[dict[str, float]]:
    """``[{"context", "ppl", "nll"}]`` for each context (prefixes of the rows)."""
    return [{"context": c, "nll": float(row_means(nll, c).mean()), "ppl": perplexity(nll, c)}
            for c in contexts]
