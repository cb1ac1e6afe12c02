"""Where the GPU time of a batched bounded decode step goes (issue 30's profile).

    python benchmarks/investigations/profile_decode.py --out DIR [--batch 128]
        [--document 4096] [--steps 40]

On the Mistral-7B shape with random bf16 weights and the database bank of
bench_database.py, ``--batch`` rows of one ``--document``-token state each decode
``--steps`` greedy tokens with ``generate`` under the JAX profiler, twice: with the
bank as configured and with the exact and summary banks removed (window only). Per
variant, per step: wall time, GPU busy time, kernel launches, the time by kind of
kernel (cuBLAS/cuDNN matmuls, which read the weights; Triton and XLA's own fusions,
which hold the attention, the bank writes and the norms) and the costliest kernels.
The difference between the two variants is what the banks cost. Writes
``DIR/profile_decode.json``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_database
sys.path.insert(0, str(Path(__file__).resolve().parent))       # profile_prefill
from bench_database import random_model, text_of  # noqa: E402
from profile_prefill import busy_us, trace_events  # noqa: E402

from coda_db.documents import read_document  # noqa: E402
from coda_db.query import Answerer  # noqa: E402
from coda_jax import concat_rows, generate, tree_bytes  # noqa: E402
from train.steps import with_bank  # noqa: E402

MATMUL_MARKS = ("gemm", "gemv", "xmma", "cublas", "cutlass", "nvjet", "cudnn", "sm90")


def kernel_kind(name: str) -> str:
    """A kernel's kind by its name: a library matmul, a Triton fusion, or XLA's own."""
    low = name.lower()
    if any(mark in low for mark in MATMUL_MARKS):
        return "matmul (cuBLAS/cuDNN/CUTLASS)"
    if "triton" in low:
        return "triton fusion"
    return "xla fusion or copy"


def profile_variant(model, state, logits, *, steps: int, trace_dir: str) -> dict:
    """One traced ``generate`` of ``steps`` tokens (after a compile and a warm run)."""
    def run():
        jax.block_until_ready(generate(model, state, logits, max_new_tokens=steps))
    run()
    run()
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    kernels, _ = trace_events(trace_dir)
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        by_kind[kernel_kind(e["name"])] += e["dur"]
        by_name[e["name"][:100]] += e["dur"]
        count[e["name"][:100]] += 1
    per_step = lambda us: us / 1e3 / steps  # noqa: E731  (microseconds -> ms per step)
    return {"wall_ms_per_step": wall * 1e3 / steps,
            "gpu_busy_ms_per_step": per_step(busy_us(kernels)),
            "kernels_per_step": len(kernels) / steps,
            "ms_per_step_by_kind": {k: per_step(t) for k, t in by_kind.most_common()},
            "top_kernels": [{"name": n, "ms_per_step": per_step(t),
                             "launches_per_step": count[n] / steps}
                            for n, t in by_name.most_common(25)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--document", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model (CPU check)")
    args = parser.parse_args()
    opened = random_model(tiny=args.tiny)
    document = read_document(opened, text_of(args.document, args.document))
    prompt = Answerer(opened).prompt_ids(text_of(12, 1))
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "batch": args.batch, "document_tokens": args.document, "steps": args.steps,
              "state_bytes_per_row": tree_bytes(document.state), "variants": {}}
    variants = {"bank as configured": opened.model,
                "window only": with_bank(opened.model, num_landmarks_exact=0,
                                         num_landmarks_summary=0)}
    for name, model in variants.items():
        # Each variant reads the document into its own state.
        variant = dataclasses.replace(opened, model=model)
        row = document if model is opened.model else read_document(
            variant, text_of(args.document, args.document))
        logits, state = Answerer(variant).read_prompts(concat_rows(*[row.state] * args.batch),
                                                       [prompt] * args.batch)
        entry = profile_variant(model, state, logits, steps=args.steps,
                                trace_dir=f"{args.out}/trace_{len(report['variants'])}")
        entry["state_bytes_per_row"] = int(tree_bytes(state) // args.batch)
        report["variants"][name] = entry
        print(name, json.dumps(entry, indent=1), flush=True)
        del logits, state
    full, window = (report["variants"][k]["gpu_busy_ms_per_step"] for k in variants)
    report["banks_ms_per_step"] = float(np.round(full - window, 3))
    Path(args.out, "profile_decode.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
