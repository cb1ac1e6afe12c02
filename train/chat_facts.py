"""The facts of the chat retention task (``train.retention_chat``): fact kinds with
their subjects (a person, an organisation, a town, a product or a building) and their
sentence, question and answer phrasings (``data_files/retention_chat_facts.json``,
each split into training and held-out phrasings), values drawn for them, and the
equivalent forms an answer may take."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np

from . import retention

FACTS_FILE = Path(__file__).parent / "data_files" / "retention_chat_facts.json"
SUBJECTS = ("person", "organisation", "town", "product", "building")
INTEGERS = {"year": (1850, 2016), "count": (2, 100), "level": (1, 10), "members": (20, 1000)}
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve "
                "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()


@dataclass(frozen=True)
class Kind:
    """A fact kind with the phrasings of one split: the type of its value, what
    its subject is (``SUBJECTS``), its extra slots (slot -> pool), and its
    sentences, questions and answers."""

    name: str
    value: str
    subject: str
    slots: Mapping[str, str]
    sentences: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Phrasings:
    """Everything one split draws from: the fact kinds, the passage questions
    and answers, and the pools (names and places of the split, and the value
    and slot lists of the facts file), and the kinds the retention study's
    held-out documents draw from."""

    kinds: Mapping[str, Kind]
    study_kinds: tuple[str, ...]
    passage_questions: tuple[str, ...]
    passage_answers: tuple[str, ...]
    pools: Mapping[str, Sequence[str]]


def load_phrasings(split: str) -> Phrasings:
    """The phrasings of one split (``"train"`` or ``"eval"``)."""
    pools = retention.load_pools(split)
    spec = json.loads(FACTS_FILE.read_text())
    kinds = {name: Kind(name, k["value"], k.get("subject", "person"), k.get("slots", {}),
                        tuple(k["sentences"][split]), tuple(k["questions"][split]),
                        tuple(k["answers"]))
             for name, k in spec["kinds"].items()}
    passage = spec["passage"]
    return Phrasings(kinds, tuple(spec["study_kinds"]), tuple(passage["questions"][split]),
                     tuple(passage["answers"]), pools | spec["pools"])


@dataclass(frozen=True)
class ChatFact:
    """A fact about ``subject`` as the document states it (``sentence``, with a
    leading space, and the character spans of its subject and value) and as it
    is asked for."""

    kind: str
    subject: str
    sentence: str
    spans: tuple[tuple[int, int], ...]
    question: str
    answer: str
    accepted: tuple[str, ...]
    depth: float


def fill(template: str, slots: Mapping[str, object], marked: Sequence[str]
         ) -> tuple[str, tuple[tuple[int, int], ...]]:
    """``template`` with its ``{slot}`` (or ``{slot[form]}``) fields filled, and
    the character spans (start, stop) where the ``marked`` slots landed."""
    formatter = string.Formatter()
    text, spans = "", []
    for literal, field, _, _ in formatter.parse(template):
        text += literal
        if field is not None:
            filled = str(formatter.get_field(field, (), slots)[0])
            if field in marked:
                spans.append((len(text), len(text) + len(filled)))
            text += filled
    return text, tuple(spans)


def draw_chat_value(rng: np.random.Generator, pools: Mapping[str, Sequence[str]],
                    value_type: str) -> str:
    """A random value of a kind's value type (see the facts file's ``value``)."""
    pick = {"profession": "professions", "colour": "colours", "given_name": "first_names",
            "action": "actions"}
    if value_type in ("place", "code", "number", "date"):
        return retention.draw_value(rng, pools, value_type)
    if value_type in pick:
        return str(rng.choice(pools[pick[value_type]]))
    if value_type in INTEGERS:
        return str(int(rng.integers(*INTEGERS[value_type])))
    if value_type == "person":
        return f"{rng.choice(pools['first_names'])} {rng.choice(pools['last_names'])}"
    if value_type == "population":
        return f"{int(rng.integers(1000, 90000)):,}"
    if value_type == "pounds":
        return f"{int(rng.integers(5, 5000)):,} pounds"
    if value_type == "price":
        return f"${int(rng.integers(20, 50000)):,}"
    if value_type == "company":
        return f"{rng.choice(pools['last_names'])} {rng.choice(pools['company_suffixes'])}"
    if value_type == "street":
        return (f"{int(rng.integers(1, 300))} {rng.choice(pools['last_names'])} "
                f"{rng.choice(pools['street_types'])}")
    raise ValueError(f"no value of type {value_type!r}")


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def accepted_forms(value_type: str, value: str) -> tuple[str, ...]:
    """``value`` and the forms an answer may equally give it in (``March 4, 1987``
    as ``4 March 1987``, ``$1,250`` as ``1250``, ``KX-4821`` as ``KX4821``,
    ``12`` as ``twelve``)."""
    forms = [value]
    if value_type == "date":
        month, rest = value.split(" ", 1)
        day, year = rest.split(", ")
        forms += [f"{day} {month} {year}", f"{month} {_ordinal(int(day))}, {year}"]
    elif value_type == "price":
        forms += [value[1:], value[1:].replace(",", ""), f"{value[1:].replace(',', '')} dollars"]
    elif value_type == "code":
        forms += [value.replace("-", ""), value.replace("-", " ")]
    elif value_type in ("count", "level") and int(value) < len(NUMBER_WORDS):
        forms.append(NUMBER_WORDS[int(value)])
    elif value_type == "person":
        forms.append(value.split(" ", 1)[1])
    elif value_type in ("pounds", "population"):
        number = value.split(" ")[0]
        forms += [number, number.replace(",", "")]
    return tuple(dict.fromkeys(forms))


def draw_subject(rng: np.random.Generator, pools: Mapping[str, Sequence[str]], subject: str,
                 taken: Collection[str]) -> str:
    """A subject of the type ``subject`` (one of ``SUBJECTS`` but a person) that is
    not in ``taken``: an organisation (``Harlow Rowing Club``), a town of the
    split, a product (``Harlow KT-40 kettle``) or a building (``Harlow Library``)."""
    while True:
        last = str(rng.choice(pools["last_names"]))
        if subject == "organisation":
            drawn = f"{last} {rng.choice(pools['organisation_types'])}"
        elif subject == "town":
            drawn = str(rng.choice(pools["places"]))
        elif subject == "product":
            code = "".join(rng.choice(list(string.ascii_uppercase), 2))
            number = int(rng.integers(10, 100))
            drawn = f"{last} {code}-{number} {rng.choice(pools['product_types'])}"
        elif subject == "building":
            drawn = f"{last} {rng.choice(pools['building_types'])}"
        else:
            raise ValueError(f"no subject of type {subject!r} (one of {', '.join(SUBJECTS)})")
        if drawn not in taken:
            return drawn


def _draw_slot(rng: np.random.Generator, pool: Sequence) -> object:
    """One entry of a slot's pool: a string, or an object of forms (``{event[did]}``)."""
    if isinstance(pool[0], dict):
        return pool[int(rng.integers(len(pool)))]
    return str(rng.choice(pool))


