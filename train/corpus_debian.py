"""Corpus sources installed as Debian packages: each reader finds its package's
files and cuts them into documents (see train.corpus for the list)."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

from .corpus_text import (
    Document,
    Found,
    chunks,
    dpkg_files,
    dpkg_version,
    read_text_file,
)
from .markup import html_to_text, pod_to_text, rst_to_text
from .r_data import read_r_lazyload

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
    version = dpkg_version("bible-kjv-text")
    texts = sorted(Path(p) for p in dpkg_files("bible-kjv-text")
                   if re.search(r"\.txt(\.gz)?$", p) and Path(p).is_file())
    texts += sorted(p for root in Path("/usr/share").glob("bible-kjv*") if root.is_dir()
                    for p in root.rglob("*") if p.is_file() and re.search(r"\.txt(\.gz)?$", p.name))
    if texts:
        def from_files() -> Iterator[Document]:
            for path in dict.fromkeys(texts):
                yield Document(path.name.split(".")[0], read_text_file(path))
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
    version = dpkg_version("sword-text-web")

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
            entries = [e.strip("\n") for e in re.split(r"^%\s*$", read_text_file(path), flags=re.MULTILINE)]
            entries = [e for e in entries if e.strip()]
            for k, group in chunks(entries, FORTUNES_PER_DOCUMENT):
                yield Document(f"{path.name}#{k}", "\n%\n".join(group))

    return Found(str(root), dpkg_version("fortunes"), documents)


def find_jargon(args) -> Found | str:
    candidates = [Path("/usr/share/doc/jargon-text/jargon.txt.gz"),
                  Path("/usr/share/doc/jargon-text/jargon.txt")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return "not installed (Debian package jargon-text)"

    def documents() -> Iterator[Document]:
        lines = read_text_file(path).splitlines()
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

    return Found(str(path), dpkg_version("jargon-text"), documents)


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
        for k, page in chunks(entries, GCIDE_ENTRIES_PER_DOCUMENT):
            head = page[0].split("\\")[0].split("\n")[0].strip()
            yield Document(f"page {k} ({head})", "\n\n".join(_clean_gcide(e) for e in page))

    return Found(str(dictionary), dpkg_version("dict-gcide"), documents)


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
            for k, part in chunks(by_file[lexfile], WORDNET_SYNSETS_PER_DOCUMENT):
                yield Document(f"{name}#{k}", "\n".join(part))

    return Found(str(root), dpkg_version("wordnet-base"), documents)


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
            yield Document(str(rel), html_to_text(read_text_file(path)))

    package = f"{root.parent.name}-doc"
    return Found(str(root), dpkg_version(package), documents)


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
            yield Document(name, rst_to_text(read_text_file(path)))

    return Found(str(root), dpkg_version(root.parent.name), documents)


def find_perl_doc(args) -> Found | str:
    roots = sorted((p for p in Path("/usr/share/perl").glob("5*/pod") if p.is_dir()), reverse=True)
    if not roots or not any(roots[0].glob("*.pod")):
        return "not installed (Debian package perl-doc)"
    root = roots[0]

    def documents() -> Iterator[Document]:
        for path in sorted(root.glob("*.pod")):
            yield Document(path.stem, pod_to_text(read_text_file(path)))

    return Found(str(root), dpkg_version("perl-doc"), documents)


def find_debian_reference(args) -> Found | str:
    root = Path("/usr/share/debian-reference")
    pages = sorted(root.glob("*.en.html")) if root.is_dir() else []
    if not pages:
        return "not installed (Debian package debian-reference-en)"

    def documents() -> Iterator[Document]:
        for path in pages:
            yield Document(path.name, html_to_text(read_text_file(path)))

    return Found(str(root), dpkg_version("debian-reference-en"), documents)


def find_debian_handbook(args) -> Found | str:
    root = Path("/usr/share/doc/debian-handbook/html/en-US")
    pages = sorted(root.glob("*.html")) if root.is_dir() else []
    if not pages:
        return "not installed (Debian package debian-handbook)"

    def documents() -> Iterator[Document]:
        for path in pages:
            if path.name != "index.html":
                yield Document(path.name, html_to_text(read_text_file(path)))

    return Found(str(root), dpkg_version("debian-handbook"), documents)


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
    version = dpkg_version("r-cran-janeaustenr")
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
