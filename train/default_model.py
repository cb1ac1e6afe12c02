"""The bundled default model's recipe, every step in one command (one GPU, minutes).

    python -m train.default_model --corpus CORPUS --out OUT_DIR [--base MODEL_OR_EXPORT]
                                  [--tiny] [--no-progress]

1. the base: ``--base`` (a model checkpoint or a ``convert pack`` export, e.g.
   the 2x2 study's), else pretrained here from ``configs/study.yaml``;
2. the retention data (``train.retention``): 2,048-token sequences for phase
   1, 4,096-token ones for phase 2, from the corpus's training split and the
   training names and places;
3. phase 1 (``configs/default_phase1.yaml``) and phase 2
   (``configs/default_phase2.yaml``), every weight trained;
4. a quick retention check on held-out documents (teacher-forced exact match,
   bounded, unbounded and window only), ``OUT_DIR/retention_quick.json``;
5. ``OUT_DIR/export``: the model as bf16 safetensors shards (what a GPU
   machine sends home), with ``card.json`` (architecture, bank, data, steps,
   recommended prompt and sampling, the quick check) and ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import yaml

CONFIGS = Path(__file__).parent / "configs"
QUICK = dict(lengths=(1024, 4096), facts=(1, 4, 16), depths=(0.1, 0.5, 0.9), count=2)
TINY_QUICK = dict(lengths=(256,), facts=(1, 2), depths=(0.5,), count=1)


def stop_token_ids(tok) -> list[int]:
    """Every token whose text holds a newline: an answer ends at its line's end."""
    return sorted(i for i in range(tok.get_vocab_size()) if "\n" in tok.decode([i]))


def database_settings(tok) -> dict[str, Any]:
    """The recommended query settings the model carries (``coda_jax.database``)."""
    from .retention import PROMPT

    return {"prompt": PROMPT, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "max_new_tokens": 24, "stop_tokens": stop_token_ids(tok), "block_size": 128}


def _config(name: str, **fields: Any) -> dict[str, Any]:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    for key, value in fields.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section] = dict(cfg.get(section) or {}) | {field: value}
        else:
            cfg[key] = value
    return cfg


def _tiny(cfg: dict[str, Any], seq_len: int) -> dict[str, Any]:
    cfg["optim"] = cfg["optim"] | dict(steps=4, batch_size=2, warmup_steps=1)
    cfg["data"] = cfg["data"] | dict(seq_len=seq_len)
    cfg["log_every"] = 1
    if cfg.get("phase2"):
        cfg["phase2"] = cfg["phase2"] | dict(block_size=32)
    if cfg["attention"].get("options"):
        cfg["attention"]["options"] = dict(window=32, num_landmarks_exact=16,
                                           num_landmarks_summary=8)
    return cfg


def _base_model_dir(args, corpus: Path, out: Path, log) -> Path:
    from coda_jax import save_model
    from convert.model_export import is_model_export, load_export

    from .loop import run
    from .config import TrainConfig

    if args.base:
        base = Path(args.base)
        if is_model_export(base):
            return save_model(out / "base_model", load_export(base), overwrite=True)
        return base
    cfg = yaml.safe_load((CONFIGS / "study.yaml").read_text())
    cfg["data"] = cfg["data"] | dict(train=str(corpus / "train"), heldout="",
                                     tokenizer=str(corpus / "tokenizer.json"))
    if args.tiny:
        cfg = _tiny(cfg, 128)
        cfg["model"] = cfg["model"] | dict(hidden_size=32, intermediate_size=64, num_layers=2,
                                           num_heads=2, num_kv_heads=1, head_dim=16)
    run(TrainConfig.from_dict(cfg), out / "runs" / "base", progress=not args.no_progress)
    log("base pretrained")
    return out / "runs" / "base" / "model"


