"""The default model's recipes, every step in one command (one GPU, minutes).

    python -m train.default_model --corpus CORPUS --out OUT_DIR [--base MODEL_OR_EXPORT]
                                  [--from-stage NAME [--stage-model NAME=DIR ...]]
                                  [--recipe YAML] [--workers N] [--checks CACHES|none]
                                  [--set [STAGE:]KEY=VALUE ...]
                                  [--export-rank PATTERN=RANK ...]
                                  [--time-limit-s SECONDS] [--tiny] [--no-progress]

A recipe is a YAML file of ``configs/``: ``default_model.yaml`` (the bundled
19M model, the default) or ``default_model_smollm2.yaml`` (SmolLM2-135M-Instruct
with CoDA adapters). Its ``task`` (``train.recipe_tasks``: ``retention``, the
default, or ``retention_chat``) makes the data, the quick check and the card's
query settings. Running the same command again resumes it: the data and the
finished stages are kept, an interrupted stage resumes from its last checkpoint.
With ``--time-limit-s`` a stage stops at its first update after that many seconds
(with a checkpoint) and the command exits 4: run it again to go on (what a
machine lent 10 minutes at a time needs). ``--set`` changes every trained
stage's config (``optim.trainable=attention_mlp`` trains the MLPs beside the
attention), ``--set STAGE:KEY=VALUE`` one stage's; ``--export-rank 'layers.mlp.*=64'`` exports those parameters'
differences from a pretrained base as rank-64 factors (the recipe's
``export_ranks``), so a bundle of them stays small. Both are recorded in the card.

1. the base: ``--base`` (a model checkpoint or a ``convert pack`` export, e.g.
   the 2x2 study's), else pretrained here from the recipe's ``base`` config; a
   recipe whose ``base`` names a pretrained model (``smollm2``: the converted
   SmolLM2-135M-Instruct, ``python -m convert gguf smollm2 DIR``) needs it as
   ``--base``;
2. the data of every stage, generated in ``--workers`` processes from the
   corpus's training split and the task's training names, places and
   phrasings, with the content marks where a stage trains the write gates
   (``write_targets: true``) and a share ``plain_share`` of plain corpus text
   (weighed by the stage config's ``data.plain_text_loss``);
3. the stages in order, each starting from the model of the one before (its
   training config is the stage's ``config``); ``--from-stage NAME`` resumes
   the recipe there, from ``--base`` as the model of the stages before it
   (for example a bundled model: ``coda_db/default_model``), or, for a recipe
   with a pretrained base, from ``--stage-model`` of the stage before it;
4. a quick retention check on held-out documents of the task (teacher-forced
   exact match, bounded, unbounded and window only:
   ``train.evaluation.retention_quick``), ``OUT_DIR/retention_quick.json``;
5. ``OUT_DIR/export``: the model as bf16 safetensors shards (what a GPU
   machine sends home), for a recipe with a pretrained base only what differs
   from it (``convert.model_export``: load it with ``load_export(path,
   base=...)``), with ``card.json`` (architecture, bank, data, steps,
   recommended query settings, the base's pin, the quick check) and
   ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from .recipe import (CONFIGS, PRETRAINED_BASES, RECIPE, bank_stage, base_pin, load_recipe,
                     stage_config, stage_overrides, stages_to_run)

TINY_QUICK = dict(lengths=[256], facts=[1, 2], depths=[0.5], count=1, passages=1)
TINY_MAX_FACTS = 2
QUICK_CACHES = ("bounded", "unbounded", "window_only")


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


def _as_model_dir(path: Path, converted: Path) -> Path:
    """A model checkpoint directory: ``path``, or a ``convert pack`` export at
    ``path`` saved as one at ``converted``."""
    from coda_jax import save_model
    from convert.model_export import is_model_export, load_export

    if is_model_export(path):
        return save_model(converted, load_export(path), overwrite=True)
    return path


def _base_model_dir(args, recipe: dict[str, Any], corpus: Path, out: Path, log) -> Path:
    from .config import TrainConfig
    from .loop import run

    if args.base:
        return _as_model_dir(Path(args.base), out / "base_model")
    from .study import read_study_config

    cfg, _ = read_study_config(CONFIGS / recipe["base"])  # the study's base stage
    cfg["data"] = cfg["data"] | dict(train=str(corpus / "train"), heldout="",
                                     tokenizer=str(corpus / "tokenizer.json"))
    if args.tiny:
        cfg = _tiny(cfg, 128)
        cfg["model"] = cfg["model"] | dict(hidden_size=32, intermediate_size=64, num_layers=2,
                                           num_heads=2, num_kv_heads=1, head_dim=16)
    run(TrainConfig.from_dict(cfg), out / "runs" / "base", progress=not args.no_progress)
    log("base pretrained")
    return out / "runs" / "base" / "model"


def _check_pinned(recipe: dict[str, Any], base: Path) -> None:
    """``ValueError`` when a pretrained base's recorded source is not the pinned file
    (a base converted from elsewhere, or an export, records none: not checked)."""
    from coda_jax import read_model_metadata

    source = read_model_metadata(base).get("source") or {}
    pinned = base_pin(recipe["base"])["sha256"]
    if source.get("sha256") not in (None, pinned):
        raise ValueError(f"--base {base} was converted from a file of sha256 "
                         f"{source['sha256'][:12]}..., not the pinned {recipe['base']} "
                         f"({pinned[:12]}...)")


def _sequences(job: tuple[str, str, int, int, int, int, int]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One worker's share of a stage's sequences: the task's, then the plain
    corpus text (a process of its own)."""
    from . import data
    from .recipe_tasks import TASKS, plain_sequences

    task, corpus, seq_len, count, plain, max_facts, seed = job
    tok = data.load_tokenizer(Path(corpus) / "tokenizer.json")
    filler = data.read_tokens(Path(corpus) / "train")
    rows = list(TASKS[task].sequences(tok, filler, seq_len=seq_len, count=count,
                                      max_facts=max_facts, seed=seed))
    # The plain text draws from a stream of its own, apart from the task's.
    return rows + list(plain_sequences(filler, seq_len=seq_len, count=plain,
                                       rng=np.random.default_rng([seed, 1])))


