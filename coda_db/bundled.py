"""The default model shipped inside the package, and the demo's documents.

    coda_db/default_model/    a bounded model checkpoint (bf16) written by
                                        ``python -m train.bundle``: meta/, tree/,
                                        checksums.json, tokenizer.json, card.json
    coda_db/demo_documents.json
                                        three held-out documents with their questions
                                        and answers (``python -m train.demo_documents``)

``card.json`` is the training export's model card (architecture, bank,
training data and steps, recommended prompt and sampling, measured retention)
plus ``bundle`` (this format's marker), ``weights_sha256`` (the fingerprint of
the weights as saved: :func:`coda_jax.checkpoint.weights_fingerprint` of the
loaded model, what the database records with every state) and
``tokenizer_sha256``. A package built without a trained model has no
``default_model/`` (or one without a card): :func:`bundled_model_path` is then
None and the commands ask for ``--model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).parent
BUNDLE_DIR = PACKAGE_DIR / "default_model"
DEMO_DOCUMENTS = PACKAGE_DIR / "demo_documents.json"
BUNDLE_FORMAT = "coda_jax.default_model_bundle/1"
DEMO_FORMAT = "coda_jax.demo_documents/1"
CARD_FILE = "card.json"
# The package data may not grow past this (the limit, decimal megabytes).
MAX_PACKAGE_BYTES = 50_000_000


def read_card(path: str | Path) -> dict[str, Any] | None:
    """The card of the bundle at ``path``, or None when ``path`` is not one (no
    readable ``card.json`` carrying this format's marker)."""
    try:
        card = json.loads((Path(path) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not isinstance(card.get("bundle"), dict):
        return None
    return card if card["bundle"].get("format") == BUNDLE_FORMAT else None


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle written by ``python -m train.bundle``."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and read_card(path) is not None


def bundled_model_path() -> Path | None:
    """The bundled default model's directory, or None when this installation has none."""
    return BUNDLE_DIR if is_bundle(BUNDLE_DIR) and (BUNDLE_DIR / "meta").is_dir() else None


def bundled_card() -> dict[str, Any] | None:
    """The bundled default model's card, or None when there is no bundled model."""
    path = bundled_model_path()
    return read_card(path) if path is not None else None


def package_data_bytes() -> int:
    """Bytes of everything shipped as package data (the bundle and the demo documents)."""
    files = [p for p in BUNDLE_DIR.rglob("*") if p.is_file()] if BUNDLE_DIR.is_dir() else []
    if DEMO_DOCUMENTS.is_file():
        files.append(DEMO_DOCUMENTS)
    return sum(p.stat().st_size for p in files)


def read_demo_documents(path: str | Path | None = None) -> dict[str, Any]:
    """The demo's documents (default: the bundled ones): ``{"format", "documents":
    [{"name", "text", "tokens", "questions": [{"question", "answer", ...}]}], ...}``;
    ``FileNotFoundError`` when missing, ``ValueError`` when not well formed."""
    path = Path(path) if path is not None else DEMO_DOCUMENTS
    if not path.is_file():
        raise FileNotFoundError(f"no demo documents at {path}")
    try:
        doc_set = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(doc_set, dict) or doc_set.get("format") != DEMO_FORMAT:
        raise ValueError(f"{path} is not a demo documents file (format {DEMO_FORMAT!r})")
    docs = doc_set.get("documents")
    if not isinstance(docs, list) or not docs:
        raise ValueError(f"{path} holds no documents")
    for i, doc in enumerate(docs):
        questions = doc.get("questions") if isinstance(doc, dict) else None
        if (not isinstance(doc, dict) or not isinstance(doc.get("name"), str)
                or not isinstance(doc.get("text"), str) or not doc["text"].strip()
                or not isinstance(questions, list) or not questions
                or not all(isinstance(q, dict) and isinstance(q.get("question"), str)
                           and isinstance(q.get("answer"), str) for q in questions)):
            raise ValueError(f"{path}: document {i} needs a name, a non-empty text and "
                             "questions, each a question and its answer")
    return doc_set
