"""``coda-db demo``: read documents once, save their states, answer from them in a new process.

For each demo document (the bundled three that suit the model, :mod:`.bundled`:
free-form questions for a chat-format bundle, exact answers for the first
bundled model; or ``--documents``): ingest it (read once, in this process),
save the state under its name in a library (a temporary one, or
``--library``); then a fresh Python process (``python -m coda_db.demo
--worker ...``) opens the model, loads the saved states (never the documents)
and answers every question in one batched greedy decode with the model's own
prompt, stop tokens and answer length. An answer is correct when it equals
the expected one, surrounding whitespace ignored (format 1), or by the
containment rule of :mod:`.scoring` (format 2: one accepted form, normalised,
in the normalised reply). The demo's entries are removed afterwards (the
temporary library whole) unless ``--keep``.

The worker prints one JSON object per line, prefixed with ``RESULT_PREFIX``
(anything else it prints is passed on to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .bundled import DEMO_FORMAT_V2, bundled_model_path, demo_documents_for, read_demo_documents
from .cache import child_environment
from .errors import NotFoundError, RefusedError
from .scoring import accepted_answers, is_right

RESULT_PREFIX = "@coda-db-demo "
SOURCE_PREFIX = "coda-db demo: "
WORKER_TIMEOUT_S = 1800
DISPLAY_CHARS = 60


def same_answer(answer: str, expected: str) -> bool:
    """Exact match, surrounding and repeated whitespace ignored."""
    return " ".join(answer.split()) == " ".join(expected.split())


def answer_is_right(doc_format: str, answer: str, question: dict[str, Any]) -> bool:
    """Whether ``answer`` answers ``question`` of a demo documents file of
    ``doc_format``: by :mod:`.scoring`'s rule (format 2), else exactly."""
    if doc_format == DEMO_FORMAT_V2:
        return is_right(answer, accepted_answers(question))
    return same_answer(answer, question["answer"])


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DISPLAY_CHARS else text[:DISPLAY_CHARS - 1] + "\u2026"


def _marks(stream) -> tuple[str, str]:
    """✓/✗ where the output can encode them, else ok/WRONG."""
    try:
        "\u2713\u2717".encode(getattr(stream, "encoding", None) or "ascii")
        return "\u2713", "\u2717"
    except (UnicodeEncodeError, LookupError):
        return "ok", "WRONG"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} KB"


def resolve_model(model: str | None) -> str:
    """``model``, else ``$CODA_DB_MODEL``, else the bundled model; ``NotFoundError``
    when there is none of them."""
    model = model or os.environ.get("CODA_DB_MODEL")
    if model:
        return model
    bundled = bundled_model_path()
    if bundled is None:
        raise NotFoundError("this installation has no bundled default model: run the demo "
                            "with --model MODEL_DIR (any bounded model checkpoint with its "
                            "tokenizer.json)")
    return str(bundled)


def _model_line(opened) -> str:
    bank = opened.model.spec.bank
    banks = (f"bank {bank.window} recent + {bank.num_landmarks_exact} exact + "
             f"{bank.num_landmarks_summary} summary") if bank is not None else "no bank"
    return f"model: {opened.name}, {opened.model.cfg.num_layers} layers, {banks}"


def _check_replaceable(library, label: str) -> bool:
    """Whether ``label`` is free (False) or an earlier demo's entry (True, replaced);
    ``RefusedError`` for anything else of that label."""
    path = library.path(label)
    if not path.exists():
        return False
    entry = library.entry(label)
    if not str(entry.meta.get("document", {}).get("source", "")).startswith(SOURCE_PREFIX):
        raise RefusedError(f"the library {library.root} has an entry {label!r} that the demo "
                           "did not make; use another --library")
    return True


