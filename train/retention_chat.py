"""The chat retention task of the default model (SmolLM2-135M-Instruct with CoDA
adapters): real text with facts in it, read once through the model's chat
template, and free-form questions about it, answered in the model's own words.

    python -m train.retention_chat train OUT_DIR --corpus CORPUS [--seq-len 4096]
                                   [--sequences 12000] [--max-facts 8] [--seed 0]
    python -m train.retention_chat eval OUT.jsonl --corpus CORPUS [--lengths 1024,4096]
                                   [--facts 1,4,16] [--depths 0.05,0.25,0.5,0.75,0.95]
                                   [--passages 1] [--count 4] [--seed 1]

The format (SmolLM2's chat template ``CHAT_TEMPLATE``, rendered with
``coda_jax.chat_template.render_chat``; :func:`chat_format` derives the strings
from any template that frames every turn alike)::

    DOCUMENT_PREFIX + document + DOCUMENT_SUFFIX          read into the state once
    QUESTION_PREFIX + question + QUESTION_SUFFIX          per question, then generate
    answer + ANSWER_SUFFIX                                the reply and its end of turn

``DOCUMENT_PREFIX`` is the template's default system turn (SmolLM2's "You are a
helpful AI assistant named SmolLM, ...", added when no system message is given)
and ``<|im_start|>user\\n``; ``DOCUMENT_SUFFIX`` and ``ANSWER_SUFFIX`` are
``<|im_end|>\\n``; ``QUESTION_PREFIX`` is ``<|im_start|>user\\n`` and
``QUESTION_SUFFIX`` ``<|im_end|>\\n<|im_start|>assistant\\n``.

The loss counts only the answers and their ``<|im_end|>``: train with
``data.loss_start: "<|im_start|>assistant\\n"`` and ``data.loss_stop: "<|im_end|>"``
(``LOSS_START``, ``LOSS_STOP``; ``train.steps.loss_span`` finds the stop token by
its text with special tokens spelled out). The corpus must be tokenised with
SmolLM2's tokenizer (``python -m train.corpus --tokenizer MODEL/tokenizer.json``),
which holds ``<|im_start|>`` and ``<|im_end|>`` as single tokens.

A document is corpus filler (its training split for ``train``, its held-out
split for ``eval``; a split shorter than a document is read round again from its
start) starting at a sentence, with the corpus's document separators turned
into line breaks, and one sentence per fact inserted at the sentence end (else
word start) nearest the fact's depth. Facts are of the kinds of
``data_files/retention_chat_facts.json`` (read by ``train.chat_facts``), each
about a different subject, stated in one of several sentences and asked in one
of several questions, the answer a short sentence holding the value: about a
person (a home town, a birthplace, a birth year, a profession, an employer, an
access code, a phone extension, a wedding date, a count of things, a price, a
colour, the name of a pet, a ship or a company, a founding year, a street
address), about an organisation (who chaired its meeting, who was appointed to
a role, who founded it, its members, its subscription, what an event raised,
its guest speaker, who won its prize, its next meeting), a town (the year of an
event, its population, its mayor, its twin town), a product (what to do at an
error code, a setting as supplied, its tank, its warranty, its weight) or a
building (its architect, its opening year, how long its repairs took). The
held-out documents of ``eval`` draw only the person kinds
(``Phrasings.study_kinds``: the retention study's documents stay as measured).
A training document also states up to ``DISTRACTORS`` facts that no question
asks (as many as fit in half of its filler), half the time of the asked facts'
kinds, so that an answer is found by its subject and not by its kind. Besides
facts there are passage questions: which 4 to 8 words follow a quoted run of 4
to 6 words of the filler (a run found once in the document), answered with
those words.

Held out: the sentence and question phrasings of each kind (and of the passage
questions) are split into a training part and an evaluation part, as the names
and places of ``train.retention``'s pools are, so evaluation documents state
and ask their facts in words never seen in training, about people and places
never seen in training, in held-out filler. Answer phrasings are shared.

``train`` writes token shards of sequences of exactly ``seq_len + 1`` tokens
(one document and its 1 to ``max_facts`` questions: one fact, the others each a
passage question with probability 1/4 and a fact otherwise), and beside them
(``OUT_DIR_marks``) the content marks: 1 on each fact sentence's name and value
and on the source of each passage answer, the write-gate targets of phase 2
(``data.write_targets``). Encoding a sequence's decoded text gives its tokens
back, but for the rare run of line breaks at the document's end or at a joint of
corpus documents. ``eval`` writes one JSON object per document: ``text_prefix``
(the string to read into the state), ``questions`` (``question``, ``answer``,
``accepted``: the value and equivalent forms, ``kind``, ``depth``: where the
fact's sentence or the quote starts, as a share of the document), ``length``
(the tokens the ingest string was built to), ``tokens`` (its tokens when
encoded whole), ``facts``, ``depth`` (the band asked for), ``index`` and
``seed``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from coda_jax.chat_template import render_chat

from . import data, retention
from .chat_facts import (
    ChatFact,
    Phrasings,
    draw_chat_facts,
    load_phrasings,
)
from .cli import run_reporting_errors

# SmolLM2-135M-Instruct's chat template as its GGUF file records it
# (coda_jax.read_model_metadata(converted_model)["chat_template"]).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
PASSAGE_SHARE = 0.25      # chance of each question but one of a training sequence
QUOTE_WORDS = (4, 6)      # words quoted in a passage question (inclusive range)
ANSWER_WORDS = (4, 8)     # words of its answer
QUOTE_TOKENS, ANSWER_TOKENS = 24, 32   # runs longer in tokens are not asked about
PASSAGE_RESERVE = 160     # tokens a training sequence holds back per passage question
PASSAGE_TRIES = 64        # start words tried per passage question
SNAP_REACH = 48           # tokens a fact or the document's start moves to sit at a sentence
MIN_FILLER = 64           # filler tokens a training document keeps at least
DISTRACTORS = 6           # unasked facts a training document states, at most
SAME_KIND_SHARE = 0.5     # chance that they are of the asked facts' kinds


@dataclass(frozen=True)
class ChatFormat:
    """The strings a chat template puts around a document and a question: the
    product reads :meth:`ingest` into the state once, then per question appends
    ``question_prefix + question + question_suffix`` and generates until the
    end-of-turn token of ``answer_suffix``."""

    document_prefix: str
    document_suffix: str
    question_prefix: str
    question_suffix: str     # ends with ``assistant_header``
    answer_suffix: str
    assistant_header: str    # the generation prompt: where an answer starts

    def ingest(self, document: str) -> str:
        """The system turn and the document's user turn."""
        return self.document_prefix + document + self.document_suffix

    def turn(self, question: str, answer: str) -> str:
        """A question's user turn and the assistant's answer turn."""
        return (self.question_prefix + question + self.question_suffix + answer
                + self.answer_suffix)


