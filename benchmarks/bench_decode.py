"""Bounded decode against the memory-bandwidth bound, and ingest against the engine's prefill.

On a Mistral-7B-shaped bounded model with random bf16 weights (the bank of
``bench_database.py``), in one run:

- the copy ceiling: the bytes per second of an elementwise pass over a 4 GiB array
  (read once, written once), the most this device moves;
- ingest of one document of each ``--doc-lengths`` through ``read_document``
  (the product's streamed reader), against ``CausalLM.prefill`` of the same tokens
  from the same empty state in one call (the engine's own prefill);
- decode after each document at each ``--batches`` (every row that document's
  state): the time of one greedy step of ``generate``, from the difference of two
  runs of different lengths (so the question's prefill and the compile drop out);
  the bytes one step must read (every weight but the input embeddings, which are
  gathered, and every row's state once), that over the step time (achieved bytes/s)
  and the share of the bound (those bytes at the copy ceiling, over the step time);
- with ``--stacked-baseline``, each step also timed with the layers sliced inside the
  token loop (``generate(split_layers=False)``, the default off a GPU);
- with ``--apart-baseline``, each step also timed with each layer's input projections
  apart, one product each (``generate(join_projections=False)``);
- ``query_many`` (``Answerer.many``: prompt, decode, text) at each batch after the
  last document: new tokens per second and its share of the same bound.

    python benchmarks/bench_decode.py --out benchmarks/results/decode_h100.json
    python benchmarks/bench_decode.py --tiny --out /tmp/decode_tiny.json   # CPU check
    python benchmarks/bench_decode.py --out q.json --doc-lengths 4096 --no-decode-steps
        # ingest and query_many alone: the whole bench no longer fits a 10-minute call
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_database import BANKS, MISTRAL_7B, TINY, TINY_BANKS, random_model, text_of, timed
from coda_db.documents import empty_state, read_document
from coda_db.query import Answerer
from coda_db.settings import Sampling
from coda_jax import CausalLM, concat_rows, generate, split_fits, tree_bytes
from train.evaluation.retention_workers import write_json

COPY_BYTES = 4 << 30


def copy_ceiling(total_bytes: int, repeats: int) -> dict:
    """Bytes/s of ``x + 1`` over a bf16 array of ``total_bytes`` (read and write)."""
    x = jnp.zeros((total_bytes // 2,), jnp.bfloat16)
    add = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    seconds = timed(lambda: add(x).block_until_ready(), repeats)
    return {"array_bytes": total_bytes, "seconds": seconds,
            "bytes_per_s": 2 * total_bytes / seconds}


def step_bytes(model: CausalLM, state_bytes_per_row: int, batch: int) -> int:
    """Bytes one decode step reads at least: the weights once (the input embedding
    is a gather of ``batch`` rows) and every row's state once."""
    weights = tree_bytes(nnx.state(model, nnx.Param))
    embedding = model.embed_tokens.embedding[...]
    gathered = batch * embedding.shape[-1] * embedding.dtype.itemsize
    return weights - tree_bytes(embedding) + gathered + batch * state_bytes_per_row


def decode_step_seconds(model: CausalLM, state, logits, short: int, long: int,
                        repeats: int, **options) -> float:
    """Seconds per greedy step: (time of ``long`` steps - time of ``short``) / the
    difference; ``options`` go to ``generate``."""
    def run(n):
        return lambda: jax.block_until_ready(generate(model, state, logits, max_new_tokens=n,
                                                      **options))

    return (timed(run(long), repeats) - timed(run(short), repeats)) / (long - short)


