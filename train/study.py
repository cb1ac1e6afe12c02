"""The paper's 2x2 ablation at small scale, every stage chained in one process.

    python -m train.study --corpus CORPUS_DIR --out OUT_DIR [--config train/configs/study.yaml]
                          [--deadline-s 560] [--tiny] [--export-base]

One base decoder is pretrained from scratch with standard attention (the
config's stage). Two arms start from it, **GQA** (the CoDA layer with
``differential=False``) and **CoDA**, each trained phase 1 (unbounded) then
phase 2 (bounded, gradients through evictions), the attention parameters only.
Every arm is then evaluated on the same held-out text with the same bank
config: unbounded (its full-KV twin) and bounded, at several context lengths;
its phase-1 weights bounded ("no phase 2", new write gates at their initial
values); its phase-2 weights with the banks removed ("window only"); and
passkey retrieval. The penalties are bounded minus unbounded PPL at the
training length, the interaction CoDA's penalty minus GQA's.

OUT_DIR gets ``study.json`` (device, versions, every stage's config, summary
and logged metrics, every evaluation, the corpus manifest), ``losses.png``,
``ppl.png`` and, with ``--export-base``, the base model as a bf16 export
(``base/``): few enough files to come back from a GPU machine. Stages run in
``OUT_DIR/runs`` (Orbax checkpoints, resumable). ``--deadline-s`` skips the
evaluations still to come once that many seconds have passed (recorded as
skipped); ``--tiny`` shrinks everything for a CPU test.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

BANKS = dict(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
ARMS = {"gqa": False, "coda": True}  # arm -> differential attention
PHASE1 = dict(steps=500, lr=3e-4, lr_gates=3e-3, warmup_steps=30, trainable="attention")
PHASE2 = dict(steps=300, lr=3e-4, lr_gates=3e-3, lr_scale=0.1, warmup_steps=15,
              batch_size=4, trainable="attention")
CONTEXTS = (512, 2048, 4096)  # the training length with every variant, the others without
PASSKEY = dict(lengths=(2048,), depths=(0.1, 0.5, 0.9), count=8)
TINY = dict(
    model=dict(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2,
               num_heads=2, num_kv_heads=1, head_dim=16),
    seq_len=128, block_size=32, banks=dict(window=32, num_landmarks_exact=8,
                                           num_landmarks_summary=8),
    steps=dict(pretrain=10, phase1=3, phase2=3), contexts=(128,),
    passkey=dict(lengths=(128,), depths=(0.5,), count=2))


def stage_configs(base: dict[str, Any], out: Path, *, tiny: bool) -> dict[str, dict[str, Any]]:
    """Every stage's config (plain data) by run name, in the order they run."""
    banks = TINY["banks"] if tiny else BANKS
    stages = {"base": base}
    for arm, differential in ARMS.items():
        phase1 = base | dict(stage="phase1", init=str(out / "runs" / "base" / "model"),
                             attention=dict(kind="coda", options=dict(differential=differential)),
                             optim=base["optim"] | PHASE1)
        phase2 = base | dict(stage="phase2", init=str(out / "runs" / f"{arm}-phase1" / "model"),
                             attention=dict(kind="coda_bounded",
                                            options=banks | dict(differential=differential)),
                             optim=base["optim"] | PHASE2)
        stages[f"{arm}-phase1"], stages[f"{arm}-phase2"] = phase1, phase2
    if tiny:
        for name, cfg in stages.items():
            cfg["optim"] = cfg["optim"] | dict(steps=TINY["steps"][cfg["stage"]], batch_size=2,
                                               warmup_steps=2)
            cfg["data"] = cfg["data"] | dict(seq_len=TINY["seq_len"])
            cfg["phase2"] = cfg["phase2"] | dict(block_size=TINY["block_size"])
            cfg["checkpoint"] = dict(every=1000, keep=1)
            cfg["log_every"] = 1
    return stages