def chat_format(template: str) -> ChatFormat:
    """The :class:`ChatFormat` of a chat template, found by rendering marker
    contents with ``render_chat``; ``ValueError`` when the template does not
    frame a second question and answer like the first, or its generation
    prompt differs from the header it gives an assistant's turn."""
    doc, q1, a1, q2, a2 = (f"\x1fMARK{i}\x1f" for i in range(5))

    def render(*contents: str, generate: bool = False) -> str:
        roles = ("user", "user", "assistant", "user", "assistant")
        return render_chat(template, [{"role": r, "content": c} for r, c in zip(roles, contents)],
                           add_generation_prompt=generate)

    document_prefix, document_suffix = render(doc).split(doc)
    question_prefix, rest = render(doc, q1, a1)[len(render(doc)):].split(q1)
    question_suffix, answer_suffix = rest.split(a1)
    header = render(doc, q1, generate=True)[len(render(doc, q1)):]
    fmt = ChatFormat(document_prefix, document_suffix, question_prefix, question_suffix,
                     answer_suffix, header)
    if (render(doc, q1, a1, q2, a2) != fmt.ingest(doc) + fmt.turn(q1, a1) + fmt.turn(q2, a2)
            or render(doc, q1, generate=True) != fmt.ingest(doc) + question_prefix + q1
            + question_suffix or not header or not question_suffix.endswith(header)):
        raise ValueError("the chat template does not frame every question and answer alike")
    return fmt


