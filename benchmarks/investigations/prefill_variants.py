"""Prefill tokens/s of the bounded layer under variants, timed in turns in one process.

    python benchmarks/investigations/prefill_variants.py LABEL [--unroll True 1]
        [--configs 1024x4 256x16] [--baseline PACKAGE] [--out results.json]

Each config is block_size x chunks_per_call; L=4096, bf16, W=256/Me=64/Ms=64, the
two layer shapes of bench_layer.py. The variants are the scan unroll values,
with ``--bound`` the layer's ``prefill_fn()`` (weights bound once) and,
with ``--baseline``, the same layer from another copy of ``coda_jax`` importable
as PACKAGE (e.g. an older commit's package, to measure a change in one run), and
with ``--compiler-options``, the prefill compiled with other XLA options.
Variants take turns within every round, each call waited for as in
bench_layer.py, so drifting clocks hit them alike. Run it again under other
XLA_FLAGS to compare flags (LABEL tags the lines).
"""
import argparse
import functools
import importlib
import json
import statistics
import sys
from pathlib import Path

import jax
from flax import nnx

from coda_jax import runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench_layer
from bench_layer import LENGTH, SHAPES, per_call_rounds, random_layer  # noqa: E402


def _option_value(text: str) -> bool | int | str:
    """An XLA option's value from the command line: XLA wants bools and ints typed."""
    if text in ("True", "False"):
        return text == "True"
    return int(text) if text.lstrip("-").isdigit() else text


def _segment(layer, x, lengths, state, *, block_size, unroll):
    """One compiled prefill call's program (``layer.prefill_segment``, no training)."""
    return layer.prefill_segment(x, lengths, state, block_size=block_size, training=False,
                                 unroll=unroll)


def _bound_runner(layer, x, state):
    """``run(block, chunks_per_call)`` through ``layer.prefill_fn()``, bound once per config."""
    bound = {}

    def run(block, cpc):
        if (block, cpc) not in bound:
            bound[block, cpc] = layer.prefill_fn(block_size=block, chunks_per_call=cpc)
        return jax.block_until_ready(bound[block, cpc](x, state))
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("label")
    parser.add_argument("--unroll", nargs="*", default=["True"])
    parser.add_argument("--configs", nargs="*", default=["1024x4", "256x16"])
    parser.add_argument("--baseline", help="another copy of coda_jax, importable by this name")
    parser.add_argument("--compiler-options", nargs="*", default=[], metavar="NAME=VALUE;...",
                        help="variants compiling the prefill with these XLA options, e.g. "
                             "xla_gpu_graph_min_graph_size=1000000")
    parser.add_argument("--bound", action="store_true",
                        help="a variant calling the layer's prefill_fn() (weights bound once)")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {"label": args.label, "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "k_tokens_per_s": {}, "per_round_ratio_to_baseline": {},
               "per_round_ratio_to_first": {}}
    for shape in SHAPES:
        d = shape["embed_dim"]
        layer, x, st = random_layer(shape)
        variants = {}
        for unroll in args.unroll:
            value = True if unroll == "True" else int(unroll)

            def run(block, cpc, value=value):
                return jax.block_until_ready(
                    layer.prefill(x, st, block_size=block, chunks_per_call=cpc, unroll=value))
            variants[f"unroll={unroll}"] = run
        if args.bound:
            variants["prefill_fn"] = _bound_runner(layer, x, st)
        for options in args.compiler_options:
            parsed = {name: _option_value(value) for name, value in
                      (o.split("=", 1) for o in options.split(";"))}
            jitted = jax.jit(_segment, compiler_options=parsed,
                             static_argnames=("block_size", "unroll"))

            def run_with(block, cpc, jitted=jitted):  # the default unroll, as layer.prefill
                segment_fn = functools.partial(jitted, layer, block_size=block,
                                               unroll=runner.default_unroll())
                return jax.block_until_ready(runner.run_segments(
                    layer, segment_fn, x, st, block_size=block, chunks_per_call=cpc))
            variants[options] = run_with
        if args.baseline:
            base, _, base_st = random_layer(shape, package=importlib.import_module(args.baseline))
            nnx.update(base, nnx.state(layer))

            def run_base(block, cpc):
                return jax.block_until_ready(
                    base.prefill(x, base_st, block_size=block, chunks_per_call=cpc))
            # With --bound the baseline is bound too, as the variant it is timed against.
            variants[f"baseline {args.baseline}"] = (
                _bound_runner(base, x, base_st) if args.bound else run_base)
        for config in args.configs:
            block, cpc = map(int, config.split("x"))
            fns = {name: (lambda run=run: run(block, cpc)) for name, run in variants.items()}
            for name, fn in list(fns.items()):
                try:  # an XLA option this jax or GPU rejects drops its variant, not the run
                    fn()
                except Exception as error:  # noqa: BLE001
                    print(f"{args.label} D={d} {name} block={block}: failed: "
                          f"{type(error).__name__}: {str(error)[:300]}", flush=True)
                    del fns[name]
            seconds = per_call_rounds(fns)
            first = next(iter(seconds))
            for name, per_round in seconds.items():
                rate = LENGTH / statistics.median(per_round) / 1e3
                results["k_tokens_per_s"][f"D{d} {config} {name}"] = round(rate)
                print(f"{args.label} D={d} {name} block={block} chunks_per_call={cpc}: "
                      f"{rate:.0f} K tok/s", flush=True)
                if name != first:
                    results["per_round_ratio_to_first"][f"D{d} {config} {name}"] = [
                        round(f / s, 3) for s, f in zip(per_round, seconds[first])]
                if args.baseline and not name.startswith("baseline"):
                    base_rounds = seconds[f"baseline {args.baseline}"]
                    results["per_round_ratio_to_baseline"][f"D{d} {config} {name}"] = [
                        round(b / s, 3) for s, b in zip(per_round, base_rounds)]
    print(json.dumps({k: v for k, v in results.items() if k.startswith("per_round")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
