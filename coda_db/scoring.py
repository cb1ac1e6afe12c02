"""Whether a free-form reply answers a question: the containment rule, in one place.

``coda-db demo`` scores the replies to its chat-format documents
(``demo_documents_v2.json``) with it, ``python -m train.evaluation ask`` a
chat model's replies, and ``tools/check_documents.py`` checks documents
against it: a reply is right when one of the question's accepted answers,
normalised, lies in the normalised reply as whole words.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

SCORING_RULE = ("a reply is right when one of the accepted answers, normalised, is contained "
                "in the normalised reply as whole words (normalised: lower case, a number's "
                "thousands separators removed and its decimal point kept, so that 45,000 is "
                "one word and not 45; every other run of characters other than letters and "
                "digits made one space)")

# A comma between a digit and exactly three more: "45,000" is 45000, "1,2" stays two numbers.
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A word: a decimal number ("3.5"), else a run of letters and digits.
_WORD = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")


def normalise(text: str) -> str:
    """Lower case; a number's thousands separators removed and its decimal point kept
    (a reply of "$45,000" does not contain the answer "45"); every other run of
    characters other than letters and digits one space."""
    return " ".join(_WORD.findall(_THOUSANDS_SEPARATOR.sub("", text.lower())))


def is_right(reply: str, accepted: str | Sequence[str]) -> bool:
    """The scoring rule: one accepted form (or the one answer), normalised, lies in
    the normalised reply as whole words; a form that normalises to nothing never does."""
    forms = [accepted] if isinstance(accepted, str) else list(accepted)
    padded = f" {normalise(reply)} "
    return any(normalise(form) and f" {normalise(form)} " in padded for form in forms)


def accepted_answers(question: Mapping[str, Any]) -> list[str]:
    """Every accepted form of a question's answer (``accepted``, else ``expected``
    or ``answer``); empty when it has none."""
    accepted = question.get("accepted")
    if isinstance(accepted, list) and accepted and all(isinstance(a, str) for a in accepted):
        return list(accepted)
    expected = question.get("expected", question.get("answer"))
    return [expected] if isinstance(expected, str) else []
