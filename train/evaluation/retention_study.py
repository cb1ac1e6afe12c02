"""The retention study (issue #19, point 4): exact-match accuracy of a bounded
model's saved document states against document length and fact depth.

    python -m train.evaluation retention --model MODEL_DIR --corpus CORPUS_DIR
        [--lengths 1024,4096,16384,65536] [--depths 0.05,0.25,0.5,0.75,0.95]
        [--facts 1,4,16] [--count 4] [--seed 1]
        [--caches bounded,window_only,unbounded] [--unbounded-max-length 65536]
        --out results.json [--plot heatmap.png]

Documents are held-out ones of ``train.retention.eval_documents``: facts about
people (held-out names and places) buried at a depth band of held-out corpus
filler, with their questions and answers. Three caches answer them:

* ``bounded``: the product path. Every document is ingested by
  ``NeuralDatabase`` and its state saved into a temporary library; a fresh
  process (``retention_product`` worker, one per cache) opens the library,
  loads the states and asks every question with ``query_many``, greedy, in
  the model's prompt with its stop tokens and answer length.
* ``window_only``: the same weights attending over the recent window alone
  (``retention_product.window_only_twin``: banks of one slot that nothing is
  ever written to, which a library can save and which attend as
  ``train.steps.with_bank(model, num_landmarks_exact=0,
  num_landmarks_summary=0)``), saved as a model of its own with the same
  settings and tokenizer, through the identical path.
* ``unbounded``: the same weights with full attention and a full K/V cache
  (``train.steps.unbounded_twin``), greedy with the same prompt, stop tokens
  and answer length, in a process of its own (``retention_unbounded``
  worker: the database takes bounded models only), at lengths up to
  ``--unbounded-max-length`` (a length that runs out of device memory is
  recorded as not fitting, and longer ones are skipped). It first checks its
  cached path against the model's own forward on the device.

An answer is correct when it equals the expected value after stripping
whitespace. The results JSON holds the device and versions, the model and
its weights fingerprint, the configuration, one row per (cache, length,
facts, depth) cell with its counts, per-length summaries, the goals of the
task's issue (``retention_scoring.goals``: for ``facts`` >= 95% with one fact at every
length and bounded within 5 points of unbounded; ``chat`` adds issue #29's), how often
each bounded cache gave the unbounded one's very answer, the state size of each cache,
each document's fingerprint and the caches that answered it (one generator walks the
grid's cells in order, so a document depends on the whole grid: arms compared on the
same documents are run with the same grid and seed), timings per phase and sample
answers.
The workers overlap with this process's ingest (and each other) unless
``--serial``. A study too long for one run runs in parts (``--lengths``,
``--facts``, ``--seed``) merged by ``python -m train.evaluation
retention-merge`` (:mod:`.retention_merge`); ``python -m train.evaluation
retention-plot`` (:mod:`.retention_plot`) draws the heat maps and prints the
tables from it; :mod:`.retention_args` holds the command line and the
documents, :mod:`.retention_workers` the worker processes. Exit codes: 0 done,
1 usage, 2 a path not found, 3 refused or invalid, or a cache failed (the
JSON is then still written, holding the others).
"""

from __future__ import annotations

import os

# The study and its query workers share one GPU: none may take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from ..cli import EXIT_REFUSED, run_reporting_errors  # noqa: E402
from . import retention_product as product  # noqa: E402
from . import retention_scoring as scoring  # noqa: E402
from .retention_args import (CACHES, FULL_CACHES, PRODUCT_CACHES, StudyError,  # noqa: E402
                             make_documents, parse_args, question_rows)
from .retention_workers import finish_worker, start_worker, stop_worker, write_json  # noqa: E402

FORMAT = "retention_study/1"


# ------------------------------------------------------------------ the caches
def product_state_bytes(report: Any) -> dict[str, Any]:
    """A product cache's state size per document: in memory (the sidecar's), on
    disk, and the model's ``cache_bytes`` (they must agree)."""
    memory = sorted(set(report.bytes_in_memory))
    return {"per_document_in_memory": memory[0] if len(memory) == 1 else memory,
            "model_cache_bytes": report.model_cache_bytes,
            "in_memory_equals_cache_bytes": memory == [report.model_cache_bytes],
            "on_disk_mean": sum(report.bytes_on_disk) / max(len(report.bytes_on_disk), 1),
            "on_disk_max": max(report.bytes_on_disk, default=0),
            "independent_of_length": len(memory) == 1}


