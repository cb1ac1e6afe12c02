"""Where the host time of one bounded-layer prefill call goes (tuning aid).

    python benchmarks/host_profile.py [--block 1024] [--calls 50]

For the two layer shapes of bench_layer.py (L=4096, bf16): the time until
``prefill`` returns (dispatch: everything the host does before the GPU can
run on its own) against the time until its result is ready, then the Python
functions that take the host's time (cProfile, sorted by own time).
"""
import argparse
import cProfile
import io
import pstats
import statistics
import time

import jax

from bench_layer import SHAPES, random_layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--implementation", default=None, help="attention: pallas, cudnn, xla")
    parser.add_argument("--no-profile", action="store_true", help="timings only")
    args = parser.parse_args()
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
