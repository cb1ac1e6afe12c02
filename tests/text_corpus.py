"""A tiny corpus of made-up English for the training tests (``train.corpus`` on a
folder of text files): a 300-token BPE, 70% training and 30% held-out documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train import corpus

WORDS = ("the river ran past old stone walls while seven quiet birds watched a grey "
         "morning open over fields of barley and long roads to the sea").split()


def text_corpus(tmp_path: Path, *, documents: int = 30, words: int = 400) -> Path:
    """Build it under ``tmp_path`` -> the corpus directory."""
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(documents):
        (texts / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, words))
                                               + f". Number {i * 37}.\n")
    out = tmp_path / "corpus"
    assert corpus.main([str(out), "--sources", "text-dir", "--text-dir", str(texts),
                        "--vocab-size", "300", "--heldout-fraction", "0.3", "--quiet"]) == 0
    return out