CHAT = chat_format(CHAT_TEMPLATE)
DOCUMENT_PREFIX, DOCUMENT_SUFFIX = CHAT.document_prefix, CHAT.document_suffix
QUESTION_PREFIX, QUESTION_SUFFIX = CHAT.question_prefix, CHAT.question_suffix
ANSWER_SUFFIX = CHAT.answer_suffix
LOSS_START, LOSS_STOP = CHAT.assistant_header, CHAT.answer_suffix.strip()



@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer with each token's text, the ids that stand for the corpus's
    document separator and a line break, and the chat framing as ids."""

    tok: Tokenizer
    texts: tuple[str, ...]
    eos: int
    newline: int
    document_prefix: np.ndarray
    document_suffix: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        """``text`` as ids (the chat strings spell their special tokens out)."""
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int64)


def vocabulary(tok: Tokenizer) -> Vocabulary:
    """:class:`Vocabulary` of ``tok``; ``ValueError`` unless ``LOSS_STOP`` is
    one token of it (the chat format's special tokens, as SmolLM2's has them)."""
    if len(tok.encode(LOSS_STOP, add_special_tokens=False).ids) != 1:
        raise ValueError(f"the tokenizer has no {LOSS_STOP} token: tokenise the corpus with "
                         "SmolLM2's tokenizer (python -m train.corpus --tokenizer ...)")
    texts = tuple(retention.token_texts(tok, np.arange(tok.get_vocab_size())))
    newline, = tok.encode("\n", add_special_tokens=False).ids
    return Vocabulary(tok, texts, data.default_eos_id(tok), newline,
                      np.asarray(tok.encode(DOCUMENT_PREFIX, add_special_tokens=False).ids),
                      np.asarray(tok.encode(DOCUMENT_SUFFIX, add_special_tokens=False).ids))


@dataclass(frozen=True)
class Document:
    """A document's ids, their content marks, whether each token is filler, and
    where each fact's sentence starts."""

    ids: np.ndarray
    marks: np.ndarray
    filler: np.ndarray
    starts: list[int]


def _sentence_start(texts: Sequence[str]) -> int:
    """The first token of ``texts`` that starts a sentence with a space and a
    word (else a word so, else 0): the document's first token then reads the
    same when the whole ingest string is tokenised."""
    _, ends, words = retention.boundaries(list(texts), None)
    spaced = [i for i in ends + words
              if i < len(texts) and texts[i][:1] == " " and texts[i].strip()]
    return spaced[0] if spaced else 0


def fact_tokens(vocab: Vocabulary, fact: ChatFact) -> tuple[np.ndarray, np.ndarray]:
    """The fact's sentence as ids, 1 at the tokens of its name and value."""
    return retention.marked_tokens(vocab.tok, fact.sentence, fact.spans)


