"""Which part of a bounded prefill call costs the host its time (tuning aid).

    python benchmarks/investigations/dispatch_bisect.py [--out dispatch_bisect.json]

At D=4096, block 1024, 4096 tokens, weights bound once (no module walk): the
time until the call returns (host work: dispatch, XLA's thunks, graph launch)
and until its result is ready, for growing prefixes of the prefill
computation compiled alone: the projections; plus the bank writes; the whole
segment (also with a 2 ms pause between calls, to see whether buffers still
being released change the next call); and the whole segment with XLA or cuDNN
attention. Medians of 100 calls, each waited for.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from coda_jax import bank_writes
from coda_jax.runner import bind_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench_layer
from bench_layer import SHAPES, random_layer  # noqa: E402

BLOCK = 1024


def projections(layer, x, lengths, state):
    """(q, k, v, lambda, write gate) of the whole segment: the first step of the
    layer's ``prefill_segment``."""
    return layer.segment_projections(x, state)


def with_writes(layer, x, lengths, state):
    q, k, v, lam, gate = projections(layer, x, lengths, state)
    state, seen = bank_writes.write_segment(
        layer.layout, state, k=k, v=v, gate=gate, lengths=lengths, block_size=BLOCK,
        eta_logit=layer.summary_eta_logit[...], training=False, unroll=True)
    return q, lam, state, seen


def whole(layer, x, lengths, state):
    return layer.prefill_segment(x, lengths, state, block_size=BLOCK, training=False,
                                 unroll=True)


def timings(fn, *args, calls: int = 100, pause_s: float = 0.0) -> dict:
    for _ in range(20):
        jax.block_until_ready(fn(*args))
    dispatch, ready = [], []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn(*args)
        dispatch.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        ready.append(time.perf_counter() - start)
        del out
        time.sleep(pause_s)
    return {"dispatch_us": round(statistics.median(dispatch) * 1e6),
            "ready_us": round(statistics.median(ready) * 1e6)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    shape = SHAPES[1]
    rows = {}
    for impl in (None, "xla", "cudnn"):
        layer, x, st = random_layer(shape, implementation=impl)
        lengths = jnp.full((1,), x.shape[1], jnp.int32)
        stages = {"projections": projections, "projections+writes": with_writes,
                  "whole segment": whole} if impl is None else {"whole segment": whole}
        for name, stage in stages.items():
            label = f"{name} ({impl or 'pallas'} attention)" if name == "whole segment" else name
            rows[label] = timings(bind_weights(layer, stage), x, lengths, st)
            print(label, rows[label], flush=True)
            if name == "whole segment" and impl is None:  # buffers released before the next call?
                paused = f"{label}, 2 ms pause between calls"
                rows[paused] = timings(bind_weights(layer, stage), x, lengths, st, pause_s=2e-3)
                print(paused, rows[paused], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "shape": shape, "block": BLOCK, "tokens": 4096, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
