"""Where a bundle of trained adapters loses its answers, on the CPU.

    python benchmarks/diagnose_adapters_cpu.py BUNDLE QUESTIONS.json --out RESULTS.json

Through the product path (``NeuralDatabase``: ingest, ``query_many``, greedy, the
card's framing and scoring) the bundle's weights answer the questions of
QUESTIONS.json (``train/data_files/freeform_heldout.json``: held-out free-form
documents) under the bundle's own bank and under variants of it (a lower write
threshold, more exact slots, larger windows: the last holds the whole document,
the weights' answers with nothing evicted). Then the write gates: per document
the mean gate, and the share above the bank's threshold, of the answer tokens
against the rest, and how many of the answer tokens rank among the highest gates of
the tokens that leave the window (what ``exact_eviction="gate"`` keeps). Every reply is recorded.

``--fit-gates CORPUS`` first fits the write gates to the chat retention task's
content marks (``train/gate_fit.py`` on 24 training sequences of 4,096 tokens of
``python -m train.corpus``'s CORPUS, what ``phase2.fit_write_gates`` does before
phase 2) and records the fit; ``--variants`` picks which banks to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coda_db.core import NeuralDatabase
from coda_db.model_source import open_model
from coda_db.scoring import SCORING_RULE, accepted_answers, is_right
from train import data
from train.evaluation.retention_workers import write_json
from train.gate_fit import fit_write_gates
from train.retention_chat import training_sequences
from train.steps import with_bank
from train.study_eval import state_bytes

VARIANTS = {"bundle": {}, "threshold 0.1": {"write_gate_threshold_exact": 0.1},
            "threshold 0.8": {"write_gate_threshold_exact": 0.8},
            "threshold 0.9": {"write_gate_threshold_exact": 0.9},
            "window 64 exact 320": {"window": 64, "num_landmarks_exact": 320},
            "exact 4096": {"num_landmarks_exact": 4096},
            "exact 4096 threshold 0": {"num_landmarks_exact": 4096,
                                       "write_gate_threshold_exact": 0.0},
            "novelty off": {"exact_novelty_threshold": 1.01},
            "threshold 0.9 novelty off": {"write_gate_threshold_exact": 0.9,
                                          "exact_novelty_threshold": 1.01},
            # Every candidate written: no slot's value is close enough to refuse one.
            "exact 4096 threshold 0 novelty off": {"num_landmarks_exact": 4096,
                                                   "write_gate_threshold_exact": 0.0,
                                                   "exact_novelty_threshold": 1.01},
            "exact 512": {"num_landmarks_exact": 512}, "exact 1024": {"num_landmarks_exact": 1024},
            "lru eviction": {"exact_eviction": "lru"}, "window 1024": {"window": 1024},
            "window 2048": {"window": 2048},
            # The sixth run's bank (train/configs/smollm2_phase2.yaml).
            "window 1024 exact 512 summary 64": {"window": 1024, "num_landmarks_exact": 512,
                                                 "num_landmarks_summary": 64},
            # A gate raised to the next tokens': the words before a salient token written too.
            "lookahead 8": {"write_gate_lookahead": 8},
            "exact 4096 lookahead 8": {"num_landmarks_exact": 4096, "write_gate_lookahead": 8},
            # The exact slots keep the highest gates of the document, not its last writes.
            "gate eviction": {"exact_eviction": "gate"},
            "gate eviction lookahead 8": {"exact_eviction": "gate", "write_gate_lookahead": 8},
            "gate eviction lookahead 8 window 64 exact 320": {
                "exact_eviction": "gate", "write_gate_lookahead": 8, "window": 64,
                "num_landmarks_exact": 320},
            # A document's first tokens kept for good (attention sinks).
            "sinks 4": {"sink_tokens": 4},
            "window 1024 exact 512 summary 64 sinks 4": {
                "window": 1024, "num_landmarks_exact": 512, "num_landmarks_summary": 64,
                "sink_tokens": 4},
            # Every token that leaves the window a candidate: the exact slots keep the
            # highest gates of all of them, none left empty for want of a gate above 0.5.
            "window 1024 exact 512 summary 64 sinks 4 threshold 0 novelty off": {
                "window": 1024, "num_landmarks_exact": 512, "num_landmarks_summary": 64,
                "sink_tokens": 4, "write_gate_threshold_exact": 0.0,
                "exact_novelty_threshold": 1.01},
            # No summary slots: the exact bank and the window alone.
            "window 1024 exact 512 summary 0 sinks 4": {
                "window": 1024, "num_landmarks_exact": 512, "num_landmarks_summary": 0,
                "sink_tokens": 4},
            "summary 0 sinks 4": {"num_landmarks_summary": 0, "sink_tokens": 4},
            "window 4096": {"window": 4096}}


def answer(opened, documents, changes):
    model = with_bank(opened.model, **changes) if changes else opened.model
    db = NeuralDatabase(dataclasses.replace(opened, model=model), library=tempfile.mkdtemp())
    records, start = [], time.perf_counter()
    for doc in documents:
        state = db.ingest(doc["text"])
        replies = db.query_many([q["question"] for q in doc["questions"]], state)
        for q, reply in zip(doc["questions"], replies):
            accepted = accepted_answers(q)
            records.append({"document": doc["name"], "question": q["question"],
                            "expected": accepted[0], "reply": reply.text,
                            "right": is_right(reply.text, accepted)})
    return {"bank": dataclasses.asdict(model.spec.bank), "state_bytes": state_bytes(model, lengths=())["any"],
            "right": sum(r["right"] for r in records), "asked": len(records),
            "seconds": round(time.perf_counter() - start, 1), "answers": records}


def gate_statistics(opened, documents):
    model, tok, settings = opened.model, opened.tokenizer, opened.settings
    threshold = model.spec.bank.write_gate_threshold_exact
    rows = []
    for doc in documents:
        ids = tok.encode(settings.document_prefix + doc["text"], add_special_tokens=False).ids
        width = -(-len(ids) // settings.block_size) * settings.block_size
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        state = model.init_state(1, jnp.bfloat16, mem_init="zeros")
        _, _, logits = model.prefill_segment(
            jnp.asarray(tokens), jnp.asarray([len(ids)]), state, block_size=settings.block_size,
            training=False, unroll=1, last_only=True, write_logits=True)
        gate = np.asarray(jax.nn.sigmoid(logits))[:, 0, :len(ids)]
        answer_mask = np.zeros(len(ids), bool)
        for q in doc["questions"]:
            sub = tok.encode(" " + accepted_answers(q)[0], add_special_tokens=False).ids
            for i in range(len(ids) - len(sub) + 1):
                if ids[i:i + len(sub)] == sub:
                    answer_mask[i:i + len(sub)] = True
        rows.append({"document": doc["name"], "tokens": len(ids),
                     "answer_tokens": int(answer_mask.sum()),
                     "top_gate_recall": top_gate_recall(gate, answer_mask, model.spec.bank.window),
                     "mean_gate_answer": float(gate[:, answer_mask].mean()),
                     "mean_gate_other": float(gate[:, ~answer_mask].mean()),
                     "above_threshold_answer": float((gate[:, answer_mask] > threshold).mean()),
                     "above_threshold_other": float((gate[:, ~answer_mask] > threshold).mean())})
    return {"threshold": threshold, "documents": rows}


def top_gate_recall(gate: np.ndarray, answer_mask: np.ndarray, window: int,
                    sizes: tuple[int, ...] = (128, 416)) -> dict:
    """Of the answer tokens that leave the window, the share among the ``K`` highest
    write gates of all that leave it (what a bank keeping the highest gates holds),
    mean, min and max over layers, beside the share ``K`` tokens would catch by chance."""
    evicted = max(gate.shape[1] - window, 0)
    answers = answer_mask[:evicted]
    out = {}
    for k in sizes:
        recall = [answers[np.argsort(-layer[:evicted], kind="stable")[:k]].sum()
                  / max(answers.sum(), 1) for layer in gate]
        out[str(k)] = {"mean": float(np.mean(recall)), "min": float(np.min(recall)),
                       "max": float(np.max(recall)), "chance": min(k / max(evicted, 1), 1.0)}
    return out


def fit_gates(opened, corpus: Path, *, sequences: int = 24, seq_len: int = 4096):
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    rows = list(training_sequences(tok, data.read_tokens(corpus / "train"), seq_len=seq_len,
                                   count=sequences, max_facts=8, seed=1234))
    tokens, marks = (np.concatenate([row[i] for row in rows]) for i in (0, 1))
    return fit_write_gates(opened.model, tokens, marks, seq_len=seq_len, count=sequences,
                           block_size=opened.settings.block_size, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("questions")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fit-gates", metavar="CORPUS", help="fit the write gates first")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (none: the gates only)")
    args = parser.parse_args(argv)
    opened = open_model(args.bundle)
    documents = json.loads(Path(args.questions).read_text())["documents"]
    results = {"bundle": opened.name, "weights_sha256": opened.model_sha256,
               "questions": args.questions, "scoring": SCORING_RULE,
               "device": platform.processor() or platform.machine(), "jax": jax.__version__}
    if args.fit_gates:
        results["gate_fit"] = fit_gates(opened, Path(args.fit_gates))
    results |= {"gates": gate_statistics(opened, documents), "variants": {}}
    write_json(Path(args.out), results)
    for name in [] if args.variants == "none" else args.variants.split(","):
        changes = VARIANTS[name]
        results["variants"][name] = answer(opened, documents, changes)
        print(f"{name}: {results['variants'][name]['right']}/"
              f"{results['variants'][name]['asked']}", flush=True)
        write_json(Path(args.out), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