def draw_chat_facts(rng: np.random.Generator, phrasings: Phrasings, count: int,
                    depths: Sequence[float] | None = None, kinds: Sequence[str] | None = None,
                    taken: Collection[str] = ()) -> list[ChatFact]:
    """``count`` facts about different subjects (none of them in ``taken``), each
    of a random kind of ``kinds`` (default: every kind), value and phrasing, at
    the given depths (default: uniform)."""
    facts, names = [], list(kinds or phrasings.kinds)
    people = retention.draw_people(rng, phrasings.pools, count + len(taken))
    people = [p for p in people if p not in taken][:count]
    subjects = set(taken) | set(people)
    for i, person in enumerate(people):
        kind = phrasings.kinds[str(rng.choice(names))]
        name = person
        if kind.subject != "person":
            name = draw_subject(rng, phrasings.pools, kind.subject, subjects)
            subjects.add(name)
        value = draw_chat_value(rng, phrasings.pools, kind.value)
        slots = {"name": name, "value": value, "a": "an" if value[0] in "aeiou" else "a"} | {
            slot: _draw_slot(rng, phrasings.pools[pool]) for slot, pool in kind.slots.items()}
        sentence, spans = fill(" " + str(rng.choice(kind.sentences)), slots, ("name", "value"))
        depth = float(rng.random()) if depths is None else float(depths[i % len(depths)])
        facts.append(ChatFact(kind.name, name, sentence, spans,
                              str(rng.choice(kind.questions)).format(**slots),
                              str(rng.choice(kind.answers)).format(**slots),
                              accepted_forms(kind.value, value), depth))
    return facts