def build_document(vocab: Vocabulary, filler: np.ndarray, facts: Sequence[ChatFact],
                   n_filler: int, extra: int, rng: np.random.Generator) -> Document:
    """``n_filler + extra`` filler tokens from a sentence start, each fact's
    sentence (:func:`fact_tokens`) inserted near its depth, within the first
    ``n_filler``."""
    window = retention.filler_window(filler, n_filler + extra + SNAP_REACH, rng, wrap=True)
    window = np.where(window == vocab.eos, vocab.newline, window)
    start = _sentence_start([vocab.texts[i] for i in window[:SNAP_REACH]])
    body = window[start:start + n_filler + extra]
    texts = [vocab.texts[i] for i in body] + [" "]  # a cut may fall after the last token
    _, ends, words = retention.boundaries(texts, None)
    ends = [e for e in ends if texts[e][:1] in (" ", "\n")]  # not before a closing mark
    order = sorted(range(len(facts)), key=lambda i: facts[i].depth)
    cuts, at = [], 0
    for i in order:
        at = min(max(at, retention.snap(round(facts[i].depth * n_filler), ends, words,
                                        SNAP_REACH)), n_filler)
        cuts.append(at)
    sentences = [fact_tokens(vocab, facts[i]) for i in order]
    ids, marks, starts = retention.insert_sentences(body, sentences, cuts)
    is_filler = np.ones(len(ids), bool)
    by_fact = [0] * len(facts)
    for i, s, (sentence, _) in zip(order, starts, sentences):
        is_filler[s:s + len(sentence)] = False
        by_fact[i] = s
    return Document(ids, marks, is_filler, by_fact)


@dataclass(frozen=True)
class Passage:
    """A passage question: the quoted words, the words after them, and the
    answer's tokens (start, stop) in the document."""

    quote: str
    answer: str
    source: tuple[int, int]
    depth: float


def _passage_at(vocab: Vocabulary, doc: Document, words: np.ndarray, p: int, limit: int,
                taken: np.ndarray, text: str, rng: np.random.Generator) -> Passage | None:
    """The passage question quoting the words from token ``p``, if it is one: a
    line of filler in the first ``limit`` tokens, untaken, quoted text found once."""
    k, m = int(rng.integers(QUOTE_WORDS[0], QUOTE_WORDS[1] + 1)), int(
        rng.integers(ANSWER_WORDS[0], ANSWER_WORDS[1] + 1))
    at = int(np.searchsorted(words, p))
    if at + k + m >= len(words):
        return None
    q, r = int(words[at + k]), int(words[at + k + m])
    span = "".join(vocab.texts[i] for i in doc.ids[p:r])
    if (r > limit or q - p > QUOTE_TOKENS or r - q > ANSWER_TOKENS or not doc.filler[p:r].all()
            or taken[p:r].any() or "\n" in span or '"' in span):
        return None
    quote = vocab.tok.decode(doc.ids[p:q].tolist()).strip()
    answer = vocab.tok.decode(doc.ids[q:r].tolist()).strip()
    if not (any(c.isalpha() for c in quote) and any(c.isalpha() for c in answer)) \
            or text.count(quote) != 1:
        return None
    return Passage(quote, answer, (q, r), p / len(doc.ids))


def pick_passages(vocab: Vocabulary, doc: Document, count: int, limit: int,
                  rng: np.random.Generator, near: float | None = None) -> list[Passage]:
    """Up to ``count`` passage questions about the filler of the first ``limit``
    tokens, not overlapping, started at random words (or at the words nearest
    the depth ``near``)."""
    texts = [vocab.texts[i] for i in doc.ids]
    words = np.asarray(retention.boundaries(texts, None)[2], np.int64)
    starts = words[np.asarray([texts[i].startswith(" ") for i in words], bool)]
    text = vocab.tok.decode(doc.ids.tolist())
    taken = np.zeros(len(doc.ids), bool)
    passages: list[Passage] = []
    for _ in range(count):
        order = rng.permutation(starts) if near is None else starts[
            np.argsort(np.abs(starts - near * limit) + rng.random(len(starts)))]
        for p in order[:PASSAGE_TRIES]:
            found = _passage_at(vocab, doc, words, int(p), limit, taken, text, rng)
            if found:
                passages.append(found)
                taken[int(p):found.source[1]] = True
                break
    return passages


