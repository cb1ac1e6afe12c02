"""The chat retention task (train.retention_chat): the chat framing, the fact
kinds and their held-out phrasings, training sequences whose loss counts the
answers only, passage questions, and the evaluation documents."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from text_corpus import text_corpus

from coda_jax.chat_template import render_chat
from train import data
from train import chat_facts
from train import retention_chat as rc
from train.config import DataSection, TrainConfig
from train.steps import loss_span, span_weights

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The test corpus, its tokenizer given SmolLM2's chat tokens."""
    built = text_corpus(tmp_path_factory.mktemp("retention_chat"))
    tok = data.load_tokenizer(built / "tokenizer.json")
    tok.add_special_tokens(CHAT_TOKENS)
    data.save_tokenizer(tok, built / "tokenizer.json")
    return built


@pytest.fixture(scope="module")
def tok(corpus):
    return data.load_tokenizer(corpus / "tokenizer.json")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)))


def test_the_chat_strings_come_from_the_template():
    assert rc.DOCUMENT_PREFIX == ("<|im_start|>system\nYou are a helpful AI assistant named "
                                  "SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n")
    assert rc.DOCUMENT_SUFFIX == rc.ANSWER_SUFFIX == "<|im_end|>\n"
    assert rc.QUESTION_PREFIX == "<|im_start|>user\n"
    assert rc.QUESTION_SUFFIX == "<|im_end|>\n<|im_start|>assistant\n"
    assert (rc.LOSS_START, rc.LOSS_STOP) == ("<|im_start|>assistant\n", "<|im_end|>")
    messages = [{"role": "user", "content": "DOC"}, {"role": "user", "content": "Q?"}]
    assert render_chat(rc.CHAT_TEMPLATE, messages) == (rc.CHAT.ingest("DOC") + rc.QUESTION_PREFIX
                                                       + "Q?" + rc.QUESTION_SUFFIX)
    uneven = "{% for m in messages %}{{ m['content'] }}{{ loop.index }}{% endfor %}"
    with pytest.raises(ValueError, match="alike"):
        rc.chat_format(uneven)


def test_every_kind_has_held_out_phrasings():
    train, held_out = rc.load_phrasings("train"), rc.load_phrasings("eval")
    assert len(train.kinds) >= 12 and set(train.kinds) == set(held_out.kinds)
    for name, kind in train.kinds.items():
        other = held_out.kinds[name]
        for ours, theirs in ((kind.sentences, other.sentences), (kind.questions, other.questions)):
            assert len(ours) >= 3 and len(theirs) >= 2 and not set(ours) & set(theirs)
        assert all("{name}" in s and "{value}" in s for s in kind.sentences + other.sentences)
        assert all("{name}" in q and "{value}" not in q for q in kind.questions + other.questions)
        assert all("{value}" in a for a in kind.answers)
        assert all(pool in train.pools for pool in kind.slots.values())
    assert not set(train.passage_questions) & set(held_out.passage_questions)


def test_facts_state_and_answer_their_value():
    phrasings = rc.load_phrasings("train")
    facts = rc.draw_chat_facts(np.random.default_rng(0), phrasings, 60)
    assert len({f.kind for f in facts}) >= 10
    for f in facts:
        spanned = [f.sentence[a:b] for a, b in f.spans]  # the name and the value
        assert len(spanned) == 2 and f.accepted[0] in spanned and f.accepted[0] in f.answer
        assert f.sentence.startswith(" ") and f.sentence.endswith(".")
    assert chat_facts.accepted_forms("date", "March 3, 1987") == ("March 3, 1987", "3 March 1987",
                                                          "March 3rd, 1987")
    assert chat_facts.accepted_forms("price", "$1,250")[1:3] == ("1,250", "1250")
    assert chat_facts.accepted_forms("count", "12") == ("12", "twelve")


