"""The retention study's inputs: its command line (checked) and its documents.

:mod:`.retention_study` runs the study (``python -m train.evaluation
retention``); this module says what it runs on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from ..cli import UsageParser

DESCRIPTION = ("The retention study (issue #19, point 4): exact-match accuracy of a bounded "
               "model's saved document states against document length and fact depth.")
# "base": the unmodified base model (an adapter bundle's pinned one, or --base-model) with
# a full K/V cache, in the model's framing and prompt; asked for by name only.
CACHES = ("bounded", "window_only", "unbounded", "base")
DEFAULT_CACHES = ("bounded", "window_only", "unbounded")
PRODUCT_CACHES = ("bounded", "window_only")
FULL_CACHES = ("unbounded", "base")  # answered by retention_unbounded's worker
TASKS = ("facts", "chat")
DEFAULT_LENGTHS = "1024,4096,16384,65536"
DEFAULT_DEPTHS = "0.05,0.25,0.5,0.75,0.95"


class StudyError(ValueError):
    """A problem with the study's inputs or a failed study, reported without a
    traceback (exit code 3, refused or invalid)."""


# ------------------------------------------------------------------ arguments
def _int_list(name: str, text: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StudyError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise StudyError(f"--{name} needs integers >= {minimum}, got {text!r}")
    if len(set(values)) != len(values):
        raise StudyError(f"--{name} repeats a value: {text!r}")
    return sorted(values)


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StudyError(f"--depths must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise StudyError(f"--depths must lie in [0, 1], got {text!r}")
    if len(set(values)) != len(values):
        raise StudyError(f"--depths repeats a value: {text!r}")
    return sorted(values)


def _cache_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(values) - set(CACHES))
    if not values or unknown:
        raise StudyError(f"--caches takes some of {', '.join(CACHES)}; got {text!r}")
    return [c for c in CACHES if c in values]


def bundled_model_dir() -> str | None:
    """The bundled model's directory, where the package provides one."""
    try:
        from coda_db.bundled import bundled_model_path
    except ImportError:
        return None
    path = bundled_model_path()
    return None if path is None else str(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked: ``StudyError`` names a bad value,
    ``FileNotFoundError`` a model, corpus or ``--work`` parent that is not there;
    a usage error exits with code 1."""
    parser = UsageParser(
        prog="python -m train.evaluation retention", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a coda_jax bounded model checkpoint directory "
                        "(tokenizer.json inside) or a bundle of adapters over a pinned base "
                        "(python -m train.bundle; default: the bundled model, if any)")
    parser.add_argument("--task", choices=TASKS, default="facts",
                        help="facts: train.retention's documents, exact match (a plain "
                        "model); chat: train.retention_chat's held-out documents and free-form "
                        "questions, scored by coda_db.scoring's containment rule with each "
                        "question's accepted answers (a chat model; default facts)")
    parser.add_argument("--passages", type=int, default=1,
                        help="passage questions per chat document (--task chat; default 1)")
    parser.add_argument("--base-model",
                        help="the unmodified base for the base cache: a coda_jax checkpoint "
                        "(default for an adapter bundle: its pinned base)")
    parser.add_argument("--corpus", required=True,
                        help="a corpus of python -m train.corpus (heldout/, tokenizer.json)")
    parser.add_argument("--out", required=True, help="the results JSON")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help=f"document lengths in tokens (default {DEFAULT_LENGTHS})")
    parser.add_argument("--depths", default=DEFAULT_DEPTHS,
                        help="fact depths, 0 = the start, 1 = the end (default "
                        f"{DEFAULT_DEPTHS}: from the middle of the first 10%% to that "
                        "of the last 10%%)")
    parser.add_argument("--facts", default="1,4,16", help="facts per document (default 1,4,16)")
    parser.add_argument("--count", type=int, default=4,
                        help="documents per (length, facts, depth) cell (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="documents' seed")
    parser.add_argument("--caches", default=",".join(DEFAULT_CACHES),
                        help=f"some of {','.join(CACHES)} (default: "
                        f"{','.join(DEFAULT_CACHES)})")
    parser.add_argument("--unbounded-max-length", type=int, default=65536,
                        help="the unbounded cache runs at lengths up to this")
    parser.add_argument("--query-batch", type=int, default=None,
                        help="questions per query_many call (default on a GPU: "
                        "coda_db.query.MAX_ROWS_PER_CALL, the rows of one decode; 8 on "
                        "a CPU, where many states of the default model's bank overrun the "
                        "host's memory)")
    parser.add_argument("--unbounded-batch-tokens", type=int, default=None,
                        help="document tokens of K/V per full-cache generation call "
                        "(default: what an eighth of the device's memory holds, at most 2M)")
    parser.add_argument("--samples", type=int, default=3,
                        help="sample answers kept per (cache, length)")
    parser.add_argument("--plot", help="also draw the heat maps into this PNG")
    parser.add_argument("--work", help="keep the libraries, models and answers in this new "
                        "or empty directory (default: a temporary one, removed)")
    parser.add_argument("--serial", action="store_true",
                        help="run each worker alone (cleaner timings, longer run)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.lengths = _int_list("lengths", args.lengths)
    args.facts = _int_list("facts", args.facts)
    args.depths = _depth_list(args.depths)
    args.caches = _cache_list(args.caches)
    for name in ("count", "query_batch", "unbounded_batch_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise StudyError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("seed", "samples", "unbounded_max_length", "passages"):
        if getattr(args, name) < 0:
            raise StudyError(f"--{name.replace('_', '-')} must be >= 0")
    if args.query_batch is None:
        import jax

        from coda_db.query import MAX_ROWS_PER_CALL

        args.query_batch = MAX_ROWS_PER_CALL if jax.default_backend() == "gpu" else 8
    args.model = args.model or bundled_model_dir()
    if args.model is None:
        raise StudyError("give --model (a bounded model checkpoint directory): no bundled "
                         "model is installed")
    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"--model {model}: no such directory")
    from coda_db.bundled import is_adapter_bundle

    checkpoint = (model / "meta").is_dir() and (model / "tokenizer.json").is_file()
    if not checkpoint and not is_adapter_bundle(model):
        raise StudyError(f"--model {model} is neither a coda_jax model checkpoint with a "
                         "tokenizer.json inside nor a bundle of adapters")
    if args.base_model is not None:
        if not Path(args.base_model).exists():
            raise FileNotFoundError(f"--base-model {args.base_model}: no such directory")
        if not (Path(args.base_model) / "meta").is_dir():
            raise StudyError(f"--base-model {args.base_model} is not a coda_jax model "
                             "checkpoint")
    elif "base" in args.caches and checkpoint:
        raise StudyError("the base cache needs --base-model (only an adapter bundle names "
                         "its base)")
    work = Path(args.work) if args.work else None
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise StudyError(f"--work {work} is not an empty directory")
    corpus = Path(args.corpus)
    if not corpus.exists():
        raise FileNotFoundError(f"--corpus {corpus}: no such directory")
    if not (corpus / "heldout").exists() or not (corpus / "tokenizer.json").is_file():
        raise StudyError(f"--corpus {corpus} is not a train.corpus corpus (heldout/ and "
                         "tokenizer.json)")
    return args


# ------------------------------------------------------------------ documents
def make_documents(corpus: Path, *, lengths: Sequence[int], facts: Sequence[int],
                   depths: Sequence[float], count: int, seed: int, task: str = "facts",
                   passages: int = 1) -> tuple[list[dict[str, Any]], str]:
    """The held-out documents of every cell and the corpus tokenizer's fingerprint:
    ``train.retention.eval_documents`` (task ``facts``) or
    ``train.retention_chat.eval_documents`` with ``passages`` passage questions each
    (task ``chat``: ``text`` the document as pasted, questions with accepted answers)."""
    from .. import data, retention, retention_chat

    tok = data.load_tokenizer(corpus / "tokenizer.json")
    filler = data.read_tokens(corpus / "heldout")
    try:
        if task == "chat":
            docs = list(retention_chat.eval_documents(
                tok, filler, lengths=lengths, facts_per_doc=facts, depths=depths,
                passages=passages, count=count, seed=seed))
        else:
            docs = list(retention.eval_documents(tok, filler, lengths=lengths,
                                                 facts_per_doc=facts, depths=depths,
                                                 count=count, seed=seed))
    except ValueError as err:
        raise StudyError(f"cannot build the documents: {err}") from None
    return docs, data.tokenizer_fingerprint(tok)


def question_rows(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per question: its document, cell, question and expected answer (and,
    for a chat document's question, its accepted answers and kind)."""
    return [{"doc": i, "length": d["length"], "facts": d["facts"], "depth": d["depth"],
             "question": q["question"], "expected": q["answer"]}
            | {k: q[k] for k in ("accepted", "kind") if k in q}
            for i, d in enumerate(docs) for q in d["questions"]]
