"""Typed configuration of a training run, read from YAML with ``--set`` overrides.

Every field is documented here; an unknown field anywhere is an error naming
it. The defaults are the reference's recipe (its training script): learning
rate 5e-5 for the projections and 1e-3 for lambda, theta and the head norm,
weight decay 0.01, 100 warmup steps then cosine, clipping at 1.0, sequence
2048, batch 2 x 4 accumulation, theta initialised at 0, phase 2 at 0.1x the
learning rate with bounded block size 128 and gradients through evictions.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

Stage = Literal["pretrain", "phase1", "phase2"]
# What the optimizer updates: the attention (the reference's adapters), the attention and
# the MLPs (all else frozen: embeddings, norms), or every parameter.
Trainable = Literal["attention", "attention_mlp", "all"]
ComputeDtype = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The decoder built from scratch (``pretrain``) or checked against ``init``."""

    family: str = "llama"
    vocab_size: int = 16384
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionSection:
    """The attention trained: ``kind`` plus the layers' flat keywords (the reference's
    names: window, num_landmarks_exact, ...) as ``options``. ``pretrain`` uses
    ``gqa``; ``phase1`` ``coda`` (or ``coda_bounded`` with differential=False for
    the GQA arm of the ablation); ``phase2`` ``coda_bounded``."""

    kind: str = "gqa"
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Token data: ``train`` and ``heldout`` are shard directories, ``.npy`` token
    files, or ``.txt``/``.jsonl`` text (tokenised with ``tokenizer``)."""

    train: str = ""
    heldout: str = ""
    tokenizer: str = ""
    seq_len: int = 2048
    # The loss counts only the spans that start after this text (tokenised with
    # ``tokenizer``) and run to the next token holding ``loss_stop``, that token
    # included (e.g. "\nAnswer:" and "\n": the answers of a question-answer task;
    # "<|im_start|>assistant\n" and "<|im_end|>": the assistant's turns of a chat, whose
    # special tokens count with their text spelled out); empty: every token counts.
    loss_start: str = ""
    loss_stop: str = "\n"
    # With loss_start: the weight of the loss on plain-text sequences, those holding
    # no loss_start at all, whose every token then counts (plain corpus text mixed
    # into a question-answer task, to keep the model's general language). The loss
    # is then the mean over the answers' tokens plus this weight times the mean over
    # the plain sequences' tokens; 0: plain sequences count nothing.
    plain_text_loss: float = 0.0
    # Phase 2: per-token write-gate targets aligned with ``train`` (0/1 token shards,
    # e.g. train.retention's marks), trained with weight phase2.write_gate_loss.
    write_targets: str = ""


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then cosine decay to 0 over ``steps`` updates."""

    steps: int = 2000               # optimizer updates (each of batch_size * grad_accum sequences)
    lr: float = 5e-5                # q/k/v/o projections (and everything else with trainable=all)
    lr_gates: float = 1e-3          # lambda, theta, head norm, write gate, summary eta
    lr_scale: float = 1.0           # multiplies both (phase 2: 0.1)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    clip_norm: float = 1.0
    batch_size: int = 2
    grad_accum: int = 4
    trainable: Trainable = "attention"
    compute_dtype: ComputeDtype = "bfloat16"   # master weights stay float32


