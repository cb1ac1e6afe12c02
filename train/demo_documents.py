"""The documents of ``coda-db demo``: held-out filler with facts at varied depths.

    python -m train.demo_documents CORPUS_DIR [--out coda_db/demo_documents.json]
                                   [--lengths 1500,3000,6000] [--facts 2,3,4] [--seed 0]

One document per length (tokens of the corpus's tokenizer), built from the
pieces of the retention task's evaluation documents (``train.retention``): a
window of the corpus's held-out split (``CORPUS_DIR/heldout``), starting at a
paragraph or sentence, with one sentence per fact inserted at its depth, the
people and places drawn from the held-out pools, codes, numbers and dates at
random; so nothing in them was seen in training. The facts of a document lie
at evenly spread depths (10% to 90%: 10, 37, 63 and 90% for four), each moved
to the nearest sentence end within 3% of the document, else to the nearest
word start, so the text reads well (the training documents insert facts at
any token, so these are placements the model saw). The draw is repeated with
the next seed until the documents together hold every fact form. Each
document carries its questions and expected answers; the file records the
tokenizer's fingerprint and the seed.
Exit codes: 0 done, 2 not found, 3 refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cli import run_reporting_errors

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "coda_db" / "demo_documents.json"
LENGTHS = (1500, 3000, 6000)
FACTS_PER_DOC = (2, 3, 4)
MAX_SEEDS = 100


def spread_depths(count: int) -> list[float]:
    """``count`` depths spread over the document, from 10% to 90% (one: the middle)."""
    if count == 1:
        return [0.5]
    return [round(0.1 + 0.8 * i / (count - 1), 3) for i in range(count)]


SNAP = 0.03  # a fact moves at most this share of the document to sit at a sentence's end


def _decode(tok, ids: np.ndarray, eos_id: int | None) -> str:
    """The filler's text; the corpus's document separators become blank lines."""
    if eos_id is None:
        return tok.decode(ids.tolist())
    parts, run = [], []
    for i in ids.tolist():
        if i == eos_id:
            parts.append(tok.decode(run))
            run = []
        else:
            run.append(i)
    parts.append(tok.decode(run))
    last = len(parts) - 1
    return "\n\n".join(p.lstrip("\n") if i else p for i, p in enumerate(
        p.rstrip("\n") if i < last else p for i, p in enumerate(parts)))


def _document(tok, filler: np.ndarray, facts, length: int, rng: np.random.Generator,
              eos_id: int | None) -> tuple[str, list[float]]:
    """About ``length`` tokens: a held-out window starting at a sentence's start, each
    fact's sentence inserted after the sentence nearest its depth (as
    ``train.retention.document_tokens`` does, but not inside a word); the text
    and each fact's depth as placed."""
    from . import retention

    sentence_tokens = sum(len(tok.encode(f.sentence).ids) for f in facts)
    n_filler = length - sentence_tokens
    if n_filler < 1:
        raise ValueError(f"{len(facts)} facts do not fit in a {length}-token document")
    reach = max(1, int(SNAP * length))
    if len(filler) <= n_filler + 2 * reach:
        raise ValueError(f"the held-out filler ({len(filler):,} tokens) is too short for a "
                         f"{length:,}-token document")
    start = int(rng.integers(0, len(filler) - n_filler - 2 * reach))
    head = filler[start:start + 2 * reach]
    eos = tok.decode([eos_id], skip_special_tokens=False) if eos_id is not None else None
    paragraphs, ends, _ = retention.boundaries(retention.token_texts(tok, head), eos)
    start += next((e for e in paragraphs + ends if e < len(head)), 0)
    window = np.asarray(filler[start:start + n_filler], np.int64)
    _, ends, words = retention.boundaries(retention.token_texts(tok, window), eos)
    order = sorted(range(len(facts)), key=lambda i: facts[i].depth)
    pieces, depths, at = [], [0.0] * len(facts), 0
    for i in order:
        cut = max(at, retention.snap(int(round(facts[i].depth * n_filler)), ends, words, reach))
        pieces.append(_decode(tok, window[at:cut], eos_id))
        pieces.append(facts[i].sentence)
        depths[i] = round(cut / n_filler, 3)
        at = cut
    pieces.append(_decode(tok, window[at:], eos_id))
    return "".join(pieces).strip(), depths


