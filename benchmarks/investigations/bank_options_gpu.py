"""Does a bank configuration run on this device? One process per configuration
(a failed kernel poisons the device for the rest of its process).

    python benchmarks/investigations/bank_options_gpu.py NAME   # one configuration
    python benchmarks/investigations/bank_options_gpu.py all    # each in a child process
    ROWS=256 python benchmarks/investigations/bank_options_gpu.py all   # the query batch
    DTYPE=float32 ...                                                   # weights and state
    IMPL=xla ...                                                        # attention kernels

A SmolLM2-shaped bounded model (2 layers, random weights, bf16 unless DTYPE says)
reads a 3,000-token document block by block (128), then prefills a 24-token question
over the state and decodes 8 tokens, as the database's ingest and query do; ``ok`` or the error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

BASE = dict(window=1024, num_landmarks_exact=512, exact_candidates_per_block=128,
            write_gate_threshold_exact=0.5, exact_novelty_threshold=0.95,
            exact_eviction="gate", write_gate_lookahead=4)
CONFIGS = {"summary 64": BASE | dict(num_landmarks_summary=64),
           "summary 64 sinks 4": BASE | dict(num_landmarks_summary=64, sink_tokens=4),
           "summary 0": BASE | dict(num_landmarks_summary=0),
           "summary 0 sinks 4": BASE | dict(num_landmarks_summary=0, sink_tokens=4),
           "summary 1 sinks 4": BASE | dict(num_landmarks_summary=1, sink_tokens=4)}


def run(name: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from coda_jax import CausalLM, DecoderConfig

    dtype = jnp.dtype(os.environ.get("DTYPE", "bfloat16"))
    shape = dict(family="llama", vocab_size=2048, hidden_size=576, intermediate_size=1536,
                 num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64)
    model = CausalLM(DecoderConfig(**shape), attention="coda_bounded",
                     attention_options=CONFIGS[name] | dict(implementation=os.environ.get("IMPL")),
                     param_dtype=dtype,
                     rngs=nnx.Rngs(0))
    rows = int(os.environ.get("ROWS", "4"))
    doc = jax.random.randint(jax.random.key(1), (rows, int(os.environ.get("DOC", "3000"))), 0, 2048)
    _, state = model.prefill(doc, model.init_state(rows, dtype, key=jax.random.key(3)),
                             block_size=128)
    question = jax.random.randint(jax.random.key(2), (rows, 24), 0, 2048)
    logits, state = model.prefill(question, state, block_size=128)
    token = jnp.argmax(logits[:, -1], -1)[:, None]
    for _ in range(8):
        logits, state = model.step(token, state)
        token = jnp.argmax(logits[:, -1], -1)[:, None]
    jax.block_until_ready(token)


def main() -> int:
    name = " ".join(sys.argv[1:])
    if name != "all":
        run(name)
        print(f"{name}: ok", flush=True)
        return 0
    for name in CONFIGS:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, *name.split()], capture_output=True,
                              text=True)
        lines = [l for l in done.stderr.splitlines() if "Error" in l or "error" in l]
        error = lines[-1][:300] if lines and done.returncode else ""
        print(f"{name}: {'ok' if done.returncode == 0 else 'FAILED'} "
              f"({time.perf_counter() - start:.0f} s) {error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