@dataclasses.dataclass(frozen=True)
class Phase2Section:
    """Bounded training: the prompt is prefilled block by block under ``jax.grad``."""

    block_size: int = 128
    detach_evicted: bool = False    # False: gradients flow through evictions
    remat: bool = True              # recompute each layer in the backward pass
    # Weight of the write-gate loss (balanced binary cross-entropy of every
    # layer's write-gate logits against data.write_targets); 0: none.
    write_gate_loss: float = 0.0
    # Marked sequences of data.train on which the write gates are fitted to
    # data.write_targets before the first update (train/gate_fit.py); 0: none.
    fit_write_gates: int = 0
    # After that fit, each layer's gate bias lowered until at most this share of the
    # unmarked tokens pass (the exact bank keeps its latest writes); 0: no cap.
    fit_write_gates_false_positives: float = 0.0
    # Weight of self-distillation: the KL divergence from the same weights' full-attention
    # next-token distribution (no gradient) to the bounded one, at every position past
    # the window. The answers' loss teaches reading the banks once per sequence; this
    # at every token that lost context to eviction. 0: none.
    distill: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100                # steps between Orbax checkpoints (and one at the end)
    keep: int = 3                   # the last K are kept


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Devices as a (data, fsdp) mesh (``train/sharding.py``); data=-1 takes every
    device the fsdp axis leaves. optim.batch_size must divide by data x fsdp."""

    data: int = -1
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One stage of training. ``init``: a saved model directory (ours) to start
    from; empty for ``pretrain`` from scratch. Parameters the initial model lacks
    (CoDA's own) get their initial values, theta at ``theta_init``."""

    stage: Stage = "pretrain"
    init: str = ""
    seed: int = 0
    theta_init: float = 0.0
    log_every: int = 10
    model: ModelSection = ModelSection()
    attention: AttentionSection = AttentionSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    phase2: Phase2Section = Phase2Section()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, Stage)
        if self.stage == "phase2":
            if self.attention.kind != "coda_bounded":
                raise ValueError("stage phase2 trains attention.kind coda_bounded, "
                                 f"not {self.attention.kind!r}")
            if self.data.seq_len % self.phase2.block_size:
                raise ValueError(f"data.seq_len ({self.data.seq_len}) must be a multiple of "
                                 f"phase2.block_size ({self.phase2.block_size})")
        weight = _check_weight("phase2.write_gate_loss", self.phase2.write_gate_loss)
        if bool(weight) != bool(self.data.write_targets) or (weight and self.stage != "phase2"):
            raise ValueError("phase2.write_gate_loss > 0 and data.write_targets go together, "
                             "in stage phase2 only (the write gates are the bounded layers')")
        fit = self.phase2.fit_write_gates
        if not isinstance(fit, int) or isinstance(fit, bool) or fit < 0:
            raise ValueError(f"phase2.fit_write_gates must be an integer >= 0, got {fit!r}")
        if fit and (self.stage != "phase2" or not self.data.write_targets):
            raise ValueError("phase2.fit_write_gates fits the write gates to "
                             "data.write_targets: stage phase2 with write targets only")
        if _check_weight("phase2.distill", self.phase2.distill) and self.stage != "phase2":
            raise ValueError("phase2.distill teaches a bounded model its own full-attention "
                             "predictions: stage phase2 only")
        cap = self.phase2.fit_write_gates_false_positives
        if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 <= cap < 1:
            raise ValueError("phase2.fit_write_gates_false_positives must be a share in "
                             f"[0, 1), got {cap!r}")
        if cap and not fit:
            raise ValueError("phase2.fit_write_gates_false_positives caps the fitted gates: "
                             "it needs phase2.fit_write_gates")
        if _check_weight("data.plain_text_loss", self.data.plain_text_loss) \
                and not self.data.loss_start:
            raise ValueError("data.plain_text_loss weighs the sequences that hold no "
                             "data.loss_start: it needs a loss_start (without one every "
                             "token counts already)")
        for name, value in (("optim.steps", self.optim.steps),
                            ("optim.batch_size", self.optim.batch_size),
                            ("optim.grad_accum", self.optim.grad_accum),
                            ("data.seq_len", self.data.seq_len),
                            ("checkpoint.every", self.checkpoint.every),
                            ("checkpoint.keep", self.checkpoint.keep),
                            ("log_every", self.log_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("optim.trainable", self.optim.trainable, Trainable)
        _check_choice("optim.compute_dtype", self.optim.compute_dtype, ComputeDtype)

    # ------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """From nested plain data; an unknown field is a ``ValueError`` naming it."""
        return _build(cls, d, "")


# Fields a resumed run may change (a longer run, other logging): the rest must match.
RESUMABLE_CHANGES = ("optim.steps", "log_every", "checkpoint.every", "checkpoint.keep",
                     "mesh.data", "mesh.fsdp")


def _check_weight(name: str, value: Any) -> float:
    """``value``, a loss weight: a finite number >= 0 (else ``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return value


def _check_choice(name: str, value: Any, literal: Any) -> None:
    choices = typing.get_args(literal)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, "
                         f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {[prefix + u for u in unknown]}; known "
                         f"in {prefix.rstrip('.') or 'the top level'}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", value, kind)
    return cls(**values)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """YAML gives ints where floats are meant (1e-3 is fine, 1 is an int): widen."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {int: int, float: float, str: str, bool: bool, dict: dict}.get(kind)
    if expected is not None and (not isinstance(value, expected)
                                 or (expected is int and isinstance(value, bool))):
        raise ValueError(f"{name} must be a {expected.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes key=value (dotted keys), got {text!r}")
    return key.split("."), yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The YAML file at ``path`` (or the defaults) with ``key=value`` overrides applied."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
    return TrainConfig.from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` (a config as nested dicts, changed in place) with each ``key=value``
    of ``overrides`` set (:func:`parse_override`)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text}: {key} is not a section")
        node[keys[-1]] = value
    return data


def config_differences(saved: Mapping[str, Any], now: TrainConfig) -> list[str]:
    """Dotted fields where a run directory's saved config differs from ``now``,
    apart from :data:`RESUMABLE_CHANGES`."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, Mapping) and k != "options":
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = json.loads(json.dumps(v))
        return out

    a, b = flat(saved), flat(now.to_dict())
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k))
