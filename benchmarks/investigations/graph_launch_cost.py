"""Per-call time of a jitted chain of N small dependent kernels (one CUDA graph
under XLA's command buffers): how a call's host cost grows with its kernel count.

    python benchmarks/investigations/graph_launch_cost.py [--out graph_launch_cost.json]

Each kernel is a tiny elementwise op on a 4 KB array kept apart by an
optimisation barrier, so the GPU time is negligible and the per-call time is
the host's (dispatch, graph update and launch) plus launch latency. Timed per
call (waited for, as bench_layer.py times prefill) and 8 calls back to back.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def chain(n: int):
    @jax.jit
    def run(x):
        for i in range(n):
            x = jax.lax.optimization_barrier(jnp.sin(x) * (1.0 + i * 1e-3))
        return x
    return run


def per_call_us(fn, x, calls: int = 200) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def queued_us(fn, x, calls: int = 8, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(x) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    x = jnp.ones((1024,), jnp.float32)
    rows = []
    for n in (1, 16, 64, 128, 256):
        fn = chain(n)
        fn(x).block_until_ready()
        per_call_us(fn, x, 50)
        rows.append({"kernels": n, "per_call_us": round(per_call_us(fn, x), 1),
                     "queued_per_call_us": round(queued_us(fn, x), 1)})
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
