"""Evaluation of saved models, in one place, with one command line
(``python -m train.evaluation COMMAND``; ``--help`` lists the commands):

* ``perplexity`` (:mod:`.perplexity`): held-out perplexity, unbounded and
  bounded, with the banks' metrics; and passkey retrieval (:mod:`.passkey`).
* ``ask`` (:mod:`.ask`): a chat model's answers to questions about
  documents, scored by containment.

The public names of the modules are importable from here (loaded on first
use, so that the command line starts without importing JAX).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it
_EXPORTS = {
    "perplexity": ("score_perplexity",),
    "passkey": ("NEEDLE", "QUESTION", "ANSWER", "passkey_samples", "score_passkey",
                "passkey_table"),
    "ask": ("SCORING_RULE", "normalise", "is_right", "read_questions", "answer_all"),
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
