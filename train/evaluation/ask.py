"""A chat model's answers to questions about documents, scored by containment.

    python -m train.evaluation ask MODEL_DIR QUESTIONS.json [--out answers.json]
        [--max-new-tokens 64]

MODEL_DIR is a converted model with its tokenizer and chat template (``python
-m convert gguf``). QUESTIONS.json holds documents and questions about them:

    {"documents": [{"name": "lighthouse", "text": "...",
                    "questions": [{"question": "Who built it?", "expected": "Agnes Polworth"}]}]}

(or, as in ``coda_db/demo_documents_v2.json``, ``"answer"`` with ``"accepted"``:
every equivalent form; any one of them contained in the reply is right).

Each question is asked in a fresh conversation (the document, then the
question, in one user turn; greedy). The scoring rule is
:mod:`coda_db.scoring`'s (the demo's): an answer is right when an expected
form, normalised, is contained in the reply, normalised, as whole words
(:data:`coda_db.scoring.SCORING_RULE` says how text is normalised).
The results JSON records every reply, the totals, the model, the
device and the versions. Exit codes: 0 done, 1 usage, 2 a path not found, 3
refused or invalid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
from tqdm.auto import tqdm

from coda_db.scoring import SCORING_RULE, accepted_answers, is_right
from coda_jax.chat import ask, load_chat_model
from coda_jax.model_io import read_model_metadata

from ..cli import UsageParser, run_reporting_errors


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """The documents of a questions file, checked (``ValueError`` naming the problem)."""
    path = Path(path)
    try:
        documents = json.loads(path.read_text())["documents"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a questions file (a JSON object with a 'documents' "
                         f"list): {type(err).__name__}") from None
    for doc in documents:
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) or not all(
                isinstance(q, dict) and isinstance(q.get("question"), str)
                and accepted_answers(q) for q in doc.get("questions", [None])):
            raise ValueError(f"{path}: every document needs a 'text' and 'questions', each "
                             "with a 'question' and an 'expected' answer (or 'accepted' forms)")
    return documents


def answer_all(model_dir: str | Path, documents: list[dict[str, Any]], *,
               max_new_tokens: int = 64) -> dict[str, Any]:
    """Ask every question; the replies, marks and totals."""
    chat_model = load_chat_model(model_dir)
    records, start = [], time.perf_counter()
    todo = [(doc, q) for doc in documents for q in doc["questions"]]
    for doc, q in tqdm(todo, desc="questions", unit="q"):
        reply = ask(chat_model, q["question"], document=doc["text"],
                    max_new_tokens=max_new_tokens)
        accepted = accepted_answers(q)
        records.append({"document": doc.get("name"), "question": q["question"],
                        "expected": accepted[0], "accepted": accepted, "reply": reply,
                        "right": is_right(reply, accepted)})
    meta = read_model_metadata(model_dir)
    return {"model": (meta.get("source") or {}).get("name") or str(model_dir),
            "attention": meta.get("attention"), "scoring": SCORING_RULE,
            "right": sum(r["right"] for r in records), "asked": len(records),
            "seconds": time.perf_counter() - start, "max_new_tokens": max_new_tokens,
            "device": str(jax.devices()[0]), "jax": jax.__version__, "answers": records}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluation ask``: every reply marked on stdout, the results
    JSON to ``--out``; exit codes of ``train.cli``."""
    parser = UsageParser(prog="python -m train.evaluation ask", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_DIR",
                        help="a converted chat model with its tokenizer and chat template")
    parser.add_argument("questions", metavar="QUESTIONS.json",
                        help="documents and questions about them (see above)")
    parser.add_argument("--out", help="write the results JSON here (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="reply length at most, in tokens (default: %(default)s)")
    args = parser.parse_args(argv)

    def run() -> int:
        result = answer_all(args.model, read_questions(args.questions),
                            max_new_tokens=args.max_new_tokens)
        for r in result["answers"]:
            print(f"{'✓' if r['right'] else '✗'} {r['question']}  expected: {r['expected']}\n"
                  f"    {r['reply']}")
        print(f"{result['right']}/{result['asked']} right")
        if args.out:
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
            tmp.replace(args.out)
        return 0

    return run_reporting_errors(run)

