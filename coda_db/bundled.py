"""The default model shipped inside the package, and the demo's documents.

``coda_db/default_model/`` holds one of two bundle formats, told apart by the
marker in its ``card.json`` (``card["bundle"]["format"]``); both are written by
``python -m train.bundle``:

    coda_jax.default_model_bundle/1    the whole model as a coda_jax checkpoint (bf16):
                                       meta/, tree/, checksums.json, tokenizer.json,
                                       card.json
    coda_db.adapter_bundle/1           CoDA adapters over a pretrained base that is
                                       not shipped (:mod:`.adapter_bundle`): card.json,
                                       export.json and model-NNNNN.safetensors (a
                                       base-relative export, convert.model_export)

    coda_db/demo_documents.json        three held-out documents with their questions
                                       and exact answers (``python -m train.demo_documents``)
    coda_db/demo_documents_v2.json     three hand-written documents with free-form
                                       questions, each with its accepted answers, scored
                                       by :mod:`.scoring` (the demo of a chat-format
                                       bundle: an adapter bundle)

``card.json`` is the training export's model card (architecture, bank,
training data and steps, recommended prompt and sampling in ``database``,
measured results) plus ``bundle`` (the format's marker), ``weights_sha256``
(the fingerprint of the weights as opened: :func:`coda_jax.checkpoint.weights_fingerprint`
of the loaded model, what the database records with every state) and
``tokenizer_sha256``; an adapter bundle's card adds ``base``, the pin of its
base (wheel, version, file, sha256, dtype). A package built without a trained
model has no ``default_model/`` (or one without a card): :func:`bundled_model_path`
is then None and the commands ask for ``--model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convert.model_export import INDEX as EXPORT_INDEX

PACKAGE_DIR = Path(__file__).parent
BUNDLE_DIR = PACKAGE_DIR / "default_model"
DEMO_DOCUMENTS = PACKAGE_DIR / "demo_documents.json"
DEMO_DOCUMENTS_V2 = PACKAGE_DIR / "demo_documents_v2.json"
BUNDLE_FORMAT = "coda_jax.default_model_bundle/1"
ADAPTER_BUNDLE_FORMAT = "coda_db.adapter_bundle/1"
DEMO_FORMAT = "coda_jax.demo_documents/1"
DEMO_FORMAT_V2 = "coda_db.demo_documents/2"
CARD_FILE = "card.json"
# What a complete bundle of each format holds besides its card.
_WEIGHTS = {BUNDLE_FORMAT: "meta", ADAPTER_BUNDLE_FORMAT: EXPORT_INDEX}
# The package data may not grow past this (the limit, decimal megabytes).
MAX_PACKAGE_BYTES = 50_000_000


def read_card(path: str | Path) -> dict[str, Any] | None:
    """The card of the bundle at ``path``, or None when ``path`` is not one (no
    readable ``card.json`` carrying one of the two formats' markers)."""
    try:
        card = json.loads((Path(path) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not isinstance(card.get("bundle"), dict):
        return None
    return card if card["bundle"].get("format") in _WEIGHTS else None


def bundle_format(path: str | Path) -> str | None:
    """The format of the bundle at ``path`` (:data:`BUNDLE_FORMAT` or
    :data:`ADAPTER_BUNDLE_FORMAT`), or None when it is not a bundle."""
    path = Path(path)
    card = read_card(path) if path.is_dir() and not path.is_symlink() else None
    return card["bundle"]["format"] if card is not None else None


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle written by ``python -m train.bundle`` (either format)."""
    return bundle_format(path) is not None


def is_adapter_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle of CoDA adapters over a pinned base."""
    return bundle_format(path) == ADAPTER_BUNDLE_FORMAT


def bundled_model_path() -> Path | None:
    """The bundled default model's directory, or None when this installation has none."""
    found = bundle_format(BUNDLE_DIR)
    return BUNDLE_DIR if found is not None and (BUNDLE_DIR / _WEIGHTS[found]).exists() else None


def bundled_card() -> dict[str, Any] | None:
    """The bundled default model's card, or None when there is no bundled model."""
    path = bundled_model_path()
    return read_card(path) if path is not None else None


def package_data_bytes() -> int:
    """Bytes of everything shipped as package data (the bundle and the demo documents)."""
    files = [p for p in BUNDLE_DIR.rglob("*") if p.is_file()] if BUNDLE_DIR.is_dir() else []
    files += [p for p in (DEMO_DOCUMENTS, DEMO_DOCUMENTS_V2) if p.is_file()]
    return sum(p.stat().st_size for p in files)


def demo_documents_for(model: str | Path) -> Path:
    """The bundled demo documents that suit ``model``: the free-form ones
    (:data:`DEMO_DOCUMENTS_V2`) for a chat-format bundle (an adapter bundle), else
    the exact-answer ones the first bundle was trained to answer."""
    return DEMO_DOCUMENTS_V2 if is_adapter_bundle(model) else DEMO_DOCUMENTS


def read_demo_documents(path: str | Path | None = None) -> dict[str, Any]:
    """The demo's documents (default: the bundled exact-answer ones), checked.

    Format 1 (:data:`DEMO_FORMAT`): ``{"format", "documents": [{"name", "text",
    "tokens", "questions": [{"question", "answer", ...}]}], ...}``, an answer right
    when it is the expected one. Format 2 (:data:`DEMO_FORMAT_V2`): ``{"format",
    "scoring", "documents": [{"name", "title", "text", "questions": [{"question",
    "answer", "accepted": [...]}]}]}``, scored by :mod:`.scoring`.
    ``FileNotFoundError`` when missing, ``ValueError`` naming the problem when not
    well formed.
    """
    path = Path(path) if path is not None else DEMO_DOCUMENTS
    if not path.is_file():
        raise FileNotFoundError(f"no demo documents at {path}")
    try:
        doc_set = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from None
    formats = (DEMO_FORMAT, DEMO_FORMAT_V2)
    if not isinstance(doc_set, dict) or doc_set.get("format") not in formats:
        raise ValueError(f"{path} is not a demo documents file (format {DEMO_FORMAT!r} or "
                         f"{DEMO_FORMAT_V2!r})")
    free_form = doc_set["format"] == DEMO_FORMAT_V2
    if free_form and not isinstance(doc_set.get("scoring"), str):
        raise ValueError(f"{path} does not state its scoring rule ('scoring')")
    docs = doc_set.get("documents")
    if not isinstance(docs, list) or not docs:
        raise ValueError(f"{path} holds no documents")
    for i, doc in enumerate(docs):
        if not _well_formed(doc, free_form):
            needs = ("a name, a title, a non-empty text and questions, each a question, its "
                     "answer and its accepted forms" if free_form else
                     "a name, a non-empty text and questions, each a question and its answer")
            raise ValueError(f"{path}: document {i} needs {needs}")
    return doc_set


def _well_formed(doc: Any, free_form: bool) -> bool:
    """Whether one demo document has every field its format needs."""
    if (not isinstance(doc, dict) or not isinstance(doc.get("name"), str)
            or not isinstance(doc.get("text"), str) or not doc["text"].strip()
            or (free_form and not isinstance(doc.get("title"), str))):
        return False
    questions = doc.get("questions")
    return isinstance(questions, list) and bool(questions) and all(
        isinstance(q, dict) and isinstance(q.get("question"), str)
        and isinstance(q.get("answer"), str)
        and (not free_form or _strings(q.get("accepted")))
        for q in questions)


def _strings(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of strings."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
