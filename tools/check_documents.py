"""Checks files of documents with free-form questions against their own text.

The files (``coda_db/demo_documents_v2.json``, ``train/data_files/freeform_heldout.json``)
hold {"format", "scoring", "documents": [{"name", "title", "text", "tokens",
"questions": [{"question", "answer", "accepted", "depth"}]}]}. A reply is scored right
by ``coda_db.scoring`` (the demo's and ``train.evaluation ask``'s rule): when one accepted
answer, normalised, lies in the normalised reply as whole words.

    python tools/check_documents.py FILE [FILE ...] [--tokenizer tokenizer.json] [--tokens LO:HI]

Errors (exit 1): a text that is not plain ASCII; ``tokens`` unlike the tokenizer's
count; a length outside LO:HI, or, for a document named ``demo-N``, more than 10%
from N; an answer or accepted form not in the text (case-insensitive); an answer
that its own accepted forms would not score right; an accepted form that an echo of
the question would contain; a ``depth`` unlike the answer's first occurrence.
Warnings, to read, not errors: sentences that share two or more words with a
question and carry a number of the answer's kind (a year, or a number that is
not a year) other than the answer's (a possible conflicting value, or just a
distractor), and accepted forms that occur more than once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from coda_db.scoring import is_right, normalise  # noqa: E402

FORMATS = ("coda_db.demo_documents/2", "coda_db.freeform_heldout/1")
STOP = set("""a an the of in on at to for from by with and or is are was were be been did do does
what which who whom whose when where why how many much long whole into out as it its this that
their they there after before all new first will mr mrs ms dr""".split())


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP and len(w) > 2}


def _numbers(text: str) -> tuple[set[str], set[str]]:
    """(years, other numbers) in a text; 1,204 is no year, and its comma goes."""
    found = {n.rstrip(".,") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}
    years = {n for n in found if re.fullmatch(r"1\d{3}|20\d{2}", n)}
    return years, {n.replace(",", "") for n in found - years}


def check_question(doc: dict, q: dict, errors: list[str], warnings: list[str]) -> None:
    text, low = doc["text"], doc["text"].lower()
    where = f"{doc['name']}: {q['question']!r}"
    answer, accepted = q["answer"], q["accepted"]
    if not accepted:
        errors.append(f"{where}: no accepted answers")
        return
    at = low.find(answer.lower())
    if at < 0:
        errors.append(f"{where}: the answer {answer!r} is not in the text")
    elif abs(q["depth"] - at / len(text)) > 0.0005:
        errors.append(f"{where}: depth {q['depth']} but the answer first appears at {at / len(text):.3f}")
    for form in accepted:
        if not normalise(form):
            errors.append(f"{where}: accepted form {form!r} normalises to nothing")
        elif form.lower() not in low:
            errors.append(f"{where}: accepted form {form!r} is not in the text")
        elif is_right(q["question"], form):
            errors.append(f"{where}: accepted form {form!r} is inside the question")
        count = low.count(form.lower())
        if count > 1:
            warnings.append(f"{where}: accepted form {form!r} occurs {count} times")
    if not is_right(answer, accepted):
        errors.append(f"{where}: the answer {answer!r} would not score right")
    mine_years, mine_others = _numbers(answer)
    kind = 1 if mine_others else 0  # compare numbers with numbers, years with years
    mine = mine_others or mine_years
    if mine:
        asked = _stems(q["question"])
        pos = 0
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
            pos = text.find(sentence, pos)
            shared = asked & _stems(sentence)
            others = _numbers(sentence)[kind] - mine
            if len(shared) >= 2 and others:
                warnings.append(f"{where}: at {pos / len(text):.2f} a sentence sharing "
                                f"{sorted(shared)} mentions {sorted(others)}: {sentence[:90]!r}")


def check_file(path: Path, tokenizer, tokens_range: tuple[int, int] | None) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") not in FORMATS:
        errors.append(f"{path}: unknown format {data.get('format')!r}")
    names = [d["name"] for d in data["documents"]]
    if len(set(names)) != len(names):
        errors.append(f"{path}: repeated document names")
    for doc in data["documents"]:
        text = doc["text"]
        if not text.isascii():
            errors.append(f"{doc['name']}: the text is not plain ASCII")
        n = len(tokenizer.encode(text).ids) if tokenizer else doc["tokens"]
        if n != doc["tokens"]:
            errors.append(f"{doc['name']}: tokens {doc['tokens']} but the tokenizer counts {n}")
        demo = re.fullmatch(r"demo-(\d+)", doc["name"])
        lo, hi = ((0.9 * int(demo.group(1)), 1.1 * int(demo.group(1))) if demo
                  else tokens_range or (0, float("inf")))
        if not lo <= n <= hi:
            errors.append(f"{doc['name']}: {n} tokens, outside {lo:.0f} to {hi:.0f}")
        print(f"{path.name}: {doc['name']}: {n} tokens, {len(doc['questions'])} questions at depths "
              + ", ".join(f"{q['depth']:.2f}" for q in doc["questions"]))
        for q in doc["questions"]:
            check_question(doc, q, errors, warnings)
    return errors, warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--tokenizer", help="a tokenizer.json to count tokens with (needs `tokenizers`)")
    parser.add_argument("--tokens", help="LO:HI, the allowed token counts of documents not named demo-N")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(args.tokenizer)
    tokens_range = tuple(int(x) for x in args.tokens.split(":")) if args.tokens else None
    errors: list[str] = []
    for path in args.files:
        errs, warns = check_file(path, tokenizer, tokens_range)
        errors += errs
        for w in warns:
            print("warning:", w)
    for e in errors:
        print("ERROR:", e)
    print("ok" if not errors else f"{len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
