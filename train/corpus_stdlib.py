"""The corpus source every machine has: the docstrings of Python's standard library.

English prose written for people (module, class and function docstrings), a
document per module, read from the running interpreter's own ``stdlib``
directory with ``ast`` (nothing is imported or run). ``train.corpus`` falls
back to it, saying so, when none of the text packages is installed, so that
the training quick start runs on a fresh machine; it is small (a few MB of
text), enough for the tiny configurations.
"""

from __future__ import annotations

import ast
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

from .corpus_text import Document, Found

MIN_CHARACTERS = 400  # modules with less prose than this are left out
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}


def _docstrings(tree: ast.Module) -> list[str]:
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    texts = []
    for node in nodes:
        text = ast.get_docstring(node, clean=True)
        if text and len(text) > 40:
            texts.append(text)
    return texts


def find_python_stdlib(args) -> Found | str:
    """The standard library's docstrings as a corpus source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        return f"no standard library directory at {root}"
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1]))

    def documents() -> Iterator[Document]:
        for path in files:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            text = "\n\n".join(_docstrings(tree))
            if len(text) >= MIN_CHARACTERS:
                yield Document(str(path.relative_to(root)), text)

    return Found(str(root), platform.python_version(), documents)
