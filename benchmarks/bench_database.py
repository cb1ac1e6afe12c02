"""Neural-database throughput: questions/s of ``query_many`` and ingest tokens/s.

On a Mistral-7B-shaped bounded model with random bf16 weights (32 layers,
D=4096, 32/8 heads, W=256, Me=64, Ms=64): ingest of one document through
``NeuralDatabase.ingest`` (tokens/s), the batched prefill of 128 documents of
512 tokens (one call: it must fit), then ``query_many`` over 1, 16 and 128 of
those states (questions/s, greedy, ``--new-tokens`` tokens each, compile
excluded). Writes a JSON with the device, versions and every figure.

    python benchmarks/bench_database.py --out benchmarks/results/database_h200.json
    python benchmarks/bench_database.py --tiny --out /tmp/db_tiny.json   # CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_jax import CausalLM, DecoderConfig, select_rows
from coda_db.documents import empty_state, read_document
from coda_db.model_source import OpenModel, tokenizer_fingerprint
from coda_db.query import Answerer
from coda_db.settings import QuerySettings, Sampling, read_block

MISTRAL_7B = dict(family="mistral", vocab_size=32000, hidden_size=4096,
                  intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                  head_dim=128, rope_theta=1e6)
TINY = dict(family="llama", vocab_size=320, hidden_size=32, intermediate_size=48,
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
BANKS = dict(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
TINY_BANKS = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4)
WORDS = 256


def word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer over ``w0 .. w{WORDS-1}`` (ids < vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(min(WORDS, vocab - 1))}
    words["[UNK]"] = len(words)
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def text_of(tokens: int, seed: int) -> str:
    """A text of ``tokens`` random words."""
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(0, WORDS, tokens))


def timed(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, after one warm-up (compile)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_model(tiny: bool) -> OpenModel:
    """The benchmarks' database model: the 7B shape (tiny: a float32 toy) with random
    weights and its bank, a word tokenizer, a plain prompt, 1,024-token reads (tiny: 16)."""
    cfg = DecoderConfig(**(TINY if tiny else MISTRAL_7B))
    model = CausalLM(cfg, attention="coda_bounded",
                     attention_options=TINY_BANKS if tiny else BANKS,
                     param_dtype=jnp.float32 if tiny else jnp.bfloat16, rngs=nnx.Rngs(0))
    tok = word_tokenizer(cfg.vocab_size)
    settings = QuerySettings(prompt="w1 w2 w3 {question} w4", sampling=Sampling(),
                             stop_tokens=(), block_size=16 if tiny else 1024)
    return OpenModel(model=model, tokenizer=tok, name="random weights", path="(in memory)",
                     model_sha256="random", tokenizer_sha256=tokenizer_fingerprint(tok),
                     settings=settings)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write the JSON to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model (CPU check)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,16,128)")
    parser.add_argument("--doc-tokens", type=int, default=None, help="tokens per document")
    parser.add_argument("--ingest-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tiny = args.tiny
    batches = [int(b) for b in (args.batches or ("1,4,8" if tiny else "1,16,128")).split(",")]
    doc_tokens = args.doc_tokens or (64 if tiny else 512)
    ingest_tokens = args.ingest_tokens or (2048 if tiny else 32768)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    cfg = DecoderConfig(**(TINY if tiny else MISTRAL_7B))
    banks = TINY_BANKS if tiny else BANKS

    start = time.perf_counter()
    opened = random_model(tiny)
    model, settings = opened.model, opened.settings
    built = time.perf_counter() - start
    results: dict = {"model_build_s": built}

    # Ingest: one document through the streamed reader.
    text = text_of(ingest_tokens, 0)
    seconds = timed(lambda: read_document(opened, text), args.repeats)
    results["ingest"] = {"tokens": ingest_tokens, "seconds": seconds,
                         "tokens_per_s": ingest_tokens / seconds}

    # Batched prefill of the largest batch of documents, sized to the real tokens.
    rows = max(batches)
    ids = np.random.default_rng(1).integers(0, min(WORDS, cfg.vocab_size), (rows, doc_tokens))
    block = read_block(settings.block_size, doc_tokens)
    state0 = empty_state(opened, rows)

    def prefill():
        _, st = model.prefill(ids.astype(np.int32), state0, block_size=block, last_only=True)
        return jax.block_until_ready(st)

    seconds = timed(prefill, args.repeats)
    states = prefill()
    results["batched_prefill"] = {"rows": rows, "tokens_per_row": doc_tokens, "block": block,
                                  "seconds": seconds,
                                  "tokens_per_s": rows * doc_tokens / seconds}

    # query_many over 1, 16, 128 documents (each its own state, all at one position).
    answerer = Answerer(opened)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    per_row = [select_rows(states, i) for i in range(rows)]
    questions = [text_of(12, 10 + i) for i in range(rows)]
    results["query_many"] = []
    for batch in batches:
        seconds = timed(lambda b=batch: answerer.many(per_row[:b], questions[:b], sampling),
                        args.repeats)
        results["query_many"].append({
            "batch": batch, "seconds": seconds, "questions_per_s": batch / seconds,
            "new_tokens_per_s": batch * args.new_tokens / seconds})
        print(f"query_many batch {batch}: {batch / seconds:.2f} questions/s", flush=True)

    device = jax.devices()[0]
    out = {"benchmark": "bench_database", "tiny": tiny,
           "device": {"platform": device.platform, "kind": device.device_kind,
                      "count": jax.device_count()},
           "versions": {"python": platform.python_version(), "jax": jax.__version__,
                        "flax": flax.__version__, "numpy": np.__version__},
           "config": {"model": dict(TINY if tiny else MISTRAL_7B), "banks": banks,
                      "dtype": str(jnp.dtype(dtype)), "doc_tokens": doc_tokens,
                      "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "document_block": settings.block_size},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