def write_results(path: str, model: CausalLM, results: dict, *, tiny: bool, steps: list[int],
                  repeats: int, block: int) -> None:
    """The results so far, with the device, versions and config, written atomically."""
    device = jax.devices()[0]
    out = {"benchmark": "bench_decode", "tiny": tiny,
           "device": {"platform": device.platform, "kind": device.device_kind},
           "versions": {"python": platform.python_version(), "jax": jax.__version__,
                        "flax": flax.__version__, "numpy": np.__version__},
           "config": {"model": dict(TINY if tiny else MISTRAL_7B),
                      "banks": TINY_BANKS if tiny else BANKS,
                      "dtype": str(model.embed_tokens.embedding[...].dtype), "steps": steps,
                      "repeats": repeats, "document_block": block,
                      "weight_bytes": tree_bytes(nnx.state(model, nnx.Param))},
           "results": results}
    write_json(Path(path), out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write the JSON to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model (CPU check)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,16,128,256)")
    parser.add_argument("--doc-lengths", default=None,
                        help="comma-separated document tokens (default 4096,32768)")
    parser.add_argument("--steps", default="8,40", help="SHORT,LONG greedy steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-decode-steps", action="store_true",
                        help="skip the per-batch step timings (ingest and query_many only: "
                        "each batch's steps compile twice, which a short call may not afford)")
    parser.add_argument("--stacked-baseline", action="store_true",
                        help="also time each step with generate(split_layers=False)")
    parser.add_argument("--apart-baseline", action="store_true",
                        help="also time each step with generate(join_projections=False)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    batches = [int(b) for b in (args.batches or ("1,3" if tiny else "1,16,128,256")).split(",")]
    lengths = [int(n) for n in (args.doc_lengths or ("64,256" if tiny else "4096,32768"))
               .split(",")]
    short, long = (int(n) for n in args.steps.split(","))
    # Each step also timed with generate's options of the baselines asked for.
    baselines = {name: options for name, options, asked in [
        ("stacked", dict(split_layers=False), args.stacked_baseline),
        ("apart", dict(join_projections=False), args.apart_baseline)] if asked}
    opened = random_model(tiny)
    model, tok, settings = opened.model, opened.tokenizer, opened.settings
    ceiling = copy_ceiling(1 << 24 if tiny else COPY_BYTES, args.repeats)
    print(f"copy ceiling: {ceiling['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    answerer = Answerer(opened)
    results: dict = {"copy_ceiling": ceiling, "documents": []}
    for length in lengths:
        text = text_of(length, length)
        ingest_s = timed(lambda t=text: read_document(opened, t), args.repeats)
        document = read_document(opened, text)
        ids = jnp.asarray(tok.encode(text).ids, jnp.int32)[None]
        state0 = empty_state(opened)
        prefill_s = timed(lambda: jax.block_until_ready(model.prefill(
            ids, state0, block_size=settings.block_size, last_only=True)), args.repeats)
        row_bytes = tree_bytes(document.state)
        entry = {"tokens": ids.shape[1], "state_bytes_per_row": row_bytes,
                 "ingest": {"seconds": ingest_s, "tokens_per_s": ids.shape[1] / ingest_s},
                 "engine_prefill": {"seconds": prefill_s,
                                    "tokens_per_s": ids.shape[1] / prefill_s},
                 "ingest_over_prefill_time": ingest_s / prefill_s, "decode": []}
        prompt = answerer.prompt_ids(text_of(12, 1))
        for batch in [] if args.no_decode_steps else batches:
            logits, state = answerer.read_prompts(concat_rows(*[document.state] * batch),
                                                  [prompt] * batch)
            split = split_fits(model, state)  # what generate decides by default
            step_s = decode_step_seconds(model, state, logits, short, long, args.repeats)
            need = step_bytes(model, row_bytes, batch)
            entry["decode"].append({
                "batch": batch, "split_layers": split, "step_seconds": step_s,
                "tokens_per_s": batch / step_s,
                "bytes_per_step": need, "achieved_bytes_per_s": need / step_s,
                "bound_step_seconds": need / ceiling["bytes_per_s"],
                "share_of_bound": need / ceiling["bytes_per_s"] / step_s})
            for name, options in baselines.items():  # the same steps another way
                other_s = decode_step_seconds(model, state, logits, short, long, args.repeats,
                                              **options)
                entry["decode"][-1] |= {f"{name}_step_seconds": other_s,
                                        f"{name}_share_of_bound":
                                            need / ceiling["bytes_per_s"] / other_s}
            del logits, state
            row = entry["decode"][-1]
            others = "".join(f"; {name} {row[f'{name}_step_seconds'] * 1e3:.2f} ms"
                             for name in baselines)
            print(f"{length} tokens, batch {batch}: {step_s * 1e3:.2f} ms/step, "
                  f"{row['share_of_bound']:.0%} of the bound, layers split {split}{others}",
                  flush=True)
        results["documents"].append(entry)
        write_results(args.out, model, results, tiny=tiny, steps=[short, long],
                      repeats=args.repeats, block=settings.block_size)  # kept if cut off
    # query_many as users call it, after the last document.
    sampling = Sampling(max_new_tokens=long, temperature=0.0, top_k=0, top_p=1.0)
    questions = [text_of(12, 10 + i) for i in range(max(batches))]
    results["query_many"] = []
    for batch in batches:
        seconds = timed(lambda b=batch: answerer.many([document.state] * b, questions[:b],
                                                      sampling), args.repeats)
        need = step_bytes(model, row_bytes, batch) * long
        results["query_many"].append({
            "batch": batch, "new_tokens": long, "seconds": seconds,
            "new_tokens_per_s": batch * long / seconds,
            "share_of_bound": need / ceiling["bytes_per_s"] / seconds})

    write_results(args.out, model, results, tiny=tiny, steps=[short, long],
                  repeats=args.repeats, block=settings.block_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