def stage_data(corpus: Path, out: Path, *, seq_len: int, count: int, max_facts: int,
               seed: int, workers: int, task: str = "retention", plain: int = 0
               ) -> tuple[Path, Path]:
    """A stage's ``count`` sequences of ``seq_len + 1`` tokens, ``plain`` of them
    plain corpus text and the others the ``task``'s, as token shards and
    content-mark shards (``train.retention.write_training_shards``); worker ``i``
    draws its share with seed ``(seed, i)``, so a run with the same workers is
    reproducible."""
    from concurrent.futures import ProcessPoolExecutor

    from . import data, retention

    def split(n: int) -> list[int]:
        return [n // workers + (i < n % workers) for i in range(workers)]

    jobs = [(task, str(corpus), seq_len, n, p, max_facts, seed * 1000 + i)
            for i, (n, p) in enumerate(zip(split(count - plain), split(plain))) if n + p]
    if len(jobs) == 1:
        parts = [_sequences(jobs[0])]
    else:
        # Spawned, not forked: a fork of a process running JAX may deadlock.
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")
                                 ) as pool:
            parts = list(pool.map(_sequences, jobs))
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    return retention.write_training_shards(
        [row for part in parts for row in part], out, meta={
            "split": f"{task}-{out.name}", "task": task, "seq_len": seq_len,
            "sequences": count, "plain_sequences": plain, "max_facts": max_facts,
            "seed": seed, "workers": len(jobs),
            "tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})


def _prepare_data(args, recipe: dict[str, Any], configs: dict[str, dict[str, Any]],
                  running: list[dict[str, Any]], corpus: Path, out: Path, log) -> None:
    """Each running stage's data (kept where an earlier run made it), set in its config."""
    from . import retention

    for stage in running:
        if "average" in stage:
            continue
        name, cfg = stage["name"], configs[stage["name"]]
        max_facts = TINY_MAX_FACTS if args.tiny else stage["max_facts"]
        seq_len = cfg["data"]["seq_len"]
        count = cfg["optim"]["steps"] * cfg["optim"]["batch_size"] * cfg["optim"]["grad_accum"]
        plain = round(count * stage.get("plain_share", 0))
        shards = out / "data" / name
        marks = Path(f"{shards}{retention.MARKS_SUFFIX}")
        if not (shards.exists() and marks.exists()):
            for partial in (shards, marks):  # ours, left by an interrupted run
                shutil.rmtree(partial, ignore_errors=True)
            stage_data(corpus, shards, seq_len=seq_len, count=count, max_facts=max_facts,
                       seed=cfg["seed"], workers=args.workers, task=recipe["task"],
                       plain=plain)
            log(f"{name}: {count - plain} {recipe['task']} sequences of {seq_len + 1} "
                f"tokens, up to {max_facts} facts, and {plain} of plain text")
        cfg["data"] = cfg["data"] | dict(train=str(shards),
                                         tokenizer=str(corpus / "tokenizer.json"))
        if stage.get("write_targets"):
            cfg["data"]["write_targets"] = str(marks)


def _quick_check(args, task, model, tok, corpus: Path, quick: dict[str, Any],
                 block_size: int, log) -> list[dict[str, Any]]:
    """The quick retention check's rows, cache by cache (``args.checks``)."""
    from . import data
    from .evaluation.retention_quick import retention_accuracy
    from .steps import with_bank

    docs = task.eval_documents(tok, data.read_tokens(corpus / "heldout"), quick,
                               seed=7) if args.checks else []
    checks = []
    for label in args.checks:
        runner = (with_bank(model, num_landmarks_exact=0, num_landmarks_summary=0)
                  if label == "window_only" else model)
        rows = retention_accuracy(runner, tok, docs, bounded=label != "unbounded",
                                  block_size=block_size, quiz=task.quiz)
        checks += [dict(r, cache=label) for r in rows]
        total = sum(r["total"] for r in rows)
        log(f"retention {label}: {sum(r['correct'] for r in rows)}/{total}")
    return checks


def build(args) -> int:
    """Run the recipe ``args`` name (see the module's description); 0 when done,
    4 when ``args.time_limit_s`` ran out first (run it again to resume)."""
    from coda_jax import load_model, save_model
    from convert.model_export import base_fingerprint, export_model

    from . import data
    from .average import average_models
    from .config import TrainConfig, apply_overrides, load_config
    from .evaluation.retention_workers import write_json
    from .loop import run
    from .plots import read_metrics
    from .recipe_tasks import TASKS
    from .study import Clock

    clock = Clock(args.time_limit_s)
    recipe = load_recipe(args.recipe)
    task, pretrained = TASKS[recipe["task"]], recipe["base"] in PRETRAINED_BASES
    corpus, out = Path(args.corpus).absolute(), Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = lambda msg: print(f"[default-model] {msg} ({time.perf_counter() - start:.0f} s)",  # noqa: E731
                            flush=True)
    tok = data.load_tokenizer(corpus / "tokenizer.json")
    configs = {s["name"]: stage_config(s["config"]) for s in recipe["stages"] if "config" in s}
    if args.tiny:
        configs = {name: _tiny(cfg, task.tiny_seq_len) for name, cfg in configs.items()}
    for name, cfg in configs.items():  # --set, checked before any work
        changes = stage_overrides(args.overrides, name, list(configs))
        load_config(None, changes)
        apply_overrides(cfg, changes)
    recipe["export_ranks"] = recipe["export_ranks"] | dict(args.export_ranks)
    if recipe["export_ranks"] and not pretrained:
        raise ValueError("--export-rank: ranks apply to an export relative to a pretrained "
                         "base; this recipe trains from scratch")
    running = stages_to_run(recipe, args.from_stage)
    names = [s["name"] for s in recipe["stages"]]
    first = names.index(running[0]["name"])
    if pretrained and not args.base:
        raise ValueError(f"the recipe starts from the pretrained {recipe['base']}: give it "
                         f"with --base ({PRETRAINED_BASES[recipe['base']]})")
    if first and pretrained and names[first - 1] not in dict(args.stage_models):
        raise ValueError(f"--from-stage {names[first]}: --base is the pretrained "
                         f"{recipe['base']}; give the model of stage {names[first - 1]} with "
                         f"--stage-model {names[first - 1]}=DIR")
    _prepare_data(args, recipe, configs, running, corpus, out, log)

    base = _base_model_dir(args, recipe, corpus, out, log)
    if pretrained:
        _check_pinned(recipe, base)
    # The models of stages before --from-stage: the one just before is --base (with
    # a pretrained base, the base stays --base and that model is a --stage-model).
    models = {name: _as_model_dir(Path(path), out / "stage_models" / name)
              for name, path in args.stage_models}
    if first:
        models.setdefault(names[first - 1], base)
    report: dict[str, Any] = {"device": str(jax.devices()[0].device_kind),
                              "jax": jax.__version__, "base": str(base),
                              "from_stage": args.from_stage,
                              "stage_models": {n: str(p) for n, p in models.items()},
                              "recipe": recipe, "stages": {}}
    init = models[names[first - 1]] if first else base
    for stage in running:
        name = stage["name"]
        if "average" in stage:
            missing = [n for n in stage["average"] if n not in models]
            if missing:
                raise ValueError(f"stage {name} averages {missing}, of which this run has "
                                 "no model: give them with --stage-model NAME=DIR")
            parts = [load_model(models[n]) for n in stage["average"]]
            init = save_model(out / "runs" / name / "model",
                              average_models(parts, spec=parts[-1].spec), overwrite=True)
            report["stages"][name] = {"average": {n: str(models[n]) for n in stage["average"]}}
            log(f"{name}: the mean of {', '.join(stage['average'])}")
        else:
            cfg = configs[name]
            cfg["init"] = str(init)
            left = clock.left()
            summary = run(TrainConfig.from_dict(cfg), out / "runs" / name,
                          progress=not args.no_progress,
                          time_limit_s=None if left is None else max(left, 0.0))
            if not summary["model"]:
                log(f"{name}: stopped at the time limit after {summary['step']} updates "
                    "(checkpoint kept): run the same command again to go on")
                return 4
            report["stages"][name] = {"config": cfg, "summary": summary,
                                      "metrics": read_metrics(out / "runs" / name)}
            log(f"{name}: loss {summary['loss']:.4f} after {summary['step']} updates")
            init = out / "runs" / name / "model"
        models[name] = init

    model = load_model(init)
    final = configs[bank_stage(recipe)]
    # The export and its card first, the quick check after: a check that fails or
    # runs out of memory leaves the trained model written (what a lent machine
    # sends home); the card then gains the check's rows.
    base_model = load_model(base) if pretrained else None
    export = export_model(model, out / "export", overwrite=True, base=base_model,
                          ranks=recipe["export_ranks"] if base_model is not None else None)
    if base_model is None:  # an adapter export takes its tokenizer from the base's file
        shutil.copy(corpus / "tokenizer.json", export / "tokenizer.json")
    card = {"name": "coda-jax default model", "architecture": json.loads(
        (export / "export.json").read_text())["config"],
        "attention": final["attention"],
        "database": task.database_settings(tok),
        "training": {"base": str(base), "from_stage": args.from_stage, "recipe": recipe,
                     "stages": {n: s.get("config", s.get("average"))
                                for n, s in report["stages"].items()},
                     "stage_models": report["stage_models"],
                     "task": task.card()},
        "retention_quick": []}
    if base_model is not None:  # the export holds differences from it: name it exactly
        card["base"] = base_pin(recipe["base"]) | {
            "weights_fingerprint": base_fingerprint(base_model)}
    write_json(export / "card.json", card)
    log(f"wrote {export}")

    checks = _quick_check(args, task, model, tok, corpus,
                          TINY_QUICK if args.tiny else recipe["quick_check"],
                          final["phase2"]["block_size"], log)
    report["retention_quick"] = card["retention_quick"] = checks
    write_json(out / "retention_quick.json", report)
    write_json(export / "card.json", card)
    return 0


def _stage_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def _export_rank(text: str) -> tuple[str, int]:
    from convert.model_export import parse_ranks

    try:
        return next(iter(parse_ranks([text]).items()))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked (``SystemExit`` with a message when wrong)."""
    parser = argparse.ArgumentParser(prog="python -m train.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="a corpus of python -m train.corpus")
    parser.add_argument("--out", required=True, help="the run's directory")
    parser.add_argument("--base", help="the base model (checkpoint or pack export); a recipe "
                        "with a pretrained base needs it (e.g. a converted SmolLM2)")
    parser.add_argument("--from-stage", metavar="NAME",
                        help="resume the recipe at this stage, from --base as the model of "
                             "the stages before it")
    parser.add_argument("--stage-model", dest="stage_models", action="append", default=[],
                        type=_stage_model, metavar="NAME=DIR",
                        help="with --from-stage: the model an earlier stage made (for a "
                             "stage that averages it, or, with a pretrained base, the stage "
                             "before --from-stage); repeatable")
    parser.add_argument("--recipe", default=str(RECIPE),
                        help="the recipe YAML (default: configs/default_model.yaml; "
                             "SmolLM2's: configs/default_model_smollm2.yaml)")
    parser.add_argument("--workers", type=int, default=max(1, min(16, os.cpu_count() or 1)),
                        help="processes generating the stages' data (default: %(default)s)")
    parser.add_argument("--checks", default="bounded,unbounded,window_only",
                        help="caches of the quick retention check (default: %(default)s; "
                             "none: no check, e.g. on a CPU, where it takes about 40 min)")
    parser.add_argument("--time-limit-s", type=float, metavar="SECONDS",
                        help="stop a stage at its first update after this many seconds, "
                             "with a checkpoint, and exit 4 (run again to go on)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="[STAGE:]KEY=VALUE", help="a config change for every trained "
                        "stage (e.g. optim.trainable=attention_mlp), or for one "
                        "(phase2:optim.steps=300); repeatable")
    parser.add_argument("--export-rank", dest="export_ranks", action="append", default=[],
                        type=_export_rank, metavar="PATTERN=RANK",
                        help="export the differences of the parameters matching PATTERN "
                             "(e.g. 'layers.mlp.*') at this rank (the recipe's export_ranks); "
                             "repeatable")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized (tests)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.time_limit_s is not None and args.time_limit_s < 0:
        parser.error(f"--time-limit-s must be at least 0, got {args.time_limit_s}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.from_stage and not args.base:
        parser.error("--from-stage needs --base: the model the stages before it made")
    args.checks = [c for c in args.checks.split(",") if c and c != "none"]
    unknown = sorted(set(args.checks) - set(QUICK_CACHES))
    if unknown:
        parser.error(f"--checks: unknown {unknown}; choose from {list(QUICK_CACHES)} or none")
    if args.stage_models and not args.from_stage:
        parser.error("--stage-model is for a run resumed with --from-stage")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for needed in ("train", "heldout", "tokenizer.json"):
        if not (Path(args.corpus) / needed).exists():
            print(f"error: {Path(args.corpus) / needed} does not exist (build the corpus with "
                  "python -m train.corpus)", file=sys.stderr)
            return 2
    from .cli import run_reporting_errors

    return run_reporting_errors(lambda: build(args))


if __name__ == "__main__":
    sys.exit(main())