def build(args) -> int:
    from coda_jax import load_model
    from convert.model_export import export_model

    from . import data, retention
    from .config import TrainConfig
    from .loop import run
    from .plots import read_metrics
    from .steps import with_bank

    corpus, out = Path(args.corpus).absolute(), Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = lambda msg: print(f"[default-model] {msg} ({time.perf_counter() - start:.0f} s)",  # noqa: E731
                            flush=True)
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    base = _base_model_dir(args, corpus, out, log)
    filler = data.read_tokens(corpus / "train")
    stages = {"phase1": _config("default_phase1.yaml", init=str(base)),
              "phase2": _config("default_phase2.yaml",
                                init=str(out / "runs" / "phase1" / "model"))}
    report: dict[str, Any] = {"device": str(jax.devices()[0].device_kind),
                              "jax": jax.__version__, "base": str(base), "stages": {}}
    for name, cfg in stages.items():
        if args.tiny:
            cfg = _tiny(cfg, 128 if name == "phase1" else 256)
        seq_len, seqs = cfg["data"]["seq_len"], cfg["optim"]["steps"] * cfg["optim"]["batch_size"]
        shards = out / "data" / name
        if not shards.exists():
            rows = retention.training_sequences(tok, filler, seq_len=seq_len, count=seqs,
                                                max_facts=2 if args.tiny else 8, seed=cfg["seed"])
            data.write_shards(np.concatenate(list(rows)), shards, meta={
                "split": f"retention-{name}", "seq_len": seq_len, "sequences": seqs,
                "tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})
            log(f"{name}: {seqs} retention sequences of {seq_len + 1} tokens")
        cfg["data"] = cfg["data"] | dict(train=str(shards), tokenizer=str(corpus / "tokenizer.json"))
        summary = run(TrainConfig.from_dict(cfg), out / "runs" / name,
                      progress=not args.no_progress)
        report["stages"][name] = {"config": cfg, "summary": summary,
                                  "metrics": read_metrics(out / "runs" / name)}
        log(f"{name}: loss {summary['loss']:.4f} after {summary['step']} updates")

    model = load_model(out / "runs" / "phase2" / "model")
    quick = TINY_QUICK if args.tiny else QUICK
    docs = list(retention.eval_documents(tok, data.read_tokens(corpus / "heldout"),
                                         lengths=quick["lengths"], facts_per_doc=quick["facts"],
                                         depths=quick["depths"], count=quick["count"], seed=7))
    block = stages["phase2"]["phase2"]["block_size"] if not args.tiny else 32
    window_only = with_bank(model, num_landmarks_exact=0, num_landmarks_summary=0)
    checks = []
    caches = {"bounded": (model, True), "unbounded": (model, False),
              "window_only": (window_only, True)}
    for label in args.checks.split(","):
        runner, bounded = caches[label]
        rows = retention.retention_accuracy(runner, tok, docs, bounded=bounded,
                                            block_size=block)
        checks += [dict(r, cache=label) for r in rows]
        total = sum(r["total"] for r in rows)
        log(f"retention {label}: {sum(r['correct'] for r in rows)}/{total}")
    report["retention_quick"] = checks
    (out / "retention_quick.json").write_text(json.dumps(report, indent=1))

    export = export_model(model, out / "export", overwrite=True)
    shutil.copy(corpus / "tokenizer.json", export / "tokenizer.json")
    card = {"name": "coda-jax default model", "architecture": json.loads(
        (export / "export.json").read_text())["config"],
        "attention": stages["phase2"]["attention"],
        "database": database_settings(tok),
        "training": {"base": str(base), "stages": {n: s["config"] for n, s in
                                                    report["stages"].items()},
                     "task": {"facts": {k: {"sentence": v[0], "question": v[1]}
                                        for k, v in retention.FACTS.items()},
                              "prompt": retention.PROMPT}},
        "retention_quick": checks}
    (export / "card.json").write_text(json.dumps(card, indent=1))
    log(f"wrote {export}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="a corpus of python -m train.corpus")
    parser.add_argument("--out", required=True, help="the run's directory")
    parser.add_argument("--base", help="the base model (checkpoint or pack export)")
    parser.add_argument("--checks", default="bounded,unbounded,window_only",
                        help="caches of the quick retention check (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized (tests)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for needed in ("train", "heldout", "tokenizer.json"):
        if not (Path(args.corpus) / needed).exists():
            print(f"error: {Path(args.corpus) / needed} does not exist (build the corpus with "
                  "python -m train.corpus)", file=sys.stderr)
            return 2
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
