"""The corpus builder's documents and their cleaning: text mapped to ASCII, what a
source found, and the helpers the sources share (installed Debian files, text files)."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import textwrap
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# ----------------------------------------------------------------- cleaning

_TRANSLATE = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u00b4\u02bc", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2212\u00b7", "-"),
    **dict.fromkeys("\u2014\u2015", "--"),
    **dict.fromkeys("\u2022\u2023\u25cf\u25e6\u2043", "*"),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad\u00b6\u00a7", ""),
    "\u2026": "...", "\u00d7": "x", "\u00f7": "/", "\u2044": "/", "\u2192": "->",
    "\u2190": "<-", "\u21d2": "=>", "\u2264": "<=", "\u2265": ">=", "\u2260": "!=",
    "\u00b1": "+/-", "\u00a9": "(c)", "\u00ae": "(R)", "\u2122": "(TM)", "\u00b0": " deg",
    "\u00df": "ss", "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE",
    "\u00f8": "o", "\u00d8": "O", "\u00f0": "d", "\u00d0": "D", "\u00fe": "th",
    "\u00de": "Th", "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0131": "i",
    "\t": "\t", "\u00a0": " ",
})
_NON_ENGLISH_LIMIT = 0.05  # documents with more unmappable characters are dropped


def to_ascii(text: str) -> tuple[str, int]:
    """``text`` in printable ASCII (plus newlines and tabs): typography mapped,
    accents dropped, other characters removed (symbols and spaces become a
    space). Returns the text and how many characters had no ASCII form."""
    text = unicodedata.normalize("NFKD", text.translate(_TRANSLATE)).translate(_TRANSLATE)
    if text.isascii():
        lost = 0
    else:
        out, lost = [], 0
        for ch in text:
            if ch.isascii():
                out.append(ch)
                continue
            category = unicodedata.category(ch)
            if category == "Mn":  # a combining accent: the letter stays
                continue
            lost += category[0] == "L" or category[0] == "N"
            out.append(" " if category[0] in "SZP" else "")
        text = "".join(out)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text), lost


def clean_text(text: str) -> str | None:
    """A document's text normalised for training, or None when it should be
    dropped (empty, or more than 5% of its letters have no ASCII form).

    Printable ASCII only; tabs expanded; trailing spaces and the indentation
    common to all lines removed; runs of blank lines collapsed to one.
    """
    letters = sum(1 for ch in text if not ch.isspace()) or 1
    text, lost = to_ascii(text)
    if lost > _NON_ENGLISH_LIMIT * letters:
        return None
    lines = [line.rstrip() for line in text.expandtabs(8).split("\n")]
    text = textwrap.dedent("\n".join(lines))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text if re.search(r"[A-Za-z0-9]", text) else None


# --------------------------------------------------------------- documents


@dataclass
class Document:
    """One document: ``name`` unique within its source, ``group`` the unit the
    train/held-out split keeps together (defaults to the document itself)."""

    name: str
    text: str
    group: str | None = None


@dataclass
class Found:
    """A source present on this machine: where it was read from, its version,
    and a function yielding its documents."""

    origin: str
    version: str | None
    documents: Callable[[], Iterator[Document]]
    skipped: dict = field(default_factory=dict)


def dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", package],
                                capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    words = result.stdout.split()
    if result.returncode != 0 or "installed" not in words[:3] or len(words) < 4:
        return None
    return words[-1]


def dpkg_files(package: str) -> list[str]:
    if shutil.which("dpkg") is None:
        return []
    try:
        result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return result.stdout.splitlines() if result.returncode == 0 else []


def read_text_file(path: Path) -> str:
    """A text file (gzip-compressed when it ends in .gz) as str: UTF-8, else Latin-1."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for k, start in enumerate(range(0, len(items), size)):
        yield k, items[start:start + size]


# The Bible's 66 books in canonical order: the split groups of both translations.
