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
])
def test_the_scoring_rule(reply, expected, right):
    assert is_right(reply, expected) is right


def test_normalise():
    assert normalise("  Café—déjà_vu!! 42 ") == "café déjà vu 42"


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
