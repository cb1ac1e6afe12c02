"""What one decode step of ``generate`` runs on the device, kernel by kernel (issue 30).

``bench_decode.py`` times a batch-1 step of the Mistral-7B shape at about 61% of
the weight-read bound. This traces ``generate`` of ``--new-tokens`` tokens at each
batch (after one document, the layers split as ``generate`` decides) with
``jax.profiler`` and sums the device's events per step: the kernels run (count
and time by name), their busy time against the step's wall time (the rest is
launch gaps and idle time), so that the gap to the bound is split into the
kernels that are slow and the time between them.

    python benchmarks/investigations/decode_kernels.py --out kernels.json [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_database import random_model, text_of, timed  # noqa: E402
from coda_db.documents import read_document  # noqa: E402
from coda_db.query import Answerer  # noqa: E402
from coda_jax import concat_rows, generate  # noqa: E402
from train.evaluation.retention_workers import write_json  # noqa: E402

TOP_KERNELS = 30


def device_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start ns, duration ns) of every event on the device planes' stream
    lines of the trace written to ``trace_dir``."""
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        raise RuntimeError(f"no trace was written to {trace_dir}")
    events = []
    for plane in jax.profiler.ProfileData.from_file(str(files[-1])).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return events


def kernel_summary(events: list[tuple[str, float, float]], steps: int) -> dict:
    """Per-step totals of ``events`` and the kernels that take the most time."""
    if not events:
        return {"events": 0}
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, _, duration in events:
        by_name[name][0] += 1
        by_name[name][1] += duration
    starts = np.array([e[1] for e in events])
    ends = starts + np.array([e[2] for e in events])
    busy = sum(d for _, _, d in events)
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    return {
        "events_per_step": len(events) / steps,
        "busy_us_per_step": busy / steps / 1e3,
        "span_us_per_step": (ends.max() - starts.min()) / steps / 1e3,
        "top_kernels": [{"name": name[:160], "per_step": count / steps,
                         "us_per_step": total / steps / 1e3,
                         "us_each": total / count / 1e3}
                        for name, (count, total) in top]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model (CPU check)")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--doc-length", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    length = args.doc_length or (256 if args.tiny else 4096)
    opened = random_model(args.tiny)
    answerer = Answerer(opened)
    document = read_document(opened, text_of(length, length))
    prompt = answerer.prompt_ids(text_of(12, 1))
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        logits, state = answerer.read_prompts(concat_rows(*[document.state] * batch),
                                              [prompt] * batch)

        def run(n, logits=logits, state=state):
            return lambda: jax.block_until_ready(generate(
                opened.model, state, logits, max_new_tokens=n, return_state=False))

        one, many = timed(run(1), args.repeats), timed(run(args.new_tokens), args.repeats)
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                run(args.new_tokens)()
            events = device_events(trace_dir)
        entry = {"batch": batch, "generate_1_token_s": one,
                 f"generate_{args.new_tokens}_tokens_s": many,
                 "step_s": (many - one) / (args.new_tokens - 1),
                 **kernel_summary(events, args.new_tokens)}
        results.append(entry)
        print(f"batch {batch}: step {entry['step_s'] * 1e3:.2f} ms, "
              f"{entry.get('events_per_step', 0):.0f} events/step, busy "
              f"{entry.get('busy_us_per_step', 0):.0f} us/step", flush=True)
        del logits, state
    device = jax.devices()[0]
    write_json(Path(args.out), {
        "what": " ".join(__doc__.split("\n\n")[1].split()),
        "device": device.device_kind, "jax": jax.__version__, "document_tokens": length,
        "new_tokens": args.new_tokens, "batches": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
