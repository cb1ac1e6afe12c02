"""``NeuralDatabase``: read a document once into a fixed-size state, save it under a
label, load it later and ask it questions without re-reading the document."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

from coda_jax import orbax_io
from coda_jax.checkpoint import load_state, read_state_metadata
from .archive import pack, unpack
from .documents import DocumentState, read_document
from .errors import RefusedError
from .library import (ENTRY_FILE, STATE_DIR, Entry, Library, check_compatible, check_label,
                      disk_bytes, is_entry)
from .model_source import OpenModel, open_model
from .query import Answer, Answerer
from .settings import Sampling
from coda_jax import safe_paths


def entry_info(entry: Entry) -> dict[str, Any]:
    """What ``info`` reports of an entry: tokens read, bytes on disk and in memory,
    bank fill, the model that read it."""
    doc = entry.meta.get("document", {})
    model = doc.get("model", {})
    return {"label": entry.label, "status": entry.status, "problem": entry.problem,
            "source": doc.get("source"), "tokens": doc.get("tokens"),
            "chars": doc.get("chars"), "saved": entry.meta.get("saved"),
            "bytes_on_disk": disk_bytes(entry.path),
            "bytes_in_memory": entry.meta.get("bytes_in_memory"),
            "fill": entry.meta.get("fill"), "model": model.get("name"),
            "weights_sha256": model.get("weights_sha256"), "bank": model.get("bank"),
            "path": str(entry.path)}


class NeuralDatabase:
    """A bounded model plus a library of saved document states.

    ``model`` is a coda_jax model checkpoint directory (with a ``tokenizer.json``,
    or ``tokenizer``) or a HuggingFace directory with its CoDA ``adapters``
    (``untrained=True`` runs without them, loudly) and their ``bank_options``
    (window, landmarks: adapter files do not record them), or None for the
    bundled default model (:mod:`.bundled`); ``library`` a directory
    (default: ``$CODA_DB_LIBRARY``, else the per-user data directory). The
    document last ingested or loaded is the one queries read by default.
    """

    def __init__(self, model: str | os.PathLike | OpenModel | None = None, *,
                 library: str | os.PathLike | None = None,
                 tokenizer: str | os.PathLike | None = None,
                 adapters: str | os.PathLike | None = None, untrained: bool = False,
                 bank_options: Mapping[str, Any] | None = None):
        self.opened = model if isinstance(model, OpenModel) else open_model(
            model, tokenizer=tokenizer, adapters=adapters, untrained=untrained,
            bank_options=bank_options)
        self.library = Library(library)
        self.answerer = Answerer(self.opened)
        self.document: DocumentState | None = None

    # ---------------------------------------------------------------- documents
    def ingest(self, text: str | None = None, *, path: str | os.PathLike | None = None,
               source: str | None = None, progress: bool = False) -> DocumentState:
        """Read a document (its ``text`` or the UTF-8 file at ``path``) into a fresh
        state; it becomes the loaded document. Nothing is saved."""
        self.document = read_document(self.opened, text, path=path, source=source,
                                      progress=progress)
        return self.document

    def save(self, label: str, document: DocumentState | None = None, *,
             replace: bool = False) -> Entry:
        """Save ``document`` (default: the loaded one) under ``label``."""
        return self.library.save(label, self._document(document), self.opened,
                                 replace=replace)

    def list(self) -> list[Entry]:
        """The library's entries, newest first (then damaged and incomplete ones)."""
        return self.library.entries()

    def load(self, label: str) -> DocumentState:
        """Load the state saved under ``label``; it becomes the loaded document."""
        self.document = self.library.load(label, self.opened)
        return self.document

    def delete(self, label: str) -> None:
        """Remove the entry ``label`` from the library."""
        self.library.delete(label)

    def info(self, label: str) -> dict[str, Any]:
        """Tokens read, bytes on disk and in memory, bank fill and model of ``label``."""
        return entry_info(self.library.entry(label))

    def _document(self, document: DocumentState | None) -> DocumentState:
        document = document if document is not None else self.document
        if document is None:
            raise RefusedError("no document is loaded: ingest or load one first")
        return document

    # ---------------------------------------------------------------- archives
    def export(self, label: str, out: BinaryIO) -> None:
        """Write the entry ``label`` to ``out`` as a tar archive."""
        entry = self.library.entry(label)
        if entry.status != "ok":
            raise RefusedError(f"the entry {label!r} is {entry.status}: {entry.problem}")
        pack(entry.path, out)

    def import_archive(self, data: BinaryIO, label: str | None = None, *,
                       replace: bool = False) -> Entry:
        """Add an entry from an archive made by :meth:`export`, under ``label``
        (default: the label it was saved with), after checking it: safe
        extraction, sidecar, state checksums, and that this model made it."""
        if label is not None:
            check_label(label)
        self.library.root.mkdir(parents=True, exist_ok=True)
        unpacked = safe_paths.staging_path(self.library.root / "upload", "saving")
        try:
            unpack(data, unpacked)
            meta = self._check_unpacked(unpacked)
            label = check_label(label if label is not None else meta.get("label"))
            if meta.get("label") != label:
                meta["label"] = label
                (unpacked / ENTRY_FILE).write_text(json.dumps(meta, indent=1))
            path = self.library.install(label, lambda staged: os.rename(unpacked, staged),
                                        replace=replace)
        finally:
            if unpacked.exists():
                shutil.rmtree(unpacked)
        return self.library.entry(path.name)

    def _check_unpacked(self, path: Path) -> dict[str, Any]:
        if not is_entry(path):
            raise RefusedError(f"the archive is not a coda-db entry (no readable {ENTRY_FILE} "
                               "of ours)")
        meta = json.loads((path / ENTRY_FILE).read_text())
        check_compatible(meta.get("document", {}), self.opened, "the uploaded state")
        try:
            read_state_metadata(path / STATE_DIR)
            orbax_io.verify(path / STATE_DIR, "state")
            load_state(path / STATE_DIR, self.opened.model)
        except (OSError, ValueError) as err:
            raise RefusedError(f"the uploaded state is damaged or not ours: {err}") from None
        return meta

    # ---------------------------------------------------------------- questions
    def _sampling(self, **values: Any) -> Sampling:
        return self.opened.settings.sampling.with_overrides(**values)

    def query_stream(self, question: str, *, document: DocumentState | None = None,
                     max_new_tokens: int | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None) -> Iterator[str]:
        """The answer to ``question`` as text pieces while it is decoded (the
        generator's return value is the :class:`Answer`). Unset sampling values
        take the model's recommended ones (the reference's: 0.7, 50, 0.9)."""
        sampling = self._sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed)
        return self.answerer.stream(self._document(document).state, question, sampling)

    def query(self, question: str, **options: Any) -> Answer:
        """The whole answer to ``question`` (options as :meth:`query_stream`)."""
        stream = self.query_stream(question, **options)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def query_many(self, questions: str | Sequence[str],
                   documents: DocumentState | Sequence[DocumentState] | None = None, *,
                   max_new_tokens: int | None = None, temperature: float | None = None,
                   top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None) -> list[Answer]:
        """Many answers in one batched decode: every question against one document
        (default: the loaded one), one question against many documents, or
        ``questions[i]`` against ``documents[i]``."""
        if isinstance(questions, str):
            questions = [questions]
        if documents is None or isinstance(documents, DocumentState):
            documents = [self._document(documents)] * len(questions)
        documents = list(documents)
        if len(questions) == 1 and len(documents) > 1:
            questions = list(questions) * len(documents)
        if len(questions) != len(documents):
            raise RefusedError(f"{len(questions)} questions for {len(documents)} documents: "
                               "give one question, one document, or as many of each")
        sampling = self._sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed)
        return self.answerer.many([d.state for d in documents], list(questions), sampling)
