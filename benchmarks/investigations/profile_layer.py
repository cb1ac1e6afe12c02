"""Where the time goes in one bounded layer on the GPU: a kernel-level summary.

Traces a prefill and a compiled decode loop with ``jax.profiler`` and prints,
per phase, wall time, summed GPU kernel time, kernel count and the costliest
kernels. Used to steer optimisation; the numbers that count come from
``bench_layer.py``.

    python benchmarks/investigations/profile_layer.py --embed-dim 4096 --heads 32 --kv-heads 8
"""

from __future__ import annotations

import argparse
import collections
import glob
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from coda_jax import CoDAGQALandmark


def kernel_summary(trace_dir: str, top: int) -> str:
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    first, last = float("inf"), 0.0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "XLA Ops" in line.name or "Stream" not in line.name:
                continue
            for event in line.events:
                entry = totals[event.name]
                entry[0] += 1
                entry[1] += event.duration_ns / 1e3
                first = min(first, event.start_ns)
                last = max(last, event.start_ns + event.duration_ns)
    total_us = sum(v[1] for v in totals.values())
    count = sum(v[0] for v in totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    lines = [f"  kernels: {count}, summed GPU time {total_us / 1e3:.3f} ms, "
             f"first kernel start to last kernel end {(last - first) / 1e6:.3f} ms"]
    lines += [f"  {us / 1e3:8.3f} ms {n:6d}x  {name[:100]}" for name, (n, us) in rows]
    return "\n".join(lines)


def traced(fn, top: int) -> None:
    fn()
    fn()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            fn()
        print(f"  wall {wall * 1e3:.3f} ms")
        print(kernel_summary(d, top))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--embed-dim", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--implementation", default=None, choices=[None, "xla", "cudnn"])
    a = p.parse_args()
    layer = CoDAGQALandmark(embed_dim=a.embed_dim, num_heads=a.heads, num_kv_heads=a.kv_heads,
                            window=256, num_landmarks_exact=64, num_landmarks_summary=64,
                            param_dtype=jnp.bfloat16, implementation=a.implementation,
                            rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, a.length, a.embed_dim), jnp.bfloat16)
    state = layer.init_state(1, jnp.bfloat16, key=jax.random.key(2))

    print(f"prefill L={a.length} block={a.block} D={a.embed_dim} impl={a.implementation}")
    traced(lambda: jax.block_until_ready(layer.prefill(x, state, block_size=a.block)), a.top)
    _, state = layer.prefill(x, state, block_size=a.block)

    tokens = jax.random.normal(jax.random.key(3), (1, a.steps, a.embed_dim), jnp.bfloat16)

    print(f"decode loop of {a.steps} steps")
    traced(lambda: jax.block_until_ready(layer.decode(tokens, state)), a.top)
    print(f"decode per call x {a.steps}")

    def per_call():
        st = state
        for t in range(a.steps):
            y, st = layer.step(tokens[:, t:t + 1], st)
        jax.block_until_ready(st)
    traced(per_call, 8)


if __name__ == "__main__":
    main()
