"""Running one stage: data, compiled steps, Orbax checkpoints, metrics, resume.

A run directory holds ``config.json`` (the run's config), ``checkpoints/``
(Orbax ``CheckpointManager``: params, optimizer state, step, data position,
every ``checkpoint.every`` updates and at the end, the last ``keep`` kept),
``metrics.jsonl`` (one JSON object per logged update) and, at the end,
``model/`` (the trained model, ``coda_jax.save_model``) and, for CoDA models,
``coda_adapters.pt`` (the reference's adapter format). Running again on the
same directory resumes from its last checkpoint and reproduces the
uninterrupted run exactly; a directory of another config is refused. A NaN or
Inf loss stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from coda_jax import save_model
from convert import save_adapters

from . import data, sharding
from .config import TrainConfig, config_differences
from .gate_fit import fit_write_gates
from .steps import (build_model, learning_rates, loss_span, make_optimizer, make_train_step,
                    trainable_count)

RUN_FORMAT = "coda_jax.train_run/1"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the run stopped, its last good checkpoint kept."""


def _check_run_dir(run_dir: Path, cfg: TrainConfig) -> bool:
    """True when ``run_dir`` holds a run of this config to resume; refuse others."""
    record = run_dir / "config.json"
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise ValueError(f"the run directory {run_dir} is a file")
    if not record.is_file():
        if any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} is not empty and holds no training run (no "
                             "config.json); choose another --out")
        return False
    saved = json.loads(record.read_text())
    if saved.get("format") != RUN_FORMAT:
        raise ValueError(f"{record} is not a coda_jax training run")
    diffs = config_differences(saved["config"], cfg)
    if diffs:
        raise ValueError(f"{run_dir} holds a run of another config (differs in {diffs}); "
                         "resume it with its own config or choose another --out")
    return True


def _load_data(cfg: TrainConfig):
    vocab = _vocab_size(cfg)  # reads the initial model's metadata: once
    tokenizer = data.load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tokenizer is not None:
        data.check_vocab(tokenizer, vocab)
    if not cfg.data.train:
        raise ValueError("data.train is not set: give a shard directory, .npy or text file")
    tokens = data.read_tokens(cfg.data.train, tokenizer=tokenizer)
    if int(tokens.max()) >= vocab:
        raise ValueError(f"{cfg.data.train} holds token id {int(tokens.max())}, outside the "
                         f"model's vocabulary of {vocab}")
    targets = data.read_tokens(cfg.data.write_targets) if cfg.data.write_targets else None
    if targets is not None and (targets.shape != tokens.shape or int(targets.max()) > 1):
        raise ValueError(f"data.write_targets {cfg.data.write_targets} must hold one 0 or 1 "
                         f"per token of data.train ({tokens.size} tokens), got "
                         f"{targets.size} values up to {int(targets.max())}")
    return data.PackedBatches(tokens, seq_len=cfg.data.seq_len,
                              batch_size=cfg.optim.batch_size, seed=cfg.seed,
                              targets=targets), tokenizer


def _vocab_size(cfg: TrainConfig) -> int:
    if cfg.init:
        from coda_jax import read_model_metadata

        return int(read_model_metadata(cfg.init)["config"]["vocab_size"])
    return cfg.model.vocab_size


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _metrics_until(path: Path, step: int) -> float:
    """Drop logged updates after ``step`` (a resumed run logs them again); the last
    kept record's loss (NaN when none): what a run resumed at its end reports."""
    if not path.exists():
        return math.nan
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    _atomic_write_text(path, "".join(line + "\n" for line in kept))
    return float(json.loads(kept[-1])["loss"]) if kept else math.nan


