"""Held-out perplexity and passkey retrieval of a saved model, unbounded and bounded.

    python -m train.evaluation perplexity MODEL_DIR --data HELDOUT
        [--tokenizer tokenizer.json] [--contexts 512,1024,2048] [--block-size 128]
        [--max-sequences 64] [--batch-size 4] [--passkey-lengths 512,2048]
        [--passkey-depths 0.1,0.5,0.9] [--passkey-samples 16]
        [--out results.json] [--plot ppl.png]

The held-out text is cut into non-overlapping sequences of each context
length; every token after the first is scored. *Unbounded* runs the full KV
cache (the model's unbounded twin for a bounded model: same weights, kind
``coda``); *bounded* prefills the bounded state block by block
(``coda_bounded`` models only). Bank metrics come with the bounded numbers:
slot fill at the end of each sequence and, per sequence, the banks' counters
summed over layers (evictions, tokens gated out, exact hits and inserts,
summary updates and inserts). Passkey retrieval (``train.evaluation.passkey``) needs
a tokenizer; ``--plot`` draws PPL against context length. Exit codes: 0 done,
1 usage, 2 a path not found, 3 refused or invalid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from coda_jax import CausalLM, load_model

from .. import data
from ..cli import UsageParser, run_reporting_errors
from ..steps import param_dtype, unbounded_twin, with_bank
from .passkey import passkey_table


def token_nll(model: CausalLM, seqs: np.ndarray, *, bounded: bool, block_size: int = 128,
              batch_size: int = 4, desc: str | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """Next-token NLL of every token after the first of each row of ``seqs``
    (n, L): -> ((n, L - 1) float32, bank metrics of the bounded run, else {}).

    Prediction is causal, so the mean over a row's first ``c - 1`` entries is
    exactly the NLL of a ``c``-token context read from the row's start: one
    pass gives the perplexity of every shorter context on the same rows."""
    if bounded and model.attention != "coda_bounded":
        raise ValueError(f"bounded evaluation needs a coda_bounded model, not {model.attention!r}")
    runner = with_bank(model, collect_metrics=True) if bounded else unbounded_twin(model)
    rows, fills, counters = [], [], {}
    what = desc or f"{'bounded' if bounded else 'unbounded'} NLL at {seqs.shape[1]}"
    for start in tqdm(range(0, len(seqs), batch_size), desc=what, unit="batch", leave=False):
        batch = jnp.asarray(seqs[start:start + batch_size], jnp.int32)
        if bounded:
            state = runner.init_state(batch.shape[0], param_dtype(runner), mem_init="zeros")
            logits, state = runner.prefill(batch, state, block_size=block_size)
            fills.append(np.asarray(state.allowed).mean())
            for field in dataclasses.fields(state.metrics):  # (layers, batch) counters
                per_row = np.asarray(getattr(state.metrics, field.name)).sum(axis=0)
                counters.setdefault(field.name, []).extend(per_row.tolist())
        else:
            logits = runner.forward_logits(batch)
        nll = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), batch[:, 1:])
        rows.append(np.asarray(nll, np.float32))
    metrics = {}
    if bounded:
        metrics = {"slot_fill": float(np.mean(fills)),
                   "bank_per_sequence": {k: float(np.mean(v)) for k, v in counters.items()}}
    return np.concatenate(rows), metrics


def heldout_sequences(tokens: np.ndarray, *, context: int,
                      max_sequences: int | None = None) -> np.ndarray:
    """Non-overlapping ``context``-token rows (n, context) int32 from the start of
    ``tokens``; ``ValueError`` when not even one fits."""
    n = len(tokens) // context
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the held-out text ({len(tokens)} tokens) is shorter than one "
                         f"context of {context}")
    return np.asarray(tokens[:n * context], np.int32).reshape(n, context)


def score_perplexity(model: CausalLM, tokens: np.ndarray, *, context: int, bounded: bool,
                     block_size: int = 128, batch_size: int = 4,
                     max_sequences: int | None = None) -> dict[str, Any]:
    """Mean next-token NLL and perplexity over sequences of ``context`` tokens."""
    seqs = heldout_sequences(tokens, context=context, max_sequences=max_sequences)
    nll, metrics = token_nll(model, seqs, bounded=bounded, block_size=block_size,
                             batch_size=batch_size,
                             desc=f"{'bounded' if bounded else 'unbounded'} PPL at {context}")
    mean = float(nll.mean())
    return {"context": context, "bounded": bounded, "sequences": len(seqs),
            "tokens_scored": int(nll.size), "nll": mean, "ppl": math.exp(mean), **metrics}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluation perplexity``: the report as JSON on stdout (and
    ``--out``); exit codes of ``train.cli``."""
    parser = UsageParser(prog="python -m train.evaluation perplexity", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved model (required)")
    parser.add_argument("--data", required=True, help="held-out shards, .npy or text (required)")
    parser.add_argument("--tokenizer", help="tokenizer.json for text data (default: none)")
    parser.add_argument("--contexts", default="512,1024,2048",
                        help="context lengths, comma-separated (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="bounded prefill block size (default: %(default)s)")
    parser.add_argument("--max-sequences", type=int, default=64,
                        help="sequences per context at most (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="sequences scored at once (default: %(default)s; long contexts "
                             "on a CPU: 1)")
    parser.add_argument("--passkey-lengths", default="",
                        help="passkey context lengths, comma-separated (default: none)")
    parser.add_argument("--passkey-depths", default="0.1,0.5,0.9",
                        help="passkey needle depths in [0, 1] (default: %(default)s)")
    parser.add_argument("--passkey-samples", type=int, default=16,
                        help="passkey samples per length and depth (default: %(default)s)")
    parser.add_argument("--out", help="write the results as JSON here (default: stdout only)")
    parser.add_argument("--plot", help="draw PPL against context length here (.png)")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    tokens = data.read_tokens(args.data, tokenizer=args.tokenizer)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    modes = [False, True] if model.attention == "coda_bounded" else [False]
    passkey_lengths = [int(n) for n in args.passkey_lengths.split(",") if n.strip()]
    if passkey_lengths and not args.tokenizer:
        raise ValueError("passkey retrieval needs --tokenizer (to write its needle)")
    results = [score_perplexity(model, tokens, context=c, bounded=b,
                                block_size=args.block_size, batch_size=args.batch_size,
                                max_sequences=args.max_sequences)
               for c in contexts for b in modes]
    passkey = passkey_table(
        model, data.load_tokenizer(args.tokenizer), tokens, lengths=passkey_lengths,
        depths=[float(d) for d in args.passkey_depths.split(",") if d.strip()],
        count=args.passkey_samples, block_size=args.block_size,
        modes=modes) if passkey_lengths else []
    report = {"model": str(Path(args.model).absolute()), "results": results,
              "passkey": passkey, "jax": jax.__version__, "device": str(jax.devices()[0])}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot:
        from ..plots import plot_perplexity

        plot_perplexity({Path(args.model).name: results}, args.plot)
    print(text)
    return 0

