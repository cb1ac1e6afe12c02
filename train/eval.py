"""Held-out perplexity of a saved model, unbounded and bounded, at several context lengths.

    python -m train.eval MODEL_DIR --data HELDOUT [--tokenizer tokenizer.json]
                         [--contexts 512,1024,2048] [--block-size 128]
                         [--max-sequences 64] [--out results.json]

The held-out text is cut into non-overlapping sequences of each context
length; every token after the first is scored. *Unbounded* runs the full KV
cache (the model's unbounded twin for a bounded model: same weights, kind
``coda``); *bounded* prefills the bounded state block by block
(``coda_bounded`` models only). Bank metrics (fill at the end of each
sequence) come with the bounded numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from coda_jax import CausalLM, load_model

from . import data
from .steps import copy_matching_params


def unbounded_twin(model: CausalLM) -> CausalLM:
    """The same weights with unbounded attention (kind ``coda``) for a bounded model;
    the model itself otherwise."""
    if model.attention != "coda_bounded":
        return model
    dtype = jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype
    twin = CausalLM(model.cfg, attention=dataclasses.replace(model.spec, kind="coda", bank=None),
                    reference_compat=model.reference_compat, param_dtype=dtype,
                    rngs=nnx.Rngs(0))
    copy_matching_params(model, twin)
    return twin


def perplexity(model: CausalLM, tokens: np.ndarray, *, context: int, bounded: bool,
               block_size: int = 128, batch_size: int = 4,
               max_sequences: int | None = None) -> dict[str, Any]:
    """Mean next-token NLL and perplexity over sequences of ``context`` tokens."""
    n = len(tokens) // context
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the held-out text ({len(tokens)} tokens) is shorter than one "
                         f"context of {context}")
    seqs = np.asarray(tokens[:n * context], np.int32).reshape(n, context)
    if bounded and model.attention != "coda_bounded":
        raise ValueError(f"bounded evaluation needs a coda_bounded model, not {model.attention!r}")
    runner = model if bounded else unbounded_twin(model)
    total, count, fills = 0.0, 0, []
    for start in range(0, n, batch_size):
        batch = jnp.asarray(seqs[start:start + batch_size])
        if bounded:
            state = runner.init_state(batch.shape[0], mem_init="zeros")
            logits, state = runner.prefill(batch, state, block_size=block_size)
            fills.append(np.asarray(state.allowed).mean())
        else:
            logits, _ = runner(batch)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:])
        total += float(jnp.sum(nll))
        count += int(nll.size)
    mean = total / count
    out = {"context": context, "bounded": bounded, "sequences": n, "tokens_scored": count,
           "nll": mean, "ppl": math.exp(mean)}
    if bounded:
        out["slot_fill"] = float(np.mean(fills))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
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
    parser.add_argument("--out", help="write the results as JSON here (default: stdout only)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)
        tokens = data.read_tokens(args.data, tokenizer=args.tokenizer)
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
        modes = [False, True] if model.attention == "coda_bounded" else [False]
        results = [perplexity(model, tokens, context=c, bounded=b, block_size=args.block_size,
                              max_sequences=args.max_sequences) for c in contexts for b in modes]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    report = {"model": str(Path(args.model).absolute()), "results": results,
              "jax": jax.__version__, "device": str(jax.devices()[0])}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