def run(cfg: TrainConfig, run_dir: str | os.PathLike, *, progress: bool = True,
        stop_after: int | None = None, time_limit_s: float | None = None) -> dict[str, Any]:
    """Train one stage into ``run_dir`` (resuming it when it holds this config's run).

    ``stop_after`` ends this call after that many updates in total (with a
    checkpoint), to be resumed later: what a time-limited machine needs;
    ``time_limit_s`` likewise ends it (with a checkpoint) at the first update
    that finishes after that many seconds.
    Returns a summary: step reached, last loss, tokens seen, where the model is
    (None until the last update).
    """
    run_dir = Path(run_dir).absolute()
    resuming = _check_run_dir(run_dir, cfg)
    batches, tokenizer = _load_data(cfg)   # before anything is built: bad data fails fast
    span = loss_span(cfg, tokenizer)
    model, sources = build_model(cfg)
    if cfg.phase2.fit_write_gates and not resuming:  # a resumed run restores them
        fitted = fit_write_gates(model, batches.tokens, batches.targets,
                                 seq_len=cfg.data.seq_len, count=cfg.phase2.fit_write_gates,
                                 block_size=cfg.phase2.block_size, seed=cfg.seed,
                                 max_false_positives=cfg.phase2.fit_write_gates_false_positives)
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "gate_fit.json", json.dumps(fitted, indent=1))
    graphdef, params = nnx.split(model)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    params = sharding.shard_params(mesh, params)
    tx = make_optimizer(cfg, params)
    opt_state = sharding.shard_params(mesh, tx.init(params))
    step_fn = make_train_step(cfg, graphdef, tx, span)

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        _atomic_write_text(run_dir / "config.json", json.dumps(
            {"format": RUN_FORMAT, "config": cfg.to_dict(), "weights_from": sources}, indent=1))
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True))
    update, position = 0, 0
    if resuming and manager.latest_step() is not None:
        latest = manager.latest_step()
        restored = manager.restore(latest, args=ocp.args.Composite(
            train=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonRestore()))
        params, opt_state = restored.train["params"], restored.train["opt_state"]
        update, position = int(restored.meta["step"]), int(restored.meta["position"])
    metrics_path = run_dir / "metrics.jsonl"
    loss = _metrics_until(metrics_path, update)

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave({"step": step, "position": position})))
        manager.wait_until_finished()

    tokens_per_update = cfg.optim.batch_size * cfg.optim.grad_accum * cfg.data.seq_len
    bar = tqdm(total=cfg.optim.steps, initial=update, desc=cfg.stage, disable=not progress,
               unit="step")
    start = time.perf_counter()
    window_start, window_updates = start, 0
    end = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, stop_after)
    with open(metrics_path, "a") as log:
        while update < end:
            losses, norms = [], []
            for _ in range(cfg.optim.grad_accum):
                # The sequences' position seeds the draws: a resumed run draws the same.
                key = jax.random.fold_in(jax.random.key(cfg.seed), position)
                targets = (None if batches.targets is None else
                           sharding.shard_batch(mesh, batches.target_batch(position)))
                batch, position = batches.batch(position)
                batch = sharding.shard_batch(mesh, batch)
                new_params, new_opt, micro_loss, norm = step_fn(params, opt_state, batch, key,
                                                                targets)
                micro_loss = float(micro_loss)
                if not math.isfinite(micro_loss):
                    bar.close()
                    last = manager.latest_step()
                    raise NonFiniteLoss(
                        f"the loss became {micro_loss} at update {update + 1}; the run stopped "
                        f"and its last good checkpoint (update {last}) is kept in "
                        f"{run_dir / 'checkpoints'}")
                params, opt_state = new_params, new_opt
                losses.append(micro_loss)
                norms.append(float(norm))
            update += 1
            window_updates += 1
            loss = float(np.mean(losses))
            if update % cfg.log_every == 0 or update == cfg.optim.steps:
                now = time.perf_counter()
                rate = window_updates * tokens_per_update / max(now - window_start, 1e-9)
                window_start, window_updates = now, 0
                record = {"step": update, "loss": loss, "grad_norm": float(np.mean(norms)),
                          "tokens_per_s": rate, "position": position,
                          **learning_rates(cfg, update)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            out_of_time = (time_limit_s is not None
                           and time.perf_counter() - start > time_limit_s)
            if update % cfg.checkpoint.every == 0 or update == end or out_of_time:
                save(update)
            if out_of_time:
                break
    bar.close()
    manager.close()
    summary = {"step": update, "loss": loss, "model": None,
               "trainable_parameters": trainable_count(cfg, params),
               "tokens": update * tokens_per_update}
    if update < cfg.optim.steps:
        return summary
    trained = nnx.merge(graphdef, params)
    model_dir = save_model(run_dir / "model", trained, overwrite=True,
                           extra_meta={"trained_by": RUN_FORMAT, "stage": cfg.stage,
                                       "updates": update})
    summary["model"] = str(model_dir)
    # The reference's adapter format (it loads there with strict=True) holds the
    # differential layers' weights; a differential=False arm has no lambda or theta.
    if trained.attention != "gqa" and trained.spec.differential:
        summary["adapters"] = str(save_adapters(trained, run_dir / "coda_adapters.pt",
                                                overwrite=True))
    return summary
