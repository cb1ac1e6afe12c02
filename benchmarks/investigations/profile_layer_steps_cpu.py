"""Where a CPU decode step of the default model goes, thunk by thunk (issue 30).

The bundled default model reads a 1,024-token document (random ids), then steps
``coda_jax.LayerSteps`` (a layer per compiled call, as ``coda-db query`` streams on a
CPU) under the JAX profiler for ``--steps`` tokens. XLA's CPU runtime records each
executed thunk (a fusion, a dot, a copy); their times are summed by name and shown per
token, with the HLO of each named thunk of the layer's program (its shape and what it
computes), so a copy can be told from a matmul.

    python benchmarks/investigations/profile_layer_steps_cpu.py \
        --out benchmarks/results/smollm2/profile_layer_steps_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coda_db.model_source import open_model
from coda_jax import LayerSteps
from train.evaluation.retention_workers import write_json

# Profiler bookkeeping, not work: the executor's spans enclose the thunks.
NOT_WORK = ("ThunkExecutor", "PjRt", "CommonPjRt", "Pjit", "$", "ParseArguments", "Handle inputs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=1024, help="document length")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    opened = open_model(None)
    model = opened.model
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size,
                                                        (1, args.tokens)))
    state = model.init_state(1, jnp.bfloat16, key=jax.random.key(0))
    logits, state = model.prefill(ids, state, block_size=opened.settings.block_size,
                                  last_only=True)
    steps = LayerSteps(model)
    states = steps.start(state)
    token = jnp.argmax(logits[:, 0], -1)
    for _ in range(3):  # compile and warm
        out, states = steps(token, states)
        jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                out, states = steps(token, states)
                jax.block_until_ready(out)
        trace = next(Path(trace_dir).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(NOT_WORK):
            total[event["name"]] += event.get("dur", 0)
            count[event["name"]] += 1
    hlo = steps.lower_layer(states).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]

    def what(name: str) -> str:
        match = re.search(rf"%{re.escape(name)} = ([^\n]*)", entry)
        return match.group(1)[:240] if match else ""

    thunks = [{"name": name, "ms_per_token": us / args.steps / 1e3,
               "calls_per_token": count[name] / args.steps, "hlo": what(name)}
              for name, us in total.most_common(30)]
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "model": opened.name, "weights_sha256": opened.model_sha256,
        "document_tokens": args.tokens, "steps": args.steps, "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "thunks_ms_per_token_sum": sum(total.values()) / args.steps / 1e3,
        "thunks": thunks}
    write_json(args.out, result)
    for t in thunks[:20]:
        print(f"{t['ms_per_token']:7.2f} ms  x{t['calls_per_token']:4.0f}  {t['name']:28s} "
              f"{t['hlo'][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
