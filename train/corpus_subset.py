"""A smaller copy of a corpus: whole training documents drawn at random, for a
machine that a whole corpus cannot be carried to.

    python -m train.corpus_subset CORPUS_DIR OUT_DIR --train-tokens 10000000
        [--heldout-tokens N] [--seed 0]

Documents are the runs of tokens between end-of-text ids (the manifest's
``eos_id``); a seeded draw of them, in corpus order, fills ``--train-tokens``.
The held-out split is copied whole, or its first ``--heldout-tokens``. OUT_DIR
gets ``train/`` and ``heldout/`` (token shards), the tokenizer and a manifest
naming the corpus it came from. Exit codes: 0 done, 2 CORPUS_DIR is not a
corpus, 3 OUT_DIR exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from . import data


def document_spans(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """(start, end) of each document, its end-of-text id included: (n, 2)."""
    ends = np.flatnonzero(tokens == eos_id) + 1
    if not len(ends) or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]])
    return np.stack([starts, ends], axis=1)


def sample_documents(tokens: np.ndarray, eos_id: int, budget: int, seed: int) -> np.ndarray:
    """Whole documents drawn in a seeded order until ``budget`` tokens, joined in
    corpus order."""
    spans = document_spans(tokens, eos_id)
    order = np.random.default_rng(seed).permutation(len(spans))
    sizes = spans[order, 1] - spans[order, 0]
    keep = np.sort(order[:max(1, int(np.searchsorted(np.cumsum(sizes), budget, "right")))])
    return np.concatenate([tokens[s:e] for s, e in spans[keep]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.corpus_subset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", metavar="CORPUS_DIR")
    parser.add_argument("out", metavar="OUT_DIR")
    parser.add_argument("--train-tokens", type=int, required=True,
                        help="training tokens to keep, in whole documents (required)")
    parser.add_argument("--heldout-tokens", type=int,
                        help="held-out tokens to keep from its start (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the draw (default: 0)")
    args = parser.parse_args(argv)
    corpus, out = Path(args.corpus), Path(args.out)
    manifest_path = corpus / "manifest.json"
    if not manifest_path.is_file():
        print(f"error: {corpus} is not a corpus (no manifest.json)", file=sys.stderr)
        return 2
    if out.exists():
        print(f"error: {out} already exists; choose a new OUT_DIR", file=sys.stderr)
        return 3
    manifest = json.loads(manifest_path.read_text())
    train = sample_documents(data.read_tokens(corpus / "train"), int(manifest["eos_id"]),
                             args.train_tokens, args.seed)
    heldout = data.read_tokens(corpus / "heldout")
    if args.heldout_tokens is not None:
        heldout = heldout[:args.heldout_tokens]
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed when whole
    meta = {"subset_of": str(corpus.absolute()), "seed": args.seed}
    data.write_shards(train, staged / "train", meta=meta | {"split": "train"})
    data.write_shards(heldout, staged / "heldout", meta=meta | {"split": "heldout"})
    shutil.copy2(corpus / "tokenizer.json", staged / "tokenizer.json")
    (staged / "manifest.json").write_text(json.dumps(
        manifest | {"subset": meta | {"train_tokens": int(train.size),
                                      "heldout_tokens": int(heldout.size)}}, indent=1))
    staged.rename(out)
    print(f"{out}: {train.size:,} training tokens, {heldout.size:,} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
