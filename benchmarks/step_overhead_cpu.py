"""Host overhead of one decode step called from Python: ``step`` vs ``step_fn``.

Tiny shapes on the CPU, so the time is dispatch, not arithmetic: one bounded
layer (D=64) and an 8-layer bounded model; median of 5 runs of 300 calls, with
the compiled ``decode`` loop's per-token time for scale.

    python benchmarks/step_overhead_cpu.py --out benchmarks/results/step_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from coda_jax import CoDAGQALandmark
from coda_jax.decoder import CausalLM
from coda_jax.model_config import DecoderConfig

CALLS = 300


def per_call_us(fn, x, state) -> float:
    jax.block_until_ready(fn(x, state)[0])
    runs = []
    for _ in range(5):
        start, s = time.perf_counter(), state
        for _ in range(CALLS):
            y, s = fn(x, s)
        jax.block_until_ready(y)
        runs.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layer = CoDAGQALandmark(embed_dim=64, num_heads=2, num_kv_heads=1, window=16,
                            num_landmarks_exact=4, num_landmarks_summary=4, rngs=nnx.Rngs(0))
    state = layer.init_state(1, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(0), (1, 1, 64))
    xs = jax.random.normal(jax.random.key(2), (1, CALLS, 64))
    jax.block_until_ready(layer.decode(xs, state)[0])
    start = time.perf_counter()
    jax.block_until_ready(layer.decode(xs, state)[0])
    loop_us = (time.perf_counter() - start) / CALLS * 1e6
    cfg = DecoderConfig(family="llama", vocab_size=53, hidden_size=32, intermediate_size=48,
                        num_layers=8, num_heads=4, num_kv_heads=2, head_dim=8)
    model = CausalLM(cfg, attention="coda_bounded", rngs=nnx.Rngs(0),
                     attention_options=dict(window=4, num_landmarks_exact=2,
                                            num_landmarks_summary=2))
    model_state = model.init_state(1, key=jax.random.key(0))
    token = jnp.array([[3]], jnp.int32)
    result = {
        "what": __doc__.split("\n\n")[0], "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "layer_us": {"step": per_call_us(layer.step, x, state),
                     "step_fn": per_call_us(layer.step_fn(), x, state),
                     "decode_loop_per_token": loop_us},
        "model_8_layers_us": {"step": per_call_us(model.step, token, model_state),
                              "step_fn": per_call_us(model.step_fn(), token, model_state)},
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