def _documents(tok, filler: np.ndarray, lengths: Sequence[int], facts: Sequence[int],
               seed: int) -> list[dict[str, Any]]:
    from . import data, retention

    rng = np.random.default_rng(seed)
    pools = retention.load_pools("eval")
    try:
        eos_id: int | None = data.default_eos_id(tok)
    except ValueError:
        eos_id = None
    docs = []
    for length, n in zip(lengths, facts):
        drawn = retention.draw_facts(rng, pools, n, spread_depths(n))
        text, depths = _document(tok, filler, drawn, length, rng, eos_id)
        placed = sorted(zip(depths, drawn), key=lambda pair: pair[0])
        docs.append({"name": f"demo-{length}", "length": length,
                     "tokens": len(tok.encode(text).ids), "text": text,
                     "questions": [{"question": f.question, "answer": f.value,
                                    "kind": f.kind, "depth": depth} for depth, f in placed]})
    return docs


def demo_documents(corpus: str | os.PathLike, *, lengths: Sequence[int] = LENGTHS,
                   facts: Sequence[int] = FACTS_PER_DOC, seed: int = 0) -> dict[str, Any]:
    """The demo documents of ``corpus`` (see the module's description)."""
    from coda_db.bundled import DEMO_FORMAT
    from coda_db.model_source import tokenizer_fingerprint

    from . import data, retention

    corpus = Path(corpus)
    for needed in ("tokenizer.json", "heldout"):
        if not (corpus / needed).exists():
            raise FileNotFoundError(f"{corpus / needed} does not exist (build the corpus with "
                                    "python -m train.corpus)")
    if len(lengths) != len(facts) or not lengths:
        raise ValueError(f"one fact count per length: got {len(lengths)} lengths and "
                         f"{len(facts)} fact counts")
    if any(n < 1 for n in facts) or any(length < 1 for length in lengths):
        raise ValueError("lengths and fact counts must be positive")
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    filler = data.read_tokens(corpus / "heldout")
    want = set(retention.FACTS) if sum(facts) >= len(retention.FACTS) else set()
    for attempt in range(seed, seed + MAX_SEEDS):
        docs = _documents(tok, filler, lengths, facts, attempt)
        if want <= {q["kind"] for d in docs for q in d["questions"]}:
            break
    return {"format": DEMO_FORMAT, "seed": attempt, "corpus": str(corpus.absolute()),
            "tokenizer_sha256": tokenizer_fingerprint(tok), "prompt": retention.PROMPT,
            "documents": docs}


def write_json(value: Any, out: Path) -> Path:
    """``value`` as JSON at ``out``, atomically; an existing file is replaced only
    when it is a demo documents file."""
    from coda_db.bundled import DEMO_FORMAT

    if out.exists():
        try:
            fmt = json.loads(out.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != DEMO_FORMAT or not out.is_file():
            raise ValueError(f"refusing to overwrite {out}: it is not a demo documents file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo_documents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a corpus of python -m train.corpus")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="default: %(default)s")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--facts", default=",".join(map(str, FACTS_PER_DOC)),
                        help="facts per document, one per length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> int:
        doc_set = demo_documents(args.corpus, lengths=_ints(args.lengths),
                                 facts=_ints(args.facts), seed=args.seed)
        out = write_json(doc_set, Path(args.out))
        for d in doc_set["documents"]:
            print(f"{d['name']}: {d['tokens']:,} tokens, "
                  + ", ".join(f"{q['kind']} at {q['depth']:.0%}" for q in d["questions"]))
        print(f"wrote {out} (seed {doc_set['seed']})")
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
