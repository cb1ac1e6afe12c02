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

import hashlib
from collections import defaultdict
from typing import Any, Mapping, Sequence

from coda_db.scoring import SCORING_RULE, is_right

GOAL_ONE_FACT = 0.95  # accuracy with one fact, at every length (bounded)
GOAL_GAP_POINTS = 5.0  # bounded within this many points of unbounded, where it runs
# The chat task's issue (#29) asks more of the bounded cache: one fact at 95% and all
# questions at 90% up to 16K tokens, all questions at 80% beyond; within 3 points of the
# same weights' full cache; above the unmodified base; a document's state at most 10 MB.
CHAT_GOAL_GAP_POINTS = 3.0
CHAT_GOAL_NEAR_LENGTH = 16384  # the lengths up to which the higher goals hold
CHAT_GOAL_ALL_NEAR, CHAT_GOAL_ALL_FAR = 0.90, 0.80
CHAT_GOAL_STATE_BYTES = 10_000_000


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


def goals(summary: Sequence[dict[str, Any]], lengths: Sequence[int], *,
          task: str = "facts", state_bytes: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
    """The issue's goals for the bounded cache. Every task: accuracy with one fact
    at each length (>= 95%) and the gap to unbounded in points where both ran (<= 5
    for ``facts``, issue #19). ``chat`` (issue #29): one fact only up to 16K, the gap
    <= 3, and also all questions (>= 90% up to 16K, >= 80% beyond), the lead over the
    unmodified base where it ran, and the bounded state per document (<= 10 MB, from
    ``state_bytes``, the results' state sizes)."""
    acc = {(s["cache"], s["length"], s["facts"]): s["accuracy"] for s in summary}
    chat = task == "chat"
    one_lengths = [n for n in lengths if not chat or n <= CHAT_GOAL_NEAR_LENGTH]
    one = {length: acc.get(("bounded", length, 1)) for length in one_lengths}

    def points_over(other: str, sign: int) -> dict[str, float]:
        return {str(n): sign * 100 * (acc[(other, n, None)] - acc[("bounded", n, None)])
                for n in lengths if (other, n, None) in acc and ("bounded", n, None) in acc}

    gaps = points_over("unbounded", 1)
    gap_goal = CHAT_GOAL_GAP_POINTS if chat else GOAL_GAP_POINTS
    ran = [v for v in one.values() if v is not None]
    out = {"one_fact_bounded": {str(k): v for k, v in one.items()},
           "one_fact_goal": GOAL_ONE_FACT,
           "one_fact_met": bool(ran) and len(ran) == len(one) and min(ran) >= GOAL_ONE_FACT,
           "unbounded_minus_bounded_points": gaps,
           "gap_goal_points": gap_goal,
           "gap_met": bool(gaps) and max(gaps.values()) <= gap_goal}
    if not chat:
        return out
    every = {str(n): acc.get(("bounded", n, None)) for n in lengths}
    every_goal = {str(n): CHAT_GOAL_ALL_NEAR if n <= CHAT_GOAL_NEAR_LENGTH
                  else CHAT_GOAL_ALL_FAR for n in lengths}
    lead = points_over("base", -1)
    size = (state_bytes or {}).get("bounded", {}).get("model_cache_bytes")
    return out | {
        "all_questions_bounded": every, "all_questions_goal": every_goal,
        "all_questions_met": all(v is not None and v >= every_goal[n]
                                 for n, v in every.items()),
        "bounded_minus_base_points": lead,
        "above_base_met": bool(lead) and min(lead.values()) > 0,
        "state_bytes_bounded": size, "state_bytes_goal": CHAT_GOAL_STATE_BYTES,
        "state_met": size is not None and size <= CHAT_GOAL_STATE_BYTES}


def document_records(docs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                     answers: Mapping[str, Sequence[str | None]], seed: int
                     ) -> list[dict[str, Any]]:
    """One record per document: its cell, ``seed``, index, the sha256 of its text and the
    caches that answered its questions. The documents of a study depend on its whole
    grid (one generator walks the cells in order), so these tell a merge whether two
    parts read the same documents (other caches: arms to compare) or count one twice."""
    answered: dict[int, set[str]] = defaultdict(set)
    for cache, got in answers.items():
        for row, answer in zip(rows, got):
            if answer is not None:
                answered[row["doc"]].add(cache)
    return [{"length": d["length"], "facts": d["facts"], "depth": d["depth"],
             "seed": seed, "index": d.get("index"),
             "sha256": hashlib.sha256(d["text"].encode()).hexdigest(),
             "caches": sorted(answered[i])} for i, d in enumerate(docs)]


def goals_line(g: Mapping[str, Any]) -> str:
    """The goals of :func:`goals` in one line, each met or not."""
    def said(key: str, measured: str) -> str:
        if not g[measured] or all(v is None for v in g[measured].values()):
            return "not measured"  # an arm it compares with did not run
        return "met" if g[key] else "not met"

    line = (f"goal >= {100 * g['one_fact_goal']:.0f}% with one fact at "
            f"{', '.join(g['one_fact_bounded'])} tokens (bounded): "
            f"{said('one_fact_met', 'one_fact_bounded')}; bounded within "
            f"{g['gap_goal_points']:.0f} points of unbounded: "
            f"{said('gap_met', 'unbounded_minus_bounded_points')}")
    if "all_questions_met" in g:  # the chat task's goals
        every = ", ".join(f"{100 * v:.0f}% at {n}" for n, v in g["all_questions_goal"].items())
        size = "not measured" if g["state_bytes_bounded"] is None else (
            "met" if g["state_met"] else "not met")
        line += (f"; all questions {every}: "
                 f"{said('all_questions_met', 'all_questions_bounded')}; above the base: "
                 f"{said('above_base_met', 'bounded_minus_base_points')}; "
                 f"state <= {g['state_bytes_goal'] / 1e6:.0f} MB: {size}")
    return line


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
