"""The paper's 2x2 ablation, every stage chained in one resumable command.

    python -m train.study --corpus CORPUS_DIR --out OUT_DIR [--config CONFIG]
                          [--base MODEL_DIR] [--heldout2 PATH] [--time-limit-s 540]
                          [--tiny] [--export-base]

Two arms, **GQA** (the CoDA layer with ``differential=False``) and **CoDA**,
start from one base decoder: a saved model given with ``--base`` (a real
pretrained one, e.g. SmolLM2 from ``python -m convert gguf smollm2 DIR``), or
one pretrained here from scratch with standard attention (the config's own
stage, ``train/configs/study.yaml``). Each arm is trained phase 1
(unbounded) then phase 2 (bounded, gradients through evictions) once per
bank of the config's ``study.banks``, the attention parameters only, on the
same data and steps.

Every cell (``train.study_eval``) is then scored on the same held-out rows of
the corpus and, with ``--heldout2``, of a second source training never saw:
the base, each arm unbounded (phase-1 and phase-2 weights), and per bank each
arm bounded, bounded with its phase-1 weights ("no phase 2") and window only;
perplexity at each context with bootstrap intervals for the penalties and
the interaction; passkey retrieval for the base and each arm bounded; the
state bytes of each cache.

OUT_DIR gets ``study.json`` (device, versions, configs, every stage's summary
and training curve, every cell, the statistics), ``losses.png``, ``ppl.png``
and ``penalties.png``. Stages run in ``OUT_DIR/runs`` (Orbax checkpoints).
``--time-limit-s`` ends the command after that many seconds with everything
done so far kept (a training stage at its next update, with a checkpoint;
an evaluation after its cell); running it again resumes where it stopped.
``--tiny`` shrinks everything for a CPU test. Exit codes: 0 done, 2 a missing
input, 3 refused or invalid, 4 stopped at the time limit (run it again).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from .study_eval import ARMS, PAPER, EvalPlan

TINY = dict(
    model=dict(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2,
               num_heads=2, num_kv_heads=1, head_dim=16),
    seq_len=128, block_size=32,
    banks=dict(medium=dict(window=32, num_landmarks_exact=8, num_landmarks_summary=8)),
    steps=dict(pretrain=10, phase1=3, phase2=3),
    plan=dict(length=256, sequences=4, contexts=(128, 256), batch_size=2, block_size=32,
              passkey_lengths=(128,), passkey_depths=(0.5,), passkey_count=2,
              bootstrap_samples=50, dtype="float32"))
EXIT_STOPPED = 4


def stage_configs(base: dict[str, Any], study: dict[str, Any], out: Path, *,
                  base_model: Path | None, tiny: bool) -> dict[str, dict[str, Any]]:
    """Every stage's config (plain data) by run name, in the order they run:
    ``base`` (pretrained here, unless ``base_model`` is given), then per arm
    ``ARM-phase1`` and ``ARM-phase2-BANK`` for each bank."""
    stages = {} if base_model is not None else {"base": base}
    start = str(base_model) if base_model is not None else str(out / "runs" / "base" / "model")
    # Both arms' phase 1, then both arms' phase 2 bank by bank: a run cut short
    # has both arms of what it finished.
    for arm in ARMS:
        stages[f"{arm}-phase1"] = base | dict(
            stage="phase1", init=start,
            attention=dict(kind="coda", options=dict(differential=arm == "coda")),
            optim=base["optim"] | study["phase1"])
    for bank, options in study["banks"].items():
        for arm in ARMS:
            stages[f"{arm}-phase2-{bank}"] = base | dict(
                stage="phase2", init=str(out / "runs" / f"{arm}-phase1" / "model"),
                attention=dict(kind="coda_bounded",
                               options=dict(options) | dict(differential=arm == "coda")),
                optim=base["optim"] | study["phase2"])
    if tiny:
        for cfg in stages.values():
            cfg["optim"] = cfg["optim"] | dict(steps=TINY["steps"][cfg["stage"]], batch_size=2,
                                               warmup_steps=2)
            cfg["data"] = cfg["data"] | dict(seq_len=TINY["seq_len"])
            cfg["phase2"] = cfg["phase2"] | dict(block_size=TINY["block_size"])
            cfg["checkpoint"] = dict(every=1000, keep=1)
            cfg["log_every"] = 1
    return stages


class Clock:
    """Seconds since the command started, against an optional limit."""

    def __init__(self, limit_s: float | None):
        self.start, self.limit_s = time.perf_counter(), limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float | None:
        return None if self.limit_s is None else self.limit_s - self.elapsed()

    def out(self) -> bool:
        return self.limit_s is not None and self.elapsed() > self.limit_s


def write_report(report: dict[str, Any], out: Path) -> None:
    """``OUT_DIR/study.json``, atomically (rewritten after every stage and cell:
    a run cut short still leaves what it did, and the next one resumes from it)."""
    tmp = out / ".study.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "study.json")


def plot_study(report: dict[str, Any], out: Path) -> None:
    """``losses.png``, ``ppl.png`` and ``penalties.png`` from a study report."""
    from .plots import plot_losses
    from .study_plots import plot_context_ppl, plot_penalties

    plot_losses({n: s["metrics"] for n, s in report["stages"].items()}, out / "losses.png",
                title="2x2 study: training loss per stage")
    plot_context_ppl(report, out / "ppl.png")
    plot_penalties(report, out / "penalties.png")


def read_study_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared stage settings and the ``study`` section (phase1/phase2 optimiser
    changes, banks, evaluation) of a study config file."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"no study config at {path}")
    base = yaml.safe_load(path.read_text()) or {}
    study = base.pop("study", None)
    if not isinstance(study, dict) or not {"phase1", "phase2", "banks"} <= set(study):
        raise ValueError(f"{path} needs a study section with phase1, phase2 and banks")
    unknown = set(study) - {"phase1", "phase2", "banks", "evaluation"}
    if unknown:
        raise ValueError(f"unknown field(s) in {path}'s study section: {sorted(unknown)}")
    return base, study


def train_stages(stages: dict[str, dict[str, Any]], out: Path, report: dict[str, Any], *,
                 clock: Clock, progress: bool, log) -> bool:
    """Run (or resume) every stage not yet finished; False when the time ran out
    (every call makes progress: its first stage runs at least one update)."""
    from .config import TrainConfig
    from .loop import run
    from .plots import read_metrics

    ran = False
    for name, cfg in stages.items():
        if report["stages"].get(name, {}).get("summary", {}).get("model"):
            continue  # finished in an earlier run of the command
        if ran and clock.out():
            return False
        ran = True
        started = time.perf_counter()
        left = clock.left()
        summary = run(TrainConfig.from_dict(cfg), out / "runs" / name, progress=progress,
                      time_limit_s=None if left is None else max(left, 0.0))
        previous = report["stages"].get(name, {}).get("seconds", 0.0)
        report["stages"][name] = {"config": cfg, "summary": summary,
                                  "seconds": previous + time.perf_counter() - started,
                                  "metrics": read_metrics(out / "runs" / name)}
        write_report(report, out)
        log(f"{name}: loss {summary['loss']:.4f} after {summary['step']} updates "
            f"({clock.elapsed():.0f} s)")
        if not summary["model"]:
            return False
    return True


def evaluate(report: dict[str, Any], out: Path, *, base_model: Path | None,
             heldout: dict[str, Any], tok, plan: EvalPlan, banks: dict[str, dict],
             clock: Clock, log) -> bool:
    """Score every cell not yet scored, then the passkey; False when the time ran out."""
    from coda_jax import load_model

    from . import study_eval

    base = load_model(base_model) if base_model is not None else \
        load_model(out / "runs" / "base" / "model")
    arms = {arm: {"phase1": load_model(out / "runs" / f"{arm}-phase1" / "model"),
                  "phase2": {bank: load_model(out / "runs" / f"{arm}-phase2-{bank}" / "model")
                             for bank in banks}} for arm in ARMS}
    cells = study_eval.study_cells(base, arms, banks)
    evals = report.setdefault("evaluations", {})
    rows = {source: study_eval.heldout_rows(tokens, plan) for source, tokens in heldout.items()}
    for name, (build, bounded) in cells.items():  # each model once, on every source
        model = None
        for source in heldout:
            done = evals.setdefault(source, {})
            if name in done:
                continue
            if clock.out():
                return False
            model = build() if model is None else model
            done[name] = study_eval.score_cell(model, rows[source], bounded=bounded, plan=plan,
                                               desc=f"{source} {name}")
            write_report(report, out)
            log(f"{source} {name}: " + ", ".join(f"{c}: {p:.3f}"
                                                 for c, p in done[name]["ppl"].items())
                + f" ({clock.elapsed():.0f} s)")
    passkey = report.setdefault("passkey", {})
    filler = next(iter(heldout.values()))
    for name in ["base"] + [f"{arm}/{bank}/bounded" for arm in ARMS for bank in banks]:
        build, bounded = cells[name]
        for length in plan.passkey_lengths:
            if any(r["length"] == length for r in passkey.get(name, [])):
                continue
            if clock.out():
                return False
            passkey.setdefault(name, []).extend(study_eval.passkey_rows(
                build(), bounded, tok, filler, length=length, plan=plan))
            write_report(report, out)
            log(f"passkey {name} @{length}: " + ", ".join(
                f"{r['depth']}: {r['retrieved']:.2f}" for r in passkey[name]
                if r["length"] == length))
    report["state_bytes"] = {name: study_eval.state_bytes(
        cells[name][0](), lengths=sorted({plan.length, *plan.passkey_lengths}))
        for name in ["base"] + [f"coda/{bank}/bounded" for bank in banks]}
    return True


def summarise(report: dict[str, Any], plan: EvalPlan, banks: Sequence[str]) -> dict[str, Any]:
    """The headline: per held-out set and context, the 2x2 table with intervals."""
    from .study_eval import statistics

    table: dict[str, Any] = {"paper": PAPER}
    for source, evals in report.get("evaluations", {}).items():
        for context in plan.contexts:
            row = {"ppl": {cell: r["ppl"][str(context)] for cell, r in evals.items()},
                   "statistics": statistics(evals, banks, context,
                                            samples=plan.bootstrap_samples)}
            table.setdefault(source, {})[str(context)] = row
    return table


def narrowed(study: dict[str, Any], *, banks: str | None = None,
             passkey_lengths: str | None = None) -> dict[str, Any]:
    """``study`` with only the ``banks`` named (comma-separated, kept in the config's
    order) and its passkey at ``passkey_lengths`` instead: one bank's study fits a
    shorter run. ``ValueError`` names a bank the config lacks or a bad length."""
    study = dict(study)
    if banks is not None:
        names = [n.strip() for n in banks.split(",") if n.strip()]
        unknown = [n for n in names if n not in study["banks"]]
        if not names or unknown:
            raise ValueError(f"--banks {banks!r}: the config's banks are "
                             f"{', '.join(study['banks'])}")
        study["banks"] = {n: b for n, b in study["banks"].items() if n in names}
    if passkey_lengths is not None:
        try:
            lengths = [int(n) for n in passkey_lengths.split(",") if n.strip()]
        except ValueError:
            lengths = []
        if not lengths or min(lengths) < 1:
            raise ValueError(f"--passkey-lengths takes positive integers, got "
                             f"{passkey_lengths!r}")
        study["evaluation"] = dict(study.get("evaluation", {}), passkey_lengths=lengths)
    return study


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True,
                        help="a corpus built by python -m train.corpus (required)")
    parser.add_argument("--out", required=True, help="the study's directory (required)")
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "study.yaml"),
                        help="the study config (default: train/configs/study.yaml)")
    parser.add_argument("--base", help="start both arms from this saved model instead of "
                        "pretraining one (default: pretrain)")
    parser.add_argument("--heldout2", help="a second held-out source (tokens: shard "
                        "directory or .npy, in the corpus's tokenizer; default: none)")
    parser.add_argument("--time-limit-s", type=float,
                        help="stop after this many seconds, resumable (default: none)")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized study (tests)")
    parser.add_argument("--export-base", action="store_true",
                        help="write the pretrained base as a bf16 export to OUT_DIR/base")
    parser.add_argument("--banks", help="comma-separated names: only these of the config's "
                        "study.banks (default: all)")
    parser.add_argument("--passkey-lengths", help="comma-separated tokens: the passkey "
                        "lengths instead of the config's evaluation.passkey_lengths")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from . import data
    from .config import TrainConfig

    corpus, out = Path(args.corpus).absolute(), Path(args.out).absolute()
    for needed in ("train", "heldout", "tokenizer.json"):
        if not (corpus / needed).exists():
            print(f"error: {corpus / needed} does not exist (build the corpus with "
                  "python -m train.corpus)", file=sys.stderr)
            return 2
    base_model = Path(args.base).absolute() if args.base else None
    for path in (base_model, args.heldout2):
        if path is not None and not Path(path).exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    try:
        base, study = read_study_config(Path(args.config))
        base["data"] = base.get("data", {}) | dict(train=str(corpus / "train"),
                                                   heldout=str(corpus / "heldout"),
                                                   tokenizer=str(corpus / "tokenizer.json"))
        tok = data.load_tokenizer(corpus / "tokenizer.json")
        if args.tiny:
            base["model"] = base.get("model", {}) | TINY["model"] | dict(
                vocab_size=tok.get_vocab_size())
            study["banks"] = TINY["banks"]
        study = narrowed(study, banks=args.banks, passkey_lengths=args.passkey_lengths)
        plan = EvalPlan(**(TINY["plan"] if args.tiny else study.get("evaluation", {})))
        stages = stage_configs(base, study, out, base_model=base_model, tiny=args.tiny)
        for cfg in stages.values():
            TrainConfig.from_dict(cfg)  # every config is valid before anything trains
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    clock = Clock(args.time_limit_s)
    log = lambda msg: print(f"[study] {msg}", flush=True)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() \
        else {}
    report: dict[str, Any] = previous | {
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "python": platform.python_version(), "corpus": str(corpus),
        "base_model": str(base_model) if base_model else "pretrained here (stage base)",
        "heldout2": str(Path(args.heldout2).absolute()) if args.heldout2 else None,
        "corpus_manifest": json.loads((corpus / "manifest.json").read_text())
        if (corpus / "manifest.json").is_file() else None,
        "banks": study["banks"], "plan": {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in vars(plan).items()}}
    report.setdefault("stages", {})
    heldout = {"corpus": data.read_tokens(corpus / "heldout")}
    if args.heldout2:
        heldout["second"] = data.read_tokens(args.heldout2)
    # Bank by bank: its stages (the first with both arms' phase 1 and the base),
    # then its cells, so a run cut short has whole 2x2s of the banks it reached.
    banks = list(study["banks"])
    for i, bank in enumerate(banks):
        group = {name: cfg for name, cfg in stages.items()
                 if name.endswith(f"-phase2-{bank}") or (i == 0 and "-phase2-" not in name)}
        finished = train_stages(group, out, report, clock=clock, progress=not args.no_progress,
                                log=log)
        if finished and i == 0 and args.export_base and base_model is None:
            from coda_jax import load_model
            from convert.model_export import export_model

            export_model(load_model(out / "runs" / "base" / "model"), out / "base",
                         overwrite=True)
        if finished:
            reached = {b: study["banks"][b] for b in banks[:i + 1]}
            finished = evaluate(report, out, base_model=base_model, heldout=heldout, tok=tok,
                                plan=plan, banks=reached, clock=clock, log=log)
        report["headline"] = summarise(report, plan, banks[:i + 1])
        write_report(report, out)
        if not finished:
            log(f"stopped at the time limit after {clock.elapsed():.0f} s: run again to resume")
            return EXIT_STOPPED
    try:
        plot_study(report, out)
    except ImportError as err:  # a GPU machine without matplotlib: plot at home
        log(f"no plots ({err}): train.study.plot_study draws them from study.json later")
    log(json.dumps({s: {c: r["statistics"] for c, r in v.items()}
                    for s, v in report["headline"].items() if s != "paper"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