# ------------------------------------------------------------------ the study
def environment() -> dict[str, Any]:
    """Device kind and library versions."""
    import flax
    import jax
    import numpy as np

    device = jax.devices()[0]
    return {"device": {"platform": device.platform, "kind": device.device_kind,
                       "count": jax.device_count()},
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "flax": flax.__version__, "numpy": np.__version__}}


def model_description(opened: Any) -> dict[str, Any]:
    """The model's path, fingerprints, architecture, bank and query settings."""
    import dataclasses

    desc = opened.describe()
    settings = opened.settings
    return {"path": desc["name"], "weights_sha256": desc["weights_sha256"],
            "tokenizer_sha256": desc["tokenizer_sha256"],
            "config": dataclasses.asdict(opened.model.cfg), "bank": desc["bank"],
            "dtype": str(opened.model.embed_tokens.embedding[...].dtype),
            "settings": {"prompt": settings.prompt, "block_size": settings.block_size,
                         "max_new_tokens": settings.sampling.max_new_tokens,
                         "stop_tokens": len(settings.stop_tokens),
                         "recommended_temperature": settings.sampling.temperature,
                         "temperature_used": 0.0}}


def product_arm(cache: str, args: argparse.Namespace, opened: Any, texts: Sequence[str],
                rows: Sequence[dict[str, Any]], work: Path) -> tuple[dict, dict, Any]:
    """Ingest and save every document for a product cache, then launch its query
    worker -> (report, timings, (process, answers file, launch time))."""
    from coda_db.model_source import open_model

    start = time.perf_counter()
    if cache == "bounded":
        model, model_dir = opened, Path(args.model)
    else:
        model_dir = product.window_only_model(args.model, work / "window_only_model",
                                              opened.model, opened.tokenizer)
        model = open_model(model_dir)
    built = time.perf_counter() - start
    library = work / f"library_{cache}"
    ingested = product.ingest_library(model, library, texts, progress=not args.no_progress,
                                      desc=f"ingest {cache}")
    tokens = sum(ingested.tokens)
    timings = {"model_build_s": built, "open_s": ingested.open_s,
               "ingest_s": ingested.ingest_s, "save_s": ingested.save_s,
               "ingest_tokens_per_s": tokens / max(ingested.ingest_s, 1e-9)}
    report = {"state_bytes": product_state_bytes(ingested), "doc_tokens": ingested.tokens,
              "bank": model.describe()["bank"]}
    if cache == "window_only":
        bare = product.window_only_twin(opened.model, saveable=False)
        dtype = opened.model.embed_tokens.embedding[...].dtype
        report["state_bytes"]["without_banks_cache_bytes"] = product.model_state_bytes(
            bare, dtype)
    print(f"{cache}: ingested and saved {len(texts)} documents ({tokens} tokens; ingest "
          f"{ingested.ingest_s:.1f} s, save {ingested.save_s:.1f} s)", flush=True)
    spec = product.write_spec(work / f"spec_{cache}.json", model=model_dir, library=library,
                              rows=[(product.document_label(r["doc"]), r["question"])
                                    for r in rows],
                              batch_size=args.query_batch, progress=not args.no_progress)
    out = work / f"answers_{cache}.json"
    return report, timings, (start_worker(product.WORKER_MODULE, spec, out), out,
                             time.perf_counter())


def finish_arm(cache: str, worker: Any, report: dict, timings: dict) -> list[str]:
    """Wait for a product cache's worker; its answers (report and timings completed)."""
    process, out, launched = worker
    result = finish_worker(process, out, cache)
    timings["collected_after_s"] = time.perf_counter() - launched
    timings["worker"] = result["timings"]
    report["worker"] = {k: result[k] for k in ("batch_size", "states_loaded", "sampling",
                                               "device")}
    report["worker"]["stop_tokens"] = len(result["stop_tokens"])
    print(f"{cache}: answered {len(result['answers'])} questions in a fresh process "
          f"({_phases(result['timings'])})", flush=True)
    return [a["text"] for a in result["answers"]]


