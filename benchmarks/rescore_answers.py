"""Score the recorded replies of ``diagnose_adapters_cpu.py`` again under today's rule.

    python benchmarks/rescore_answers.py RESULTS.json [--card CARD.json]

The replies are kept; each one's ``right``, each variant's count and the file's
``scoring`` are recomputed with :mod:`coda_db.scoring` against the accepted answers
of the questions file the results name. What the file said before is kept under
``rescored`` (the earlier rule and counts). ``--card`` quotes the rescored results
again in a model card whose ``heldout`` quote names this file (as ``python -m
train.bundle --heldout`` does). Both files are written atomically, and only when a
count or the rule changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from coda_db.scoring import SCORING_RULE, accepted_answers, is_right
from train.bundle import heldout_card
from train.evaluation.retention_workers import write_json


def rescored(results: dict[str, Any], questions: dict[str, Any]) -> dict[str, Any]:
    """``results`` with every reply scored under :data:`SCORING_RULE`; ``KeyError``
    names a recorded question the questions file lacks."""
    accepted = {(doc["name"], q["question"]): accepted_answers(q)
                for doc in questions["documents"] for q in doc["questions"]}
    before = {"scoring": results["scoring"],
              "right": {name: v["right"] for name, v in results["variants"].items()}}
    for variant in results["variants"].values():
        for record in variant["answers"]:
            key = (record["document"], record["question"])
            if key not in accepted:
                raise KeyError(f"{key} is not in the questions file")
            record["right"] = is_right(record["reply"], accepted[key])
        variant["right"] = sum(r["right"] for r in variant["answers"])
    results["scoring"] = SCORING_RULE
    results.setdefault("rescored", []).append(before)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--card", type=Path, help="a model card quoting RESULTS under 'heldout'")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if results["scoring"] == SCORING_RULE:
        print(f"{args.results}: already scored under today's rule; nothing written")
        return 0
    questions = json.loads(Path(results["questions"]).read_text())
    results = rescored(results, questions)
    write_json(args.results, results)
    for name, variant in results["variants"].items():
        print(f"{name}: {results['rescored'][-1]['right'][name]} -> {variant['right']}"
              f"/{variant['asked']}")
    if args.card:
        card = json.loads(args.card.read_text())
        quoted = card.get("heldout", {})
        if quoted.get("results") != args.results.name:
            print(f"{args.card} quotes {quoted.get('results')!r}, not {args.results.name}; "
                  "card not written", file=sys.stderr)
            return 1
        bank = card["attention"]["options"]
        card["heldout"] = heldout_card(args.results, _full_bank(results, quoted["variant"], bank))
        write_json(args.card, card, indent=1)
        print(f"{args.card}: held-out {card['heldout']['right']}/{card['heldout']['asked']}")
    return 0


def _full_bank(results: dict[str, Any], variant: str, options: dict[str, Any]) -> dict[str, Any]:
    """The recorded bank of the variant the card quoted (checked against the card's options)."""
    bank = results["variants"][variant]["bank"]
    differing = {k: v for k, v in options.items() if bank.get(k) != v}
    if differing:
        raise ValueError(f"the card's bank differs from variant {variant!r}'s: {differing}")
    return bank


if __name__ == "__main__":
    sys.exit(main())