def passage_question(rng: np.random.Generator, phrasings: Phrasings, passage: Passage
                     ) -> tuple[str, str]:
    """A passage's question and answer in random phrasings of the split."""
    return (str(rng.choice(phrasings.passage_questions)).format(quote=passage.quote),
            str(rng.choice(phrasings.passage_answers)).format(value=passage.answer))


def draw_distractors(rng: np.random.Generator, phrasings: Phrasings,
                     asked: Sequence[ChatFact]) -> list[ChatFact]:
    """Up to ``DISTRACTORS`` facts the document states and no question asks, about
    other subjects; with probability ``SAME_KIND_SHARE`` of the asked facts' kinds,
    so that an answer has to be found by its subject, not by its kind."""
    kinds = [f.kind for f in asked] if rng.random() < SAME_KIND_SHARE else None
    return draw_chat_facts(rng, phrasings, int(rng.integers(0, DISTRACTORS + 1)), kinds=kinds,
                           taken={f.subject for f in asked})


def training_sequence(vocab: Vocabulary, filler: np.ndarray, phrasings: Phrasings, *,
                      seq_len: int, max_facts: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One sequence of ``seq_len + 1`` tokens: a document and its 1 to
    ``max_facts`` questions, with the content marks (0 outside the document)."""
    total = seq_len + 1
    n = int(rng.integers(1, max_facts + 1))
    n_passages = int(rng.binomial(n - 1, PASSAGE_SHARE))  # one fact at least
    facts = draw_chat_facts(rng, phrasings, n - n_passages)
    turns = [vocab.encode(CHAT.turn(f.question, f.answer)) for f in facts]
    framing = len(vocab.document_prefix) + len(vocab.document_suffix)
    limit = total - framing - sum(map(len, turns)) - n_passages * PASSAGE_RESERVE
    n_filler = limit - sum(len(fact_tokens(vocab, f)[0]) for f in facts)
    room = n_filler // 2  # distractors take at most half of the filler's tokens
    for extra in draw_distractors(rng, phrasings, facts):
        size = len(fact_tokens(vocab, extra)[0])
        if size <= room:
            facts.append(extra)
            room, n_filler = room - size, n_filler - size
    if n_filler < MIN_FILLER:
        raise ValueError(f"{n} questions leave {n_filler} filler tokens in a {seq_len}-token "
                         "sequence: lower --max-facts or raise --seq-len")
    doc = build_document(vocab, filler, facts, n_filler, n_passages * PASSAGE_RESERVE, rng)
    marks = doc.marks.copy()
    for passage in pick_passages(vocab, doc, n_passages, limit, rng):
        turn = vocab.encode(CHAT.turn(*passage_question(rng, phrasings, passage)))
        if len(turn) <= PASSAGE_RESERVE:
            turns.append(turn)
            marks[slice(*passage.source)] = 1
    turns = [turns[i] for i in rng.permutation(len(turns))]
    keep = total - framing - sum(map(len, turns))
    ids = np.concatenate([vocab.document_prefix, doc.ids[:keep], vocab.document_suffix, *turns])
    marks = np.concatenate([np.zeros(len(vocab.document_prefix), np.uint8), marks[:keep],
                            np.zeros(total - len(vocab.document_prefix) - keep, np.uint8)])
    return ids, marks


def training_sequences(tok: Tokenizer, filler: np.ndarray, *, seq_len: int, count: int,
                       max_facts: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``count`` training sequences (:func:`training_sequence`) from the training
    phrasings, names and places."""
    rng = np.random.default_rng(seed)
    vocab, phrasings = vocabulary(tok), load_phrasings("train")
    for _ in range(count):
        yield training_sequence(vocab, filler, phrasings, seq_len=seq_len,
                                max_facts=max_facts, rng=rng)


def eval_document(vocab: Vocabulary, filler: np.ndarray, phrasings: Phrasings, *,
                  length: int, facts: int, depth: float, passages: int,
                  rng: np.random.Generator) -> dict[str, Any]:
    """One held-out document whose ingest string is ``length`` tokens: ``facts``
    facts spread over a band at ``depth`` and ``passages`` passage questions
    near it, with their questions, answers and accepted answers; ``text`` is the
    document as a user pastes it, ``text_prefix`` the same in the chat framing."""
    drawn = draw_chat_facts(rng, phrasings, facts, retention.band_depths(depth, facts),
                            kinds=phrasings.study_kinds)
    n_doc = length - len(vocab.document_prefix) - len(vocab.document_suffix)
    n_filler = n_doc - sum(len(fact_tokens(vocab, f)[0]) for f in drawn)
    if n_filler < 1:
        raise ValueError(f"{facts} facts do not fit in a {length}-token document")
    doc = build_document(vocab, filler, drawn, n_filler, 0, rng)
    questions = [{"question": f.question, "answer": f.answer, "accepted": list(f.accepted),
                  "kind": f.kind, "depth": round(s / n_doc, 3)}
                 for f, s in zip(drawn, doc.starts)]
    for passage in pick_passages(vocab, doc, passages, n_doc, rng, near=depth):
        question, answer = passage_question(rng, phrasings, passage)
        questions.append({"question": question, "answer": answer, "accepted": [answer],
                          "kind": "passage", "depth": round(passage.depth, 3)})
    text = vocab.tok.decode(doc.ids.tolist())
    prefix = CHAT.ingest(text)
    return {"text": text, "text_prefix": prefix, "questions": questions, "length": length,
            "tokens": len(vocab.encode(prefix)), "facts": facts}


def eval_documents(tok: Tokenizer, filler: np.ndarray, *, lengths: Sequence[int],
                   facts_per_doc: Sequence[int], depths: Sequence[float], passages: int,
                   count: int, seed: int) -> Iterator[dict[str, Any]]:
    """Held-out documents (:func:`eval_document`), ``count`` per (length, facts,
    depth), from the evaluation phrasings, names and places."""
    rng = np.random.default_rng(seed)
    vocab, phrasings = vocabulary(tok), load_phrasings("eval")
    for length in lengths:
        for n in facts_per_doc:
            for depth in depths:
                for i in range(count):
                    doc = eval_document(vocab, filler, phrasings, length=length, facts=n,
                                        depth=depth, passages=passages, rng=rng)
                    yield doc | {"depth": depth, "index": i, "seed": seed}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module's description)."""
    parser, ev = retention.task_parser("python -m train.retention_chat", __doc__,
                                       seq_len=4096)
    ev.add_argument("--passages", type=int, default=1, help="passage questions per document")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: _build(args))


def _build(args: argparse.Namespace) -> int:
    corpus = Path(args.corpus)
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    if args.command == "train":
        rows = list(training_sequences(tok, data.read_tokens(corpus / "train"),
                                       seq_len=args.seq_len, count=args.sequences,
                                       max_facts=args.max_facts, seed=args.seed))
        retention.write_training_shards(rows, Path(args.out), meta={
            "split": "retention-chat-train", "seq_len": args.seq_len, "seed": args.seed,
            "max_facts": args.max_facts, "loss_start": LOSS_START, "loss_stop": LOSS_STOP,
            "tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})
        print(f"wrote {args.out} and {args.out}{retention.MARKS_SUFFIX}: {len(rows)} sequences "
              f"of {args.seq_len + 1} tokens")
        return 0
    docs = eval_documents(tok, data.read_tokens(corpus / "heldout"),
                          lengths=retention.int_list(args.lengths),
                          facts_per_doc=retention.int_list(args.facts),
                          depths=[float(d) for d in args.depths.split(",")],
                          passages=args.passages, count=args.count, seed=args.seed)
    retention.write_jsonl(Path(args.out), docs)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
