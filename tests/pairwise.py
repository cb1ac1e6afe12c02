"""A small deterministic pairwise (all-pairs) covering-array generator for test matrices."""

from __future__ import annotations

import itertools
import random
from typing import Any, Mapping, Sequence


def uncovered_pairs(factors: Mapping[str, Sequence[Any]],
                    rows: Sequence[Mapping[str, Any]]) -> set[tuple]:
    """Value pairs of two factors that no row exercises together."""
    names = list(factors)
    missing = set()
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(range(len(factors[a])), range(len(factors[b]))):
            missing.add((a, va, b, vb))
    for row in rows:
        idx = {n: list(factors[n]).index(row[n]) for n in names}
        for a, b in itertools.combinations(names, 2):
            missing.discard((a, idx[a], b, idx[b]))
    return missing


def pairwise(factors: Mapping[str, Sequence[Any]], seed: int = 0,
             candidates: int = 300) -> list[dict[str, Any]]:
    """Rows covering every pair of values of every two factors (greedy, seeded)."""
    names = list(factors)
    rng = random.Random(seed)
    missing = uncovered_pairs(factors, [])
    rows: list[dict[str, Any]] = []
    while missing:
        best, best_gain = None, -1
        # Seed each candidate with one uncovered pair so progress is guaranteed.
        for _ in range(candidates):
            a, va, b, vb = rng.choice(sorted(missing))
            idx = {n: rng.randrange(len(factors[n])) for n in names}
            idx[a], idx[b] = va, vb
            gain = sum((x, idx[x], y, idx[y]) in missing
                       for x, y in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = idx, gain
        for x, y in itertools.combinations(names, 2):
            missing.discard((x, best[x], y, best[y]))
        rows.append({n: factors[n][best[n]] for n in names})
    return rows
