"""The neural database's errors, by what a caller (or the command line) does with them.

``NotFoundError`` (a label, file or model that is not there: exit code 2) and
``RefusedError`` (an input that is not usable, a mismatch, a duplicate label:
exit code 3). Both subclass the builtin they refine, so ``except
FileNotFoundError`` / ``except ValueError`` keep working.
"""

from __future__ import annotations


class NotFoundError(FileNotFoundError):
    """A label, document, model or tokenizer that does not exist."""


class RefusedError(ValueError):
    """An input that cannot be used as asked (bad, damaged, mismatched or duplicate)."""
