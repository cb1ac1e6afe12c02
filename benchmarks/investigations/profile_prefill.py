"""Where the GPU time of one bounded-layer prefill goes (tuning aid).

    python benchmarks/investigations/profile_prefill.py --out DIR [--block 1024]
        [--implementation cudnn] [--hlo]

Traces three prefills of L=4096 tokens (bf16, W=256 Me=64 Ms=64, the two layer
shapes of bench_layer.py) with the JAX profiler, reads the Perfetto trace and
prints, per call: wall time, GPU busy time, kernel launches, the kernels
that take the most time, where the GPU sits idle between kernels, and the
host's traced events (XLA's runtime: thunks, command-buffer updates) by time.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from coda_jax import runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench_layer
from bench_layer import LENGTH, SHAPES, random_layer  # noqa: E402


def _segment(layer, x, lengths, state, *, block_size, unroll):
    return layer.prefill_segment(x, lengths, state, block_size=block_size, training=False,
                                 unroll=unroll)


# The same program as one compiled prefill call of the layer (for --hlo).
segment_jit = jax.jit(_segment, static_argnames=("block_size", "unroll"))


def trace_events(trace_dir: str) -> tuple[list[dict], list[dict]]:
    """The complete events ("X") of GPU streams and of host threads in the newest
    Perfetto trace."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    print("trace processes:", sorted(set(names.values())))
    gpu_pids = {pid for pid, name in names.items() if "GPU" in name}
    complete = [e for e in events if e.get("ph") == "X"]
    return ([e for e in complete if e["pid"] in gpu_pids],
            [e for e in complete if e["pid"] not in gpu_pids])


def busy_us(kernels: list[dict]) -> float:
    """Union of kernel intervals (streams may overlap)."""
    total, end = 0.0, -1.0
    for e in sorted(kernels, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def idle_gaps(kernels: list[dict], top: int = 12) -> dict:
    """Where the GPU waits between kernels: the largest idle gaps (with the kernels
    around them) and how idle time splits between short and long gaps."""
    gaps, end, prev = [], None, None
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            gaps.append((e["ts"] - end, prev, e["name"][:60]))
        if end is None or e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e["name"][:60]
    return {"idle_us_in_gaps_under_10us": sum(g for g, *_ in gaps if g < 10),
            "idle_us_in_gaps_10_to_100us": sum(g for g, *_ in gaps if 10 <= g < 100),
            "largest_gaps": [{"us": round(g, 1), "after": a, "before": b}
                             for g, a, b in sorted(gaps, reverse=True)[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--chunks-per-call", type=int, default=None)
    parser.add_argument("--implementation", default=None)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--hlo", action="store_true",
                        help="also write the optimised HLO of one compiled call (hlo_d{D}.txt)")
    args = parser.parse_args()
    report = []
    for shape in SHAPES:
        d = shape["embed_dim"]
        layer, x, st = random_layer(shape, args.implementation)
        extra = {} if args.chunks_per_call is None else {"chunks_per_call": args.chunks_per_call}

        def run():
            jax.block_until_ready(layer.prefill(x, st, block_size=args.block, **extra))
        for _ in range(3):
            run()
        if args.hlo:  # the compiled segment: which fusions (kernels) one block runs
            seg = LENGTH if args.chunks_per_call is None else args.block * args.chunks_per_call
            lengths = jnp.full((1,), seg, jnp.int32)
            text = segment_jit.lower(
                layer, x[:, :seg], lengths, st, block_size=args.block,
                unroll=runner.default_unroll()).compile().as_text()
            with open(f"{args.out}/hlo_d{d}.txt", "w") as f:
                f.write(text)
        trace_dir = f"{args.out}/trace_d{d}"
        os.makedirs(trace_dir, exist_ok=True)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.calls):
                run()
            wall = (time.perf_counter() - start) / args.calls
        kernels, host = trace_events(trace_dir)
        by_name, host_by_name = collections.Counter(), collections.Counter()
        for e in kernels:
            by_name[e["name"][:90]] += e["dur"]
        for e in host:  # nested events each count: read them as a call tree's totals
            host_by_name[e["name"][:90]] += e["dur"]
        entry = {"D": d, "block": args.block, "implementation": args.implementation,
                 "wall_ms_per_call": wall * 1e3,
                 "gpu_busy_ms_per_call": busy_us(kernels) / 1e3 / args.calls,
                 "kernels_per_call": len(kernels) / args.calls,
                 "idle_gaps_all_calls": idle_gaps(kernels),
                 "top_kernels_ms_per_call": {n: t / 1e3 / args.calls
                                             for n, t in by_name.most_common(25)},
                 "host_events_ms_per_call": {n: t / 1e3 / args.calls
                                             for n, t in host_by_name.most_common(30)}}
        report.append(entry)
        print(json.dumps(entry, indent=1), flush=True)
    with open(f"{args.out}/profile_prefill.json", "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
