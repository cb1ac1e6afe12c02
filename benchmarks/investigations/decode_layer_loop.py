"""Is bounded decode slow because of its layer loop? One decode step of the 7B-shaped
bounded model (random bf16 weights), timed as a compiled function of (token, state):

- ``scan``: as the engine runs it, ``lax.scan`` over the stacked layers (each layer's
  weights a dynamic slice of the stacked arrays);
- ``unrolled``: the same scan with ``unroll=True`` (static slices).

Run it once plainly and once with ``XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true``
(a dynamic slice feeding a GEMM read in place): if the slices are copied before each
matmul, the weights cross memory three times, not once.

    python benchmarks/investigations/decode_layer_loop.py --out RESULTS.json [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_database import BANKS, MISTRAL_7B, TINY, TINY_BANKS, timed
from bench_decode import copy_ceiling, step_bytes
from coda_jax import CausalLM, DecoderConfig, concat_rows, tree_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batches", default="1,128")
    args = parser.parse_args(argv)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cfg = DecoderConfig(**(TINY if args.tiny else MISTRAL_7B))
    model = CausalLM(cfg, attention="coda_bounded",
                     attention_options=TINY_BANKS if args.tiny else BANKS, param_dtype=dtype,
                     rngs=nnx.Rngs(0))
    ceiling = copy_ceiling(1 << 24 if args.tiny else 4 << 30, 3)["bytes_per_s"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 1024)), jnp.int32)
    _, one = model.prefill(tokens, model.init_state(1, dtype, key=jax.random.key(0)),
                           block_size=1024, last_only=True)
    graphdef, params = nnx.split(model)
    scan = jax.lax.scan
    results = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "copy_ceiling": ceiling,
               "variants": {}}
    for name, patched in (("scan", scan), ("unrolled", functools.partial(scan, unroll=True))):
        def step(params, token, state, patched=patched):
            with mock.patch.object(jax.lax, "scan", patched):
                return nnx.merge(graphdef, params).decode_step(token, state)

        fn = jax.jit(step)
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            state = concat_rows(*[one] * batch)
            token = jnp.zeros((batch, 1), jnp.int32)
            seconds = timed(lambda: jax.block_until_ready(fn(params, token, state)), 5)
            need = step_bytes(model, tree_bytes(one), batch)
            rows.append({"batch": batch, "step_seconds": seconds,
                         "share_of_bound": need / ceiling / seconds})
            print(f"{name} batch {batch}: {seconds * 1e3:.2f} ms, "
                  f"{rows[-1]['share_of_bound']:.0%} of the bound", flush=True)
        results["variants"][name] = rows
    results["device"] = jax.devices()[0].device_kind
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
