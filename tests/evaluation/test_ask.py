"""The containment scoring rule (coda_db.scoring, which train.evaluation.ask and the
demo use) and the questions file's checks."""

from __future__ import annotations

import json

import pytest

from coda_db.scoring import accepted_answers, is_right, normalise
from train.evaluation.ask import read_questions


@pytest.mark.parametrize("reply, expected, right", [
    ("It was designed by Agnes Polworth.", "Agnes Polworth", True),
    ("AGNES   polworth, the engineer", "Agnes Polworth", True),
    ("In 1962, a storm...", "1962", True),
    ("In 19621 ...", "1962", False),          # whole words only
    ("Agnes Polwortham", "Agnes Polworth", False),
    ("The code is KX-4471.", "KX-4471", True),  # punctuation normalised on both sides
    ("The code is KX 4718", "KX-4471", False),
    ("", "Saltmere", False),
    ("anything at all", ["--", "Saltmere"], False),  # a form that normalises to nothing
    ("The hopper holds 250 grams.", ["250 grams", "250"], True),
    ("The rent is $45,000.", ["45 pounds", "45"], False),  # a number is one word
    ("It raised 318,000 pounds", "318", False),
    ("The court awarded 6,475 pounds.", "6,475", True),    # separators on both sides
    ("The court awarded 6475 pounds.", "6,475", True),
    ("Use 3.5 litres.", "3.5", True),
    ("Use 3.5 litres.", "3", False),                       # the decimal point is kept
    ("Items 1,2 and 3", "2", True),                        # not a thousands separator
])
def test_the_scoring_rule(reply, expected, right):
    assert is_right(reply, expected) is right


def test_normalise():
    assert normalise("  Café—déjà_vu!! 42 ") == "café déjà vu 42"
    assert normalise("$1,800, then 2.5%.") == "1800 then 2.5"


def test_bundled_question_files_state_the_rule_they_are_scored_by():
    from pathlib import Path

    from coda_db.scoring import SCORING_RULE
    root = Path(__file__).resolve().parents[2]
    for path in ("coda_db/demo_documents_v2.json", "train/data_files/freeform_heldout.json"):
        assert json.loads((root / path).read_text())["scoring"] == SCORING_RULE, path


def test_accepted_answers():
    assert accepted_answers({"answer": "45 pounds", "accepted": ["45 pounds", "45"]}) == [
        "45 pounds", "45"]
    assert accepted_answers({"expected": "Agnes"}) == ["Agnes"]
    assert accepted_answers({"answer": "x", "accepted": []}) == ["x"]
    assert accepted_answers({"question": "?"}) == []


def test_bad_question_files_are_refused_by_name(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"docs": []}))
    with pytest.raises(ValueError, match="not a questions file"):
        read_questions(bad)
    bad.write_text(json.dumps({"documents": [{"text": "x", "questions": [{"question": "y"}]}]}))
    with pytest.raises(ValueError, match="'expected' answer"):
        read_questions(bad)
    good = {"documents": [{"text": "x", "questions": [{"question": "y", "expected": "z"}]}]}
    bad.write_text(json.dumps(good))
    assert read_questions(bad)[0]["text"] == "x"