def test_facts_have_subjects_of_their_kinds_and_forms_of_their_slots():
    phrasings = rc.load_phrasings("train")
    rng = np.random.default_rng(5)
    facts = chat_facts.draw_chat_facts(rng, phrasings, 400)
    subjects = [f.subject for f in facts]
    assert len(set(subjects)) == len(subjects)  # every fact is about another subject
    seen = {phrasings.kinds[f.kind].subject for f in facts}
    assert seen == set(chat_facts.SUBJECTS)
    types = {"organisation": phrasings.pools["organisation_types"],
             "building": phrasings.pools["building_types"],
             "product": phrasings.pools["product_types"]}
    for f in facts:
        subject = phrasings.kinds[f.kind].subject
        assert f.subject in f.sentence and f.subject in f.question
        if subject in types:
            assert any(f.subject.endswith(" " + t) for t in types[subject])
        if subject == "product":
            assert re.fullmatch(r"\w+ [A-Z]{2}-\d\d .+", f.subject)
        if subject == "town":
            assert f.subject in phrasings.pools["places"]
        if f.kind == "town_event":  # a pool of forms: the statement's and the question's
            event = next(e for e in phrasings.pools["town_events"] if e["did"] in f.sentence)
            assert event["do"] in f.question and event["did"] not in f.question
    taken = set(subjects[:50])
    more = chat_facts.draw_chat_facts(rng, phrasings, 50, kinds=["chair", "mayor"], taken=taken)
    assert {f.kind for f in more} == {"chair", "mayor"}
    assert not {f.subject for f in more} & taken
    assert chat_facts.accepted_forms("person", "Ada Lark") == ("Ada Lark", "Lark")
    assert chat_facts.accepted_forms("pounds", "1,250 pounds") == ("1,250 pounds", "1,250", "1250")
    with pytest.raises(ValueError, match="subject"):
        chat_facts.draw_subject(rng, phrasings.pools, "planet", set())


def test_the_study_documents_draw_only_the_study_kinds():
    held_out = rc.load_phrasings("eval")
    assert set(held_out.study_kinds) < set(held_out.kinds)
    assert all(held_out.kinds[k].subject == "person" for k in held_out.study_kinds)
    rng = np.random.default_rng(6)
    facts = chat_facts.draw_chat_facts(rng, held_out, 200, kinds=held_out.study_kinds)
    assert {f.kind for f in facts} == set(held_out.study_kinds)


def test_distractors_are_stated_and_not_asked(tok, corpus, monkeypatch):
    vocab, phrasings = rc.vocabulary(tok), rc.load_phrasings("train")
    rng = np.random.default_rng(7)
    asked = chat_facts.draw_chat_facts(rng, phrasings, 2)
    drawn = [rc.draw_distractors(rng, phrasings, asked) for _ in range(200)]
    assert max(map(len, drawn)) == rc.DISTRACTORS and min(map(len, drawn)) == 0
    kinds = {f.kind for f in asked}
    same = [d for d in drawn if len(d) >= 3 and {f.kind for f in d} <= kinds]
    assert 40 < len(same) < 160  # about SAME_KIND_SHARE of them
    assert all(f.subject not in {a.subject for a in asked} for d in drawn for f in d)
    stated = []

    def recorded(*args):
        stated[:] = draw(*args)
        return stated

    draw = rc.draw_distractors
    monkeypatch.setattr(rc, "draw_distractors", recorded)
    filler = data.read_tokens(corpus / "train")
    for seed in range(20):
        ids, _ = rc.training_sequence(vocab, filler, phrasings, seq_len=1535, max_facts=1,
                                      rng=np.random.default_rng(seed))
        if stated:
            break
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    document, *turns = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S)
    assert len(turns) == 1 and stated
    for f in stated:
        assert f.sentence.strip() in document and f.subject not in turns[0]


def test_documents_mark_names_values_and_passage_sources(tok, corpus):
    vocab = rc.vocabulary(tok)
    filler = data.read_tokens(corpus / "train")
    rng = np.random.default_rng(1)
    facts = rc.draw_chat_facts(rng, rc.load_phrasings("train"), 4)
    doc = rc.build_document(vocab, filler, facts, 900, 0, rng)
    for f, start in zip(facts, doc.starts):
        ids, marks = rc.fact_tokens(vocab, f)
        assert doc.ids[start:start + len(ids)].tolist() == ids.tolist()
        marked = tok.decode(ids[marks == 1].tolist())
        assert all(f.sentence[a:b].replace(" ", "") in marked.replace(" ", "")
                   for a, b in f.spans)
    assert doc.marks.sum() == sum(rc.fact_tokens(vocab, f)[1].sum() for f in facts)
    text = tok.decode(doc.ids.tolist())
    passages = rc.pick_passages(vocab, doc, 3, len(doc.ids), rng)
    assert passages
    for p in passages:
        assert text.count(p.quote) == 1 and 4 <= len(p.quote.split()) <= 6
        after = text[text.index(p.quote) + len(p.quote):].lstrip()
        assert after.startswith(p.answer) and 4 <= len(p.answer.split()) <= 8
        assert tok.decode(doc.ids[slice(*p.source)].tolist()).strip() == p.answer