class Deadline:
    """Seconds since the study started, and whether evaluations may still run."""

    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def passed(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


def evaluate_arm(arm: str, phase1, phase2, heldout, tok, *, contexts: Sequence[int],
                 block_size: int, passkey: dict, banks: dict, deadline: Deadline,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """The arm's rows: PPL unbounded/bounded per context, no phase 2, window only,
    passkey (each skipped once the deadline has passed)."""
    import dataclasses

    from coda_jax import BankConfig

    from .evaluation.passkey import passkey_table
    from .evaluation.perplexity import score_perplexity
    from .steps import rebuilt, with_bank

    no_phase2 = rebuilt(phase1, dataclasses.replace(
        phase1.spec, kind="coda_bounded", bank=BankConfig(**banks)))
    window_only = with_bank(phase2, num_landmarks_exact=0, num_landmarks_summary=0)
    runs = [("phase2", phase2, False), ("phase2", phase2, True),
            ("no_phase2", no_phase2, True), ("window_only", window_only, True)]
    out: dict[str, Any] = {"ppl": [], "passkey": [], "skipped": []}
    # The training length first: the headline numbers must not be the ones skipped.
    for context in sorted(contexts, key=lambda c: (c != heldout.limit, c)):
        for name, model, bounded in runs if context == heldout.limit else runs[:2]:
            what = f"{arm} {name} {'bounded' if bounded else 'unbounded'} @{context}"
            if deadline.passed():
                out["skipped"].append(what)
                continue
            row = score_perplexity(model, heldout.tokens, context=context, bounded=bounded,
                                   block_size=block_size, max_sequences=heldout.sequences)
            out["ppl"].append({"weights": name, **row})
            log(f"{what}: ppl {row['ppl']:.3f} ({deadline.elapsed():.0f} s)")
    for length in passkey["lengths"]:
        for bounded in (False, True):
            what = f"{arm} passkey {'bounded' if bounded else 'unbounded'} @{length}"
            if deadline.passed():
                out["skipped"].append(what)
                continue
            rows = passkey_table(phase2, tok, heldout.tokens, lengths=[length],
                                 depths=passkey["depths"], count=passkey["count"],
                                 block_size=block_size, modes=[bounded])
            out["passkey"] += rows
            log(f"{what}: " + ", ".join(f"depth {r['depth']}: {r['retrieved']:.2f}"
                                        for r in rows))
    return out


class Heldout:
    """The held-out tokens, how many sequences each evaluation scores, and the
    training length (the headline context)."""

    def __init__(self, tokens, sequences: int, limit: int):
        self.tokens, self.sequences, self.limit = tokens, sequences, limit


def headline(evals: dict[str, Any], context: int) -> dict[str, Any]:
    """The four PPLs at ``context``, the penalties, the interaction, the baselines."""
    def ppl(arm, weights, bounded):
        rows = [r for r in evals[arm]["ppl"] if r["weights"] == weights
                and r["bounded"] == bounded and r["context"] == context]
        return rows[0]["ppl"] if rows else math.nan

    table = {"context": context}
    for arm in ARMS:
        table[arm] = {"unbounded": ppl(arm, "phase2", False), "bounded": ppl(arm, "phase2", True),
                      "no_phase2_bounded": ppl(arm, "no_phase2", True),
                      "window_only": ppl(arm, "window_only", True)}
        table[arm]["penalty"] = table[arm]["bounded"] - table[arm]["unbounded"]
    table["interaction"] = table["coda"]["penalty"] - table["gqa"]["penalty"]
    table["paper"] = {"gqa": {"unbounded": 5.75, "bounded": 6.84, "penalty": 1.09},
                      "coda": {"unbounded": 5.75, "bounded": 5.94, "penalty": 0.19},
                      "interaction": -0.90, "no_phase2_bounded": 2464}
    return table


def write_report(report: dict[str, Any], out: Path) -> None:
    """``OUT_DIR/study.json``, atomically (rewritten after every stage: a run cut
    short still leaves what it did)."""
    tmp = out / ".study.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "study.json")


def plot_study(report: dict[str, Any], out: Path) -> None:
    """``losses.png`` and ``ppl.png`` from a study report."""
    from .plots import plot_losses, plot_perplexity

    plot_losses({n: s["metrics"] for n, s in report["stages"].items()}, out / "losses.png",
                title="2x2 study: training loss per stage")
    evals = report.get("evaluations", {})
    plot_perplexity({f"{arm} {w}": [r for r in evals[arm]["ppl"] if r["weights"] == w]
                     for arm in evals for w in ("phase2", "no_phase2", "window_only")},
                    out / "ppl.png", title="2x2 study: held-out PPL against context")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True,
                        help="a corpus built by python -m train.corpus (required)")
    parser.add_argument("--out", required=True, help="the study's directory (required)")
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "study.yaml"),
                        help="the base stage's config (default: train/configs/study.yaml)")
    parser.add_argument("--deadline-s", type=float,
                        help="skip evaluations after this many seconds (default: none)")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized study (tests)")
    parser.add_argument("--export-base", action="store_true",
                        help="write the base model as a bf16 export to OUT_DIR/base")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import yaml

    from coda_jax import load_model

    from . import data
    from .config import TrainConfig
    from .loop import run
    from .plots import read_metrics

    corpus, out = Path(args.corpus).absolute(), Path(args.out).absolute()
    for needed in ("train", "heldout", "tokenizer.json"):
        if not (corpus / needed).exists():
            print(f"error: {corpus / needed} does not exist (build the corpus with "
                  "python -m train.corpus)", file=sys.stderr)
            return 2
    base = yaml.safe_load(Path(args.config).read_text())
    base["data"] = base["data"] | dict(train=str(corpus / "train"),
                                       heldout=str(corpus / "heldout"),
                                       tokenizer=str(corpus / "tokenizer.json"))
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    if args.tiny:
        base["model"] = base["model"] | TINY["model"] | dict(vocab_size=tok.get_vocab_size())
    stages = stage_configs(base, out, tiny=args.tiny)
    for cfg in stages.values():
        TrainConfig.from_dict(cfg)  # every config is valid before anything trains
    deadline = Deadline(args.deadline_s)
    log = lambda msg: print(f"[study] {msg}", flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "python": platform.python_version(), "corpus": str(corpus),
        "corpus_manifest": json.loads((corpus / "manifest.json").read_text())
        if (corpus / "manifest.json").is_file() else None,
        "banks": TINY["banks"] if args.tiny else BANKS, "stages": {}}
    for name, cfg in stages.items():
        started = time.perf_counter()
        summary = run(TrainConfig.from_dict(cfg), out / "runs" / name,
                      progress=not args.no_progress)
        report["stages"][name] = {"config": cfg, "summary": summary,
                                  "seconds": time.perf_counter() - started,
                                  "metrics": read_metrics(out / "runs" / name)}
        log(f"{name}: loss {summary['loss']:.4f} after {summary['step']} updates "
            f"({deadline.elapsed():.0f} s)")
        write_report(report, out)
    if args.export_base:
        from convert.model_export import export_model

        export_model(load_model(out / "runs" / "base" / "model"), out / "base", overwrite=True)

    heldout_tokens = data.read_tokens(corpus / "heldout")
    seq_len = stages["base"]["data"]["seq_len"]
    heldout = Heldout(heldout_tokens, 4 if args.tiny else 16, seq_len)
    contexts = TINY["contexts"] if args.tiny else CONTEXTS
    evals = {}
    for arm in ARMS:
        phase1 = load_model(out / "runs" / f"{arm}-phase1" / "model")
        phase2 = load_model(out / "runs" / f"{arm}-phase2" / "model")
        evals[arm] = evaluate_arm(arm, phase1, phase2, heldout, tok, contexts=contexts,
                                  block_size=stages[f"{arm}-phase2"]["phase2"]["block_size"],
                                  passkey=TINY["passkey"] if args.tiny else PASSKEY,
                                  banks=report["banks"], deadline=deadline, log=log)
        report["evaluations"] = evals
        write_report(report, out)
    report["headline"] = headline(evals, seq_len)
    report["seconds"] = deadline.elapsed()
    write_report(report, out)
    try:
        plot_study(report, out)
    except ImportError as err:  # a GPU machine without matplotlib: plot at home
        log(f"no plots ({err}): train.study.plot_study draws them from study.json later")
    log(json.dumps(report["headline"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
