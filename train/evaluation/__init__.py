"""Evaluation of saved models, in one place, with one command line
(``python -m train.evaluation COMMAND``; ``--help`` lists the commands, each
``COMMAND --help`` its options; exit codes of ``train.cli``):

* ``perplexity`` (:mod:`.perplexity`): held-out perplexity, unbounded and
  bounded, with the banks' metrics; and passkey retrieval (:mod:`.passkey`).
* ``ask`` (:mod:`.ask`): a chat model's answers to questions about
  documents, scored by containment (:mod:`coda_db.scoring`).
* ``retention`` (:mod:`.retention_study`): the retention study, exact-match
  answers from saved document states (bounded, window only) and from the full
  K/V cache against document length and fact depth. Its inputs and command
  line are :mod:`.retention_args`, its scoring :mod:`.retention_scoring`, its
  caches :mod:`.retention_product` (through ``coda_db``) and
  :mod:`.retention_unbounded` (the engine's K/V cache), each answering in a
  worker process of its own (:mod:`.retention_workers`);
  ``retention-merge`` (:mod:`.retention_merge`) joins a study run in parts,
  ``retention-plot`` (:mod:`.retention_plot`) draws its heat maps and tables,
  ``retention-fixture`` (:mod:`.retention_fixture`) writes stand-in inputs.
  ``run_retention_study_gpu.sh`` runs it in one device call.
* :mod:`.retention_quick`: the teacher-forced retention check of the default
  model's recipe (``train.default_model``).

The modules' public names are importable from here (each module loaded on
first use, so that the command line starts without importing JAX); their
command lines (``main``), the workers' own entry points and specs
(``run_worker``, ``write_spec``, ``WORKER_*``) and the unbounded arm's padding
constants are reached through their modules.
"""

from __future__ import annotations

import importlib
from typing import Any

# module of this package -> the public names it defines that are exported here
_EXPORTS = {
    "perplexity": ("score_perplexity",),
    "passkey": ("NEEDLE", "QUESTION", "ANSWER", "passkey_samples", "score_passkey",
                "passkey_table"),
    "ask": ("read_questions", "answer_all"),
    "retention_args": ("CACHES", "DEFAULT_CACHES", "PRODUCT_CACHES", "FULL_CACHES", "TASKS",
                       "DEFAULT_LENGTHS", "DEFAULT_DEPTHS",
                       "StudyError", "bundled_model_dir", "parse_args", "make_documents",
                       "question_rows"),
    "retention_scoring": ("GOAL_ONE_FACT", "GOAL_GAP_POINTS", "EXACT_RULE", "is_correct",
                          "scoring_rule", "cell_rows",
                          "summaries", "goals", "goals_line", "agreement", "sample_answers",
                          "document_records"),
    "retention_product": ("IngestReport", "document_label", "model_state_bytes",
                          "ingest_library", "WINDOW_ONLY_BANK", "NO_BANKS",
                          "same_weights_twin", "window_only_twin", "window_only_model"),
    "retention_unbounded": ("Question", "UnboundedAnswer", "kv_cache_bytes", "model_dtype",
                            "round_up", "read_document",
                            "suffix_logits", "compare_with_forward", "check_against_forward",
                            "MAX_BATCH_TOKENS", "device_memory_bytes", "default_batch_tokens",
                            "rows_per_batch", "answer_questions", "is_out_of_memory",
                            "cached_path_check", "open_base", "run_arm"),
    "retention_workers": ("write_json", "worker_main", "start_worker", "finish_worker",
                          "stop_worker"),
    "retention_study": ("FORMAT", "product_state_bytes", "environment", "model_description",
                        "product_arm", "finish_arm", "unbounded_arm", "finish_unbounded",
                        "run_study", "assemble", "print_summary"),
    "retention_merge": ("MergeError", "merge"),
    "retention_plot": ("CACHE_NAMES", "load_results", "markdown_table", "heatmap"),
    "retention_quick": ("Quiz", "RETENTION_QUIZ", "CHAT_QUIZ", "retention_accuracy"),
    "retention_fixture": ("DEFAULT_SHAPE", "DEFAULT_BANK", "TINY_SHAPE", "word_corpus",
                          "random_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
