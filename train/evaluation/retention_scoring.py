"""Scoring the retention study: per question right or wrong, accuracy per cell and
length, the issue's goals, agreement between caches and sample answers.

A *row* is one question (``length``, ``facts``, ``depth``, ``question``,
``expected``; a chat document's also ``accepted``); answers are aligned with the
rows, ``None`` where a cache did not run (the unbounded cache above its maximum
length). A row with accepted answers is scored by the database's containment rule
(:func:`coda_db.scoring.is_right`: a free-form reply names the answer), any other by
exact match (a plain model's completion is the answer itself).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from coda_db.scoring import SCORING_RULE, is_right

GOAL_ONE_FACT = 0.95  # accuracy with one fact, at every length (bounded)
GOAL_GAP_POINTS = 5.0  # bounded within this many points of unbounded, where it runs


EXACT_RULE = "exact match after stripping surrounding whitespace"


def is_correct(answer: str, row: Mapping[str, Any]) -> bool:
    """Whether ``answer`` answers the question ``row``: one of its ``accepted``
    answers contained in it (:func:`coda_db.scoring.is_right`) where the row has
    them, else exact match after stripping surrounding whitespace."""
    if "accepted" in row:
        return is_right(answer, row["accepted"])
    return answer.strip() == row["expected"].strip()


def scoring_rule(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rule :func:`is_correct` applies to ``rows``, in words."""
    return SCORING_RULE if any("accepted" in r for r in rows) else EXACT_RULE


def cell_rows(cache: str, rows: Sequence[dict[str, Any]], answers: Sequence[str]
              ) -> list[dict[str, Any]]:
    """Accuracy per (length, facts, depth) cell of one cache."""
    cells: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for row, answer in zip(rows, answers, strict=True):
        cell = cells[row["length"], row["facts"], row["depth"]]
        cell[0] += is_correct(answer, row)
        cell[1] += 1
    return [{"cache": cache, "length": length, "facts": facts, "depth": depth,
             "correct": c, "total": t, "accuracy": c / t}
            for (length, facts, depth), (c, t) in sorted(cells.items())]


def summaries(cells: Sequence[dict[str, Any]], caches: Sequence[str]) -> list[dict[str, Any]]:
    """Per (cache, length) (``facts`` None) and per (cache, length, facts):
    correct of total, the caches in the order of ``caches``."""
    groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in cells:
        for key in ((r["cache"], r["length"], None), (r["cache"], r["length"], r["facts"])):
            groups[key][0] += r["correct"]
            groups[key][1] += r["total"]

    def order(key: tuple) -> tuple:
        cache, length, facts = key
        return caches.index(cache), length, -1 if facts is None else facts

    return [{"cache": cache, "length": length, "facts": facts, "correct": c, "total": t,
             "accuracy": c / t}
            for (cache, length, facts), (c, t) in sorted(groups.items(),
                                                          key=lambda kv: order(kv[0]))]


def goals(summary: Sequence[dict[str, Any]], lengths: Sequence[int]) -> dict[str, Any]:
    """The issue's goals for the bounded cache: accuracy with one fact at each
    length (>= 95%), and its gap to unbounded in points where both ran (<= 5)."""
    acc = {(s["cache"], s["length"], s["facts"]): s["accuracy"] for s in summary}
    one = {length: acc.get(("bounded", length, 1)) for length in lengths}
    gaps = {length: 100 * (acc[("unbounded", length, None)] - acc[("bounded", length, None)])
            for length in lengths
            if ("unbounded", length, None) in acc and ("bounded", length, None) in acc}
    ran = [v for v in one.values() if v is not None]
    return {"one_fact_bounded": {str(k): v for k, v in one.items()},
            "one_fact_goal": GOAL_ONE_FACT,
            "one_fact_met": bool(ran) and len(ran) == len(lengths) and min(ran) >= GOAL_ONE_FACT,
            "unbounded_minus_bounded_points": {str(k): v for k, v in gaps.items()},
            "gap_goal_points": GOAL_GAP_POINTS,
            "gap_met": bool(gaps) and max(gaps.values()) <= GOAL_GAP_POINTS}


def agreement(rows: Sequence[dict[str, Any]], answers: dict[str, Sequence[str | None]],
              caches: Sequence[str]) -> list[dict[str, Any]]:
    """Per length, how often each of ``caches`` gave the unbounded cache's very
    answer (right or wrong), where the unbounded cache ran."""
    out: list[dict[str, Any]] = []
    if "unbounded" not in answers:
        return out
    for cache in (c for c in caches if c in answers):
        same: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for row, a, b in zip(rows, answers[cache], answers["unbounded"], strict=True):
            if b is not None:
                same[row["length"]][0] += a == b
                same[row["length"]][1] += 1
        out += [{"cache": cache, "length": length, "same": s, "total": t, "fraction": s / t}
                for length, (s, t) in sorted(same.items())]
    return out


def sample_answers(cache: str, rows: Sequence[dict[str, Any]], answers: Sequence[str | None],
            per_length: int) -> list[dict[str, Any]]:
    """Up to ``per_length`` questions per length, evenly spread, with the raw answer."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        picked = [i for i, r in enumerate(rows) if r["length"] == length
                  and answers[i] is not None]
        step = max(1, len(picked) // max(per_length, 1))
        for i in picked[::step][:per_length]:
            out.append({"cache": cache, **{k: rows[i][k] for k in (
                "length", "facts", "depth", "question", "expected")},
                "answer": answers[i], "correct": is_correct(answers[i], rows[i])})
    return out
