"""Stand-ins for the retention study's inputs: a corpus of made-up words and a
bounded model with random weights, for checking the study's mechanics (CPU
test) and timing it on the default model's shape (GPU) where no trained
model or real corpus is at hand. Random weights answer wrongly: these say
nothing about accuracy.

    python -m train.evaluation retention-fixture OUT_DIR [--shape default|tiny]
        [--corpus-tokens 400000] [--window 512] [--exact 256] [--summary 64]

writes OUT_DIR/corpus (``python -m train.corpus`` from a text directory) and
OUT_DIR/model (the shape's model, its tokenizer the corpus's, the query
settings of ``train.default_model``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cli import UsageParser, run_reporting_errors

# The bundled default model's architecture (train/configs/study.yaml) and bank
# (train/configs/default_phase2.yaml).
DEFAULT_SHAPE = dict(family="llama", vocab_size=16384, hidden_size=384, intermediate_size=1024,
                     num_layers=8, num_heads=6, num_kv_heads=2, head_dim=64,
                     tie_word_embeddings=True)
DEFAULT_BANK = dict(window=512, num_landmarks_exact=256, num_landmarks_summary=64)
TINY_SHAPE = dict(family="llama", vocab_size=320, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
SYLLABLES = ("ka", "lo", "mi", "ne", "ra", "su", "te", "vo", "bi", "da", "fu", "ge", "ho",
             "ji", "pa", "ri", "sa", "to", "wu", "ze")


def word_corpus(out: str | Path, *, tokens: int, vocab_size: int, seed: int = 0,
                documents: int = 60) -> Path:
    """A train.corpus corpus of ``documents`` texts of made-up words (about
    ``tokens`` words in all), with sentences, numbers and a held-out split."""
    from .. import corpus

    out = Path(out)
    texts = out.with_name(out.name + "_texts")
    texts.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = sorted({"".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(3000)})
    per_doc = max(1, tokens // documents)
    for i in range(documents):
        picked = rng.choice(words, per_doc)
        sentences = [" ".join(picked[j:j + 12]).capitalize() + "."
                     for j in range(0, per_doc, 12)]
        (texts / f"doc{i:03d}.txt").write_text(" ".join(sentences) + f" Number {i * 37}.\n")
    code = corpus.main([str(out), "--sources", "text-dir", "--text-dir", str(texts),
                        "--vocab-size", str(vocab_size), "--heldout-fraction", "0.3",
                        "--overwrite", "--quiet"])
    shutil.rmtree(texts)
    if code != 0:
        raise RuntimeError(f"train.corpus failed (exit code {code})")
    return out


def random_model(out: str | Path, corpus: str | Path, *, shape: dict, bank: dict,
                 dtype: str = "float32", settings: dict | None = None, seed: int = 0) -> Path:
    """A bounded model of ``shape`` and ``bank`` with random weights at ``out``,
    the corpus's tokenizer inside and ``settings`` (default: the default
    model's, ``train.recipe_tasks.RetentionTask.database_settings``) as its query
    settings."""
    import jax.numpy as jnp
    from flax import nnx

    from coda_jax import CausalLM, DecoderConfig, save_model

    from .. import data
    from ..recipe_tasks import TASKS

    out = Path(out)
    tok = data.load_tokenizer(Path(corpus) / "tokenizer.json")
    model = CausalLM(DecoderConfig(**shape), attention="coda_bounded",
                     attention_options=dict(bank), param_dtype=jnp.dtype(dtype),
                     rngs=nnx.Rngs(seed))
    save_model(out, model, overwrite=True,
               extra_meta={"database": settings if settings is not None
                           else TASKS["retention"].database_settings(tok)})
    shutil.copy(Path(corpus) / "tokenizer.json", out / "tokenizer.json")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluation retention-fixture``: write the stand-in corpus
    and model (exit codes of ``train.cli``)."""
    parser = UsageParser(prog="python -m train.evaluation retention-fixture",
                         description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT_DIR", help="where corpus/ and model/ go")
    parser.add_argument("--shape", choices=("default", "tiny"), default="default",
                        help="the bundled default model's shape or a tiny one "
                             "(default: %(default)s)")
    parser.add_argument("--corpus-tokens", type=int, default=400_000,
                        help="words in the made-up corpus (default: %(default)s)")
    parser.add_argument("--window", type=int, help="the bank's window (default: 512)")
    parser.add_argument("--exact", type=int, help="exact landmarks (default: 256)")
    parser.add_argument("--summary", type=int, help="summary landmarks (default: 64)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (default shape), "
                        "float32 (tiny)")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: _build(args), refused=(ValueError, RuntimeError))


def _build(args: argparse.Namespace) -> int:
    default = args.shape == "default"
    shape = DEFAULT_SHAPE if default else TINY_SHAPE
    bank = dict(DEFAULT_BANK)
    for key, value in (("window", args.window), ("num_landmarks_exact", args.exact),
                       ("num_landmarks_summary", args.summary)):
        if value is not None:
            bank[key] = value
    out = Path(args.out)
    corpus = word_corpus(out / "corpus", tokens=args.corpus_tokens,
                         vocab_size=min(shape["vocab_size"], 4096 if default else 300))
    random_model(out / "model", corpus, shape=shape, bank=bank,
                 dtype=args.dtype or ("bfloat16" if default else "float32"))
    print(f"wrote {corpus} and {out / 'model'}")
    return 0

