"""Where ``query_many``'s time goes beyond its decode steps (issue 30).

``bench_decode.py`` times a batch-128 ``generate`` step at about 62% of the bandwidth
bound while ``Answerer.many`` for 40 new tokens at batch 128 reaches about 30%. This
times the parts of ``many`` one by one on the same Mistral-7B-shaped model and bank,
after one document, each the best of ``--repeats`` runs after a warm-up: the rows'
states joined (``concat_rows``), the questions read into them (``read_prompts``),
``generate`` of the new tokens from there, the answers' text, and ``many`` whole.

    python benchmarks/investigations/query_many_parts.py --out parts.json [--tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_database import random_model, text_of, timed  # noqa: E402
from coda_db.documents import read_document  # noqa: E402
from coda_db.query import Answerer  # noqa: E402
from coda_db.settings import Sampling  # noqa: E402
from coda_jax import concat_rows, generate, split_fits  # noqa: E402
from train.evaluation.retention_workers import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model (CPU check)")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 128; tiny 3)")
    parser.add_argument("--doc-length", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    batch = args.batch or (3 if args.tiny else 128)
    length = args.doc_length or (256 if args.tiny else 4096)
    opened = random_model(args.tiny)
    answerer = Answerer(opened)
    document = read_document(opened, text_of(length, length))
    questions = [text_of(12, 10 + i) for i in range(batch)]
    prompts = [answerer.prompt_ids(q) for q in questions]
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    states = [document.state] * batch

    def join():
        return jax.block_until_ready(concat_rows(*states))

    joined = join()

    def read():
        return jax.block_until_ready(answerer.read_prompts(joined, prompts))

    logits, state = read()

    def decode():
        return jax.block_until_ready(generate(
            opened.model, state, logits, max_new_tokens=args.new_tokens,
            stop_tokens=opened.settings.stop_tokens, return_state=False))

    split_default = split_fits(opened.model, state, keep_state=False)  # generate's default
    memory = jax.devices()[0].memory_stats() or {}
    tokens, counts, _ = decode()
    rows = [row[:count].tolist() for row, count in zip(np.asarray(tokens), np.asarray(counts))]

    def text():
        return [opened.tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]

    def generate_of(new_tokens: int, split: bool):
        return lambda: jax.block_until_ready(generate(
            opened.model, state, logits, max_new_tokens=new_tokens, return_state=False,
            split_layers=split))

    parts = {"concat_rows": join, "read_prompts": read, "generate": decode, "text": text,
             "many": lambda: answerer.many(states, questions, sampling)}
    # generate's cost apart from its steps: no stop tokens, 1 and the full count of steps,
    # the layers split apart before the loop (the GPU's default) and not.
    for split in (True, False):
        for n in (1, args.new_tokens):
            parts[f"generate_{n}_tokens_split_{split}"] = generate_of(n, split)
    seconds = {}
    for name, fn in parts.items():
        seconds[name] = timed(fn, args.repeats)
        print(f"{name}: {seconds[name] * 1e3:.1f} ms", flush=True)
    device = jax.devices()[0]
    write_json(Path(args.out), {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "device": device.device_kind, "jax": jax.__version__, "batch": batch,
        "document_tokens": length, "new_tokens": args.new_tokens,
        "tokens_generated_per_row": np.asarray(counts).tolist()[:8],
        "generate_splits_layers_by_default": split_default,
        "memory_at_generate": {k: memory[k] for k in ("bytes_in_use", "bytes_limit")
                               if k in memory},
        "seconds": seconds,
        "parts_over_many": {k: v / seconds["many"] for k, v in seconds.items() if k != "many"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
