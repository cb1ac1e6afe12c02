"""Where the host time of one bounded-layer prefill call goes (tuning aid).

    python benchmarks/investigations/host_profile.py [--block 1024] [--calls 50]
    python benchmarks/investigations/host_profile.py --python-only --out host_python_cpu.json

For the two layer shapes of bench_layer.py (L=4096, bf16): the time until
``prefill`` returns (dispatch: everything the host does before the GPU can
run on its own) against the time until its result is ready, then the Python
functions that take the host's time (cProfile, sorted by own time).
``--python-only`` (any backend, no profiler) times the pure-Python parts of a
call apart: flattening the NNX layer into jit's arguments, and the runner's
own work for a prefill call (``runner.run_segments``: argument checks,
segmenting, joining the outputs) around a no-op in place of the compiled call.
"""
import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import jax

from coda_jax import runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench_layer
from bench_layer import SHAPES, random_layer  # noqa: E402


def _mean_us(fn, calls: int = 2000) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def python_overhead(block: int) -> dict:
    """Microseconds per call of the Python-side parts of ``prefill``, per shape."""
    out = {}

    def no_op(x_seg, seg_lengths, state):  # stands in for the compiled segment call
        return x_seg, state

    for shape in SHAPES:
        layer, x, st = random_layer(shape)
        flatten = _mean_us(lambda: jax.tree.flatten(layer))
        rest = _mean_us(lambda: runner.run_segments(layer, no_op, x, st, block_size=block,
                                                    chunks_per_call=None))
        out[f"D{shape['embed_dim']}"] = {"flatten_layer_us": round(flatten, 1),
                                         "prefill_without_compiled_call_us": round(rest, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--implementation", default=None, help="attention: pallas, cudnn, xla")
    parser.add_argument("--no-profile", action="store_true", help="timings only")
    parser.add_argument("--python-only", action="store_true",
                        help="only the pure-Python parts of a call (any backend)")
    parser.add_argument("--out", help="JSON file for --python-only")
    args = parser.parse_args()
    if args.python_only:
        result = {"what": "Python-side host time of one prefill call (host_profile.py "
                          "--python-only)", "backend": jax.default_backend(),
                  "jax": jax.__version__, "block": args.block,
                  "per_shape": python_overhead(args.block)}
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    for shape in SHAPES:
        d = shape["embed_dim"]
        layer, x, st = random_layer(shape, args.implementation)
        for _ in range(10):
            jax.block_until_ready(layer.prefill(x, st, block_size=args.block))
        dispatch, total = [], []
        for _ in range(args.calls):
            start = time.perf_counter()
            out = layer.prefill(x, st, block_size=args.block)
            dispatch.append(time.perf_counter() - start)
            jax.block_until_ready(out)
            total.append(time.perf_counter() - start)
        print(f"D={d} block={args.block} attention={args.implementation or 'default'}: "
              f"dispatch {statistics.median(dispatch) * 1e6:.0f} us, "
              f"until ready {statistics.median(total) * 1e6:.0f} us (medians)", flush=True)
        if args.no_profile:
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            jax.block_until_ready(layer.prefill(x, st, block_size=args.block))
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        print(text.getvalue()[-4000:], flush=True)


if __name__ == "__main__":
    main()