def run_demo(*, model: str | None = None, library: str | None = None, keep: bool = False,
             documents: str | None = None, tokenizer: str | None = None,
             adapters: str | None = None, untrained: bool = False,
             out: Callable[[str], None] = print) -> bool:
    """The demo (see the module's description); True when every answer is correct."""
    from .core import NeuralDatabase
    from .library import Library, check_label, disk_bytes

    started = time.perf_counter()
    model = resolve_model(model)
    documents = str(documents or demo_documents_for(model))
    doc_set = read_demo_documents(documents)
    docs = doc_set["documents"]
    labels = [check_label(d["name"]) for d in docs]
    temporary = library is None
    root = Path(tempfile.mkdtemp(prefix="coda-db-demo-")) if temporary else Path(library)
    saved: list[str] = []
    try:
        db = NeuralDatabase(model, library=root, tokenizer=tokenizer, adapters=adapters,
                            untrained=untrained)
        out(_model_line(db.opened))
        if doc_set["format"] == DEMO_FORMAT_V2:
            out(f"scoring: {doc_set['scoring']}")
        tokens = state_bytes = 0
        read: dict[str, int] = {}
        for i, (doc, label) in enumerate(zip(docs, labels)):
            replace = _check_replaceable(db.library, label)
            document = db.ingest(doc["text"], source=SOURCE_PREFIX + doc["name"])
            entry = db.save(label, document, replace=replace)
            saved.append(label)
            size = disk_bytes(entry.path)
            tokens += document.tokens
            read[label] = document.tokens
            state_bytes += size
            out(f"[{i + 1}/{len(docs)}] read {label}: {document.tokens:,} tokens in "
                f"{document.meta['seconds']:.1f} s, state saved ({_mb(size)})")
        questions = sum(len(d["questions"]) for d in docs)
        read_s = time.perf_counter() - started
        out(f"a new process loads the {len(docs)} saved states (not the documents) and asks "
            f"{questions} questions ...")
        results = _ask_in_new_process(model, root, documents, labels, tokenizer=tokenizer,
                                      adapters=adapters, untrained=untrained)
        ok_mark, bad_mark = _marks(sys.stdout)
        correct = 0
        for doc, label in zip(docs, labels):
            title = f": {doc['title']}" if "title" in doc else ""
            out(f"{label}{title} ({read[label]:,} tokens)")
            for q, result in zip(doc["questions"], results[label]):
                right = answer_is_right(doc_set["format"], result["answer"], q)
                correct += right
                out(f"  {ok_mark if right else bad_mark} {q['question']}  expected: "
                    f"{_shown(q['answer'])}  answer: {_shown(result['answer'])}")
        wall = time.perf_counter() - started
        out(f"demo: {correct}/{questions} correct | {tokens:,} tokens read | state "
            f"{_mb(state_bytes // len(docs))} per document, {_mb(state_bytes)} saved | "
            f"{wall:.1f} s (reading {read_s:.1f} s, new process {wall - read_s:.1f} s)")
        if keep:
            out(f"kept the states in {root}")
        return correct == questions
    finally:
        if not keep:
            if temporary:
                shutil.rmtree(root, ignore_errors=True)
            else:
                lib = Library(root)
                for label in saved:
                    lib.delete(label)


def _ask_in_new_process(model: str, library: Path, documents: str, labels: list[str],
                        *, tokenizer: str | None, adapters: str | None, untrained: bool
                        ) -> dict[str, list[dict[str, Any]]]:
    command = [sys.executable, "-m", "coda_db.demo", "--worker", "--model", model,
               "--library", str(library), "--documents", documents]
    for flag, value in (("--tokenizer", tokenizer), ("--adapters", adapters)):
        if value is not None:
            command += [flag, str(value)]
    if untrained:
        command.append("--untrained")
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=WORKER_TIMEOUT_S, check=False, env=child_environment())
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    other = []
    for line in run.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            row = json.loads(line[len(RESULT_PREFIX):])
            results[row["label"]].append(row)
        elif line.strip():
            other.append(line)
    for line in other + [line for line in run.stderr.splitlines() if _worth_showing(line)]:
        print(line, file=sys.stderr)
    if run.returncode != 0:
        raise RefusedError(f"the new process that answers from the saved states failed (exit "
                           f"code {run.returncode}); its errors are above")
    return results


def _worth_showing(line: str) -> bool:
    """The worker's stderr minus the benign start-up noise of its libraries."""
    return bool(line.strip()) and "absl::InitializeLog" not in line


# ---------------------------------------------------------------- the worker
def _worker(args: argparse.Namespace) -> int:
    from .core import NeuralDatabase

    docs = read_demo_documents(args.documents)["documents"]
    db = NeuralDatabase(args.model, library=args.library, tokenizer=args.tokenizer,
                        adapters=args.adapters, untrained=args.untrained)
    states, questions, rows = [], [], []
    for doc in docs:
        state = db.load(doc["name"])
        for q in doc["questions"]:
            states.append(state)
            questions.append(q["question"])
            rows.append((doc["name"], q))
    answers = db.query_many(questions, states, temperature=0.0)
    for (label, q), answer in zip(rows, answers):
        print(RESULT_PREFIX + json.dumps({"label": label, "question": q["question"],
                                          "answer": answer.text, "tokens": answer.tokens,
                                          "stopped": answer.stopped}), flush=True)
    return 0


def worker_main(argv: Sequence[str] | None = None) -> int:
    """The new process of the demo: answer the demo's questions from saved states."""
    parser = argparse.ArgumentParser(prog="python -m coda_db.demo")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--library", required=True)
    parser.add_argument("--documents", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--adapters")
    parser.add_argument("--untrained", action="store_true")
    args = parser.parse_args(argv)
    try:
        return _worker(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(worker_main())