def test_the_loss_counts_the_answers_and_their_end_of_turn(tok, corpus):
    span = loss_span(TrainConfig(data=DataSection(loss_start=rc.LOSS_START,
                                                  loss_stop=rc.LOSS_STOP)), tok)
    assert span.stop == (tok.token_to_id("<|im_end|>"),)
    rows = list(rc.training_sequences(tok, data.read_tokens(corpus / "train"), seq_len=1535,
                                      count=8, max_facts=4, seed=2))
    head = len(tok.encode(rc.DOCUMENT_PREFIX).ids)
    for ids, marks in rows:
        assert ids.shape == marks.shape == (1536,)
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert text.startswith(rc.DOCUMENT_PREFIX)
        answers = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, re.S)
        assert answers and text.endswith(rc.ANSWER_SUFFIX)
        weights = np.asarray(span_weights(jnp.asarray(ids[None]), span))[0]
        counted = tok.decode(ids[1:][weights == 1].tolist(), skip_special_tokens=False)
        assert counted == "".join(a + rc.LOSS_STOP for a in answers)
        document_end = head + ids[head:].tolist().index(tok.token_to_id("<|im_end|>"))
        assert marks[:head].sum() == 0 and marks[document_end:].sum() == 0
        assert 0 < marks.sum()


def test_the_command_line_writes_shards_and_held_out_documents(corpus, tok, tmp_path):
    out = tmp_path / "chat"
    assert rc.main(["train", str(out), "--corpus", str(corpus), "--seq-len", "1023",
                    "--sequences", "3", "--max-facts", "3"]) == 0
    tokens, marks = data.read_tokens(out), data.read_tokens(f"{out}_marks")
    assert tokens.shape == marks.shape == (3 * 1024,)
    assert data.read_shards_meta(out)["meta"]["loss_stop"] == "<|im_end|>"
    heldout = data.read_tokens(corpus / "heldout")
    assert len(heldout) < 16384  # the long document reads the held-out split round again
    docs_path = tmp_path / "eval.jsonl"
    assert rc.main(["eval", str(docs_path), "--corpus", str(corpus), "--lengths", "512,16384",
                    "--facts", "1,5", "--depths", "0.5", "--count", "1"]) == 0
    docs = [json.loads(line) for line in docs_path.read_text().splitlines()]
    assert [(d["length"], d["facts"]) for d in docs] == [(512, 1), (512, 5), (16384, 1),
                                                          (16384, 5)]
    held_out, seen = rc.load_phrasings("eval"), rc.load_phrasings("train")
    for doc in docs:
        prefix = doc["text_prefix"]
        assert prefix.startswith(rc.DOCUMENT_PREFIX) and prefix.endswith(rc.DOCUMENT_SUFFIX)
        assert abs(doc["tokens"] - doc["length"]) <= 4
        facts = [q for q in doc["questions"] if q["kind"] != "passage"]
        assert len(facts) == doc["facts"] and len(doc["questions"]) <= doc["facts"] + 1
        for q in doc["questions"]:
            assert q["accepted"][0] in q["answer"] and q["accepted"][0] in prefix
            if q["kind"] == "passage":
                continue
            # (a short document is mostly fact sentences: they spread its depths)
            assert 0.4 < q["depth"] < 0.6 or doc["length"] < 16384
            assert any(_pattern(t).fullmatch(q["question"])
                       for t in held_out.kinds[q["kind"]].questions)
            assert not any(_pattern(t).fullmatch(q["question"])
                           for t in seen.kinds[q["kind"]].questions)


def test_a_tokenizer_without_the_chat_tokens_is_refused(corpus, tmp_path):
    plain = text_corpus(tmp_path)
    with pytest.raises(ValueError, match="im_end"):
        rc.vocabulary(data.load_tokenizer(plain / "tokenizer.json"))