def unbounded_arm(args: argparse.Namespace, docs: Sequence[dict[str, Any]],
                  rows: Sequence[dict[str, Any]], work: Path, cache: str = "unbounded"
                  ) -> Any:
    """Write the documents and launch a full-cache worker (a process of its own: it
    compiles and tokenises while the product caches ingest): the unbounded twin,
    or for ``cache="base"`` the unmodified base (``--base-model``, else the
    adapter bundle's pinned base) -> (process, answers file, launch time)."""
    from . import retention_unbounded as unbounded

    documents = work / "documents.json"
    if not documents.exists():
        documents.write_text(json.dumps([{"text": d["text"], "questions": d["questions"]}
                                         for d in docs]))
    base = (args.base_model or "pinned") if cache == "base" else None
    spec = unbounded.write_spec(work / f"spec_{cache}.json", model=args.model,
                                documents=documents, rows=rows, lengths=args.lengths,
                                max_length=args.unbounded_max_length,
                                batch_tokens=args.unbounded_batch_tokens,
                                progress=not args.no_progress, base=base)
    out = work / f"answers_{cache}.json"
    return start_worker(unbounded.WORKER_MODULE, spec, out), out, time.perf_counter()


def finish_unbounded(worker: Any, cache: str = "unbounded"
                     ) -> tuple[list[str | None], dict[str, Any], dict[int, int],
                                dict[str, Any]]:
    """Wait for a full-cache worker (``cache``: unbounded or base) -> (answers,
    report, each document's tokens, timings)."""
    process, out, launched = worker
    result = finish_worker(process, out, cache)
    timings = result["timings"] | {"collected_after_s": time.perf_counter() - launched}
    report = result["report"]
    ran = sorted(int(k) for k in report["lengths"])
    check = report["cached_path_check"]
    print(f"{cache}: answered at lengths {ran} in a process of its own "
          f"({_phases(result['timings'])}); cached path "
          f"against the forward: max |logit difference| {check['max_abs_difference']:.3g} of "
          f"{check['max_abs_logit']:.3g}, same greedy token "
          f"{100 * check['same_argmax_fraction']:.0f}%", flush=True)
    tokens = {int(k): v for k, v in result["doc_tokens"].items()}
    return result["answers"], report, tokens, timings


def run_study(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every phase of the study; -> the results (see the module docstring)."""
    from coda_db.model_source import open_model

    started = time.perf_counter()
    timings: dict[str, Any] = {}
    docs, corpus_tok = make_documents(Path(args.corpus), lengths=args.lengths, facts=args.facts,
                                      depths=args.depths, count=args.count, seed=args.seed,
                                      task=args.task, passages=args.passages)
    rows = question_rows(docs)
    timings["documents_s"] = time.perf_counter() - started
    print(f"{len(docs)} documents, {len(rows)} questions ({timings['documents_s']:.1f} s)",
          flush=True)

    answers: dict[str, list[str | None]] = {}
    reports: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    unbounded_tokens: dict[int, int] = {}
    failures: dict[str, str] = {}

    def finish(cache: str) -> None:
        """Collect a worker; one that failed is recorded and its cache left out."""
        nonlocal unbounded_tokens
        worker = workers.pop(cache)
        try:
            if cache in FULL_CACHES:
                answers[cache], reports[cache], tokens, timings[cache] = \
                    finish_unbounded(worker, cache)
                if cache == "unbounded":  # checked against the database's tokenisation
                    unbounded_tokens = tokens
            else:
                answers[cache] = finish_arm(cache, worker, reports[cache], timings[cache])
        except RuntimeError as err:
            print(f"{cache}: FAILED: {err}", file=sys.stderr, flush=True)
            failures[cache] = str(err)
            reports.pop(cache, None)

    try:
        for cache in (c for c in args.caches if c in FULL_CACHES):
            workers[cache] = unbounded_arm(args, docs, rows, work, cache)
            if args.serial:
                finish(cache)
        start = time.perf_counter()
        opened = open_model(args.model)
        timings["open_model_s"] = time.perf_counter() - start
        for cache in (c for c in args.caches if c in PRODUCT_CACHES):
            reports[cache], timings[cache], workers[cache] = product_arm(
                cache, args, opened, [d["text"] for d in docs], rows, work)
            if args.serial:
                finish(cache)
        for cache in list(workers):
            finish(cache)
    finally:
        for process, _, _ in workers.values():
            stop_worker(process)
    timings["total_s"] = time.perf_counter() - started
    if not answers:
        raise StudyError("every cache failed: " + "; ".join(failures.values()))
    results = assemble(args, opened, corpus_tok, docs, rows, answers, reports,
                       unbounded_tokens, timings)
    return results | {"failures": failures}


def assemble(args: argparse.Namespace, opened: Any, corpus_tok: str,
             docs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
             answers: dict[str, list[str | None]], reports: dict[str, Any],
             unbounded_tokens: dict[int, int], timings: dict[str, Any]) -> dict[str, Any]:
    """The results JSON of a finished study."""
    cells: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    caches = [c for c in args.caches if c in answers]  # those whose worker did not fail
    for cache in caches:
        picked = [i for i, a in enumerate(answers[cache]) if a is not None]
        cells += scoring.cell_rows(cache, [rows[i] for i in picked],
                                   [answers[cache][i] for i in picked])
        kept += scoring.sample_answers(cache, rows, answers[cache], args.samples)
    summary = scoring.summaries(cells, CACHES)
    product_tokens = next((reports[c]["doc_tokens"] for c in PRODUCT_CACHES if c in reports),
                          None)
    if "unbounded" in reports and product_tokens is not None:
        reports["unbounded"]["documents_tokenised_differently_from_the_database"] = sum(
            tokens != product_tokens[doc] for doc, tokens in unbounded_tokens.items())
    state = {cache: reports[cache]["state_bytes"] for cache in PRODUCT_CACHES if cache in reports}
    for cache in (c for c in FULL_CACHES if c in reports):
        state[f"{cache}_kv_cache_bytes"] = reports[cache]["kv_cache_bytes"]
    return {"format": FORMAT, **environment(), "model": model_description(opened),
            "corpus": {"path": str(Path(args.corpus).absolute()),
                       "tokenizer_sha256": corpus_tok,
                       "same_tokenizer_as_model": corpus_tok == opened.tokenizer_sha256},
            "scoring": scoring.scoring_rule(rows),
            "config": {"task": args.task, "lengths": args.lengths, "depths": args.depths,
                       "facts": args.facts,
                       "count": args.count, "seed": args.seed, "caches": caches,
                       "requested_caches": args.caches,
                       "unbounded_max_length": args.unbounded_max_length,
                       "base_model": ((args.base_model or "the bundle's pinned base")
                                      if "base" in caches else None),
                       "query_batch": args.query_batch,
                       "unbounded_batch_tokens": args.unbounded_batch_tokens,
                       "overlapped_workers": not args.serial,
                       "documents": len(docs), "questions_per_cache": len(rows),
                       "banks": {c: reports[c]["bank"] for c in PRODUCT_CACHES
                                 if c in reports}},
            "rows": cells, "summaries": summary,
            "goals": scoring.goals(summary, args.lengths, task=args.task, state_bytes=state),
            "agreement_with_unbounded": scoring.agreement(rows, answers, PRODUCT_CACHES),
            "documents": scoring.document_records(docs, rows, answers, args.seed),
            "state_bytes": state,
            **{cache: {k: v for k, v in reports.get(cache, {}).items()
                       if k != "kv_cache_bytes"} for cache in FULL_CACHES},
            "workers": {c: reports[c]["worker"] for c in PRODUCT_CACHES if c in reports},
            "timings": timings, "samples": kept}


def _phases(worker: dict[str, float]) -> str:
    return ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in worker.items()
                     if k.endswith("_s") and not k.endswith("per_s"))


def print_summary(results: dict[str, Any]) -> None:
    """The accuracy table and the goals, on stdout."""
    from .retention_plot import markdown_table

    print(markdown_table(results))
    print(scoring.goals_line(results["goals"]))
    t = results["timings"]
    print("timings: " + ", ".join(
        f"{k} {v:.1f} s" if isinstance(v, float) else
        f"{k} [{_phases(v)}{'; worker ' + _phases(v['worker']) if 'worker' in v else ''}]"
        for k, v in t.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluation retention``: run the study and write its JSON
    (exit 0); the exit codes of ``train.cli`` otherwise: 1 usage, 2 a path not
    found, 3 bad arguments or a failed study (the JSON is still written when
    some cache's worker failed: it holds the others)."""
    return run_reporting_errors(lambda: _study(argv), refused=(StudyError, RuntimeError))


def _study(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        results = run_study(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="retention_study_") as tmp:
            results = run_study(args, Path(tmp))
    write_json(out, results)
    print(f"wrote {out}")
    print_summary(results)
    if args.plot:
        from .retention_plot import heatmap

        try:
            heatmap(results, Path(args.plot))
            print(f"wrote {args.plot}")
        except ImportError as err:
            print(f"no plot (draw it with python -m train.evaluation retention-plot "
                  f"elsewhere): {err}", file=sys.stderr)
    if results["failures"]:
        print(f"error: the {', '.join(results['failures'])} cache(s) failed; the results "
              "hold the others", file=sys.stderr)
        return EXIT_REFUSED
    return 0
