"""The model a stage trains, its loss, its optimizer and one compiled training step.

Losses differentiate the library's public pure functions: the unbounded
``CausalLM.__call__`` (pretrain, phase 1) and ``CausalLM.prefill_segment(...,
training=True)`` over the whole sequence (phase 2: block by block through the
bounded state, gradients through evictions when ``detach_evicted=False``).
Master weights are float32; the forward runs in ``compute_dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from coda_jax import AttentionSpec, CausalLM, DecoderConfig, load_model

from .config import TrainConfig

# Parameters of the differential machinery, trained at optim.lr_gates (the reference's
# 1e-3 group: lambda, theta, head norm; the write gate and summary eta with them).
GATE_NAMES = ("theta", "lambda_proj", "head_norm", "write_proj", "summary_eta_logit")


def attention_spec(cfg: TrainConfig) -> AttentionSpec:
    """The attention the stage trains, from ``cfg.attention`` (flat reference keywords)."""
    options = dict(cfg.attention.options)
    if cfg.attention.kind != "gqa":
        options.setdefault("theta_init", cfg.theta_init)
    if cfg.attention.kind == "coda_bounded":
        options.setdefault("detach_evicted", cfg.phase2.detach_evicted)
    return AttentionSpec.from_options(cfg.attention.kind, options)


def param_paths(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
    """Every parameter of ``model`` by its path."""
    return {tuple(str(p) for p in path): var for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)}


def copy_matching_params(source: nnx.Module, target: nnx.Module) -> dict[str, list[str]]:
    """Copy into ``target`` every parameter ``source`` has at the same path and shape
    (as float32); -> ``{"init": copied paths, "new": the others}``."""
    old = param_paths(source)
    sources: dict[str, list[str]] = {"init": [], "new": []}
    for path, var in param_paths(target).items():
        if path in old and old[path][...].shape == var[...].shape:
            var[...] = old[path][...].astype(var[...].dtype)
            sources["init"].append(".".join(path))
        else:
            sources["new"].append(".".join(path))
    return sources


def build_model(cfg: TrainConfig) -> tuple[CausalLM, dict[str, list[str]]]:
    """The model to train and where its weights came from: ``{"init": [...],
    "new": [...]}`` (parameter paths taken from ``cfg.init``, or freshly initialised)."""
    spec = attention_spec(cfg)
    if cfg.init:
        base = load_model(cfg.init)
        decoder = base.cfg
    else:
        base, decoder = None, DecoderConfig(**dataclasses.asdict(cfg.model))
    model = CausalLM(decoder, attention=spec, param_dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
    if base is None:
        return model, {"init": [], "new": [".".join(p) for p in param_paths(model)]}
    return model, copy_matching_params(base, model)


def param_label(path: tuple[str, ...], trainable: str) -> str:
    """Optimizer group of a parameter: ``"gates"``, ``"weights"`` or ``"frozen"``."""
    in_attention = path[:2] == ("layers", "self_attn")
    if in_attention and any(name in path for name in GATE_NAMES):
        return "gates"
    if in_attention or trainable == "all" or (trainable == "attention_mlp"
                                              and path[:2] == ("layers", "mlp")):
        return "weights"
    return "frozen"


def schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
    """Linear warmup to ``peak * lr_scale``, then cosine decay to 0 at the last update."""
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        0.0, peak * o.lr_scale, warmup_steps=min(o.warmup_steps, o.steps - 1),
        decay_steps=max(o.steps, 1), end_value=0.0)


def make_optimizer(cfg: TrainConfig, params: Any) -> optax.GradientTransformation:
    """AdamW per group (warmup then cosine), global-norm clipping, accumulation."""
    o = cfg.optim

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(schedule(cfg, peak), b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=o.weight_decay)

    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: _group_at(path, o.trainable), params)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.multi_transform(
        {"weights": adamw(o.lr), "gates": adamw(o.lr_gates), "frozen": optax.set_to_zero()},
        labels))
    return optax.MultiSteps(tx, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else tx


def learning_rates(cfg: TrainConfig, update: int) -> dict[str, float]:
    """The two groups' learning rates at optimizer update ``update`` (for the log)."""
    return {"lr": float(schedule(cfg, cfg.optim.lr)(update)),
            "lr_gates": float(schedule(cfg, cfg.optim.lr_gates)(update))}


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _group_at(key_path: tuple, trainable: str) -> str:
    """``param_label`` of the leaf at a ``jax.tree_util`` key path."""
    return param_label(tuple(_key_name(k) for k in key_path), trainable)


def random_active_sizes(state, bank, key: jax.Array):
    """A state whose active bank sizes are drawn per layer and row, uniformly between
    each bank's minimum and maximum (training with dynamic expansion configured sees
    every size it may run at)."""
    k_exact, k_summary = jax.random.split(key)
    shape = state.active_exact.shape
    draws = {}
    for name, k, lo, hi in (("active_exact", k_exact, bank.min_landmarks_exact,
                             bank.max_landmarks_exact),
                            ("active_summary", k_summary, bank.min_landmarks_summary,
                             bank.max_landmarks_summary)):
        if lo < hi:
            draws[name] = jax.random.randint(k, shape, lo, hi + 1, state.active_exact.dtype)
    return state.replace(**draws)


class LossSpan(NamedTuple):
    """Token ids that open a counted span (in order) and ids that close one."""

    start: tuple[int, ...]
    stop: tuple[int, ...]


def loss_span(cfg: TrainConfig, tokenizer: Any) -> LossSpan | None:
    """``cfg.data.loss_start``/``loss_stop`` as token ids (None: every token counts).
    The stop tokens are those whose text, special tokens spelled out, holds
    ``loss_stop`` (so ``"<|im_end|>"`` names a chat template's end of turn)."""
    if not cfg.data.loss_start:
        return None
    if tokenizer is None:
        raise ValueError("data.loss_start needs data.tokenizer (to find it in the tokens)")
    start = tuple(tokenizer.encode(cfg.data.loss_start).ids)
    stop = tuple(i for i in range(tokenizer.get_vocab_size())
                 if cfg.data.loss_stop
                 and cfg.data.loss_stop in tokenizer.decode([i], skip_special_tokens=False))
    if not start or not stop:
        raise ValueError(f"data.loss_start {cfg.data.loss_start!r} / loss_stop "
                         f"{cfg.data.loss_stop!r} give no tokens with this tokenizer")
    return LossSpan(start, stop)


def start_ends(tokens: jax.Array, span: LossSpan) -> jax.Array:
    """(B, L + 1) bool: True where a match of the ``span.start`` ids ends."""
    k = len(span.start)
    ends = jnp.ones(tokens.shape, bool)
    for i, token in enumerate(span.start):
        shifted = jnp.pad(tokens, ((0, 0), (k - 1 - i, 0)), constant_values=-1)
        ends &= shifted[:, :tokens.shape[1]] == token
    return ends


def span_weights(tokens: jax.Array, span: LossSpan) -> jax.Array:
    """(B, L) float32: 1 where the target ``tokens[:, j + 1]`` lies in a counted span
    (after the last ``span.start`` match ending at or before j, and no stop token
    between that match and j)."""
    length = tokens.shape[1] - 1
    ends = start_ends(tokens, span)
    positions = jnp.arange(tokens.shape[1])
    is_stop = jnp.isin(tokens, jnp.asarray(span.stop))
    last_start = jax.lax.cummax(jnp.where(ends, positions, -1), axis=1)
    last_stop = jax.lax.cummax(jnp.where(is_stop & ~ends, positions, -1), axis=1)
    inside = (last_start >= 0) & (last_start >= last_stop)
    return inside[:, :length].astype(jnp.float32)


def write_gate_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Balanced binary cross-entropy of write-gate ``logits`` (layers, B, L) against
    0/1 ``targets`` (B, L): the mean over the marked tokens plus the mean over the
    others, so a few marked tokens in a long document weigh as much as the rest."""
    bce = optax.sigmoid_binary_cross_entropy(logits, jnp.broadcast_to(targets, logits.shape))
    pos = jnp.broadcast_to(targets, logits.shape)
    neg = 1.0 - pos
    return (jnp.sum(bce * pos) / jnp.maximum(jnp.sum(pos), 1.0)
            + jnp.sum(bce * neg) / jnp.maximum(jnp.sum(neg), 1.0))


def self_distillation(model: CausalLM, inputs: jax.Array, logits: jax.Array) -> jax.Array:
    """Mean KL divergence, over the positions past the bounded ``model``'s window,
    from its unbounded twin's next-token distribution on ``inputs`` (the same
    weights with full attention; no gradient) to ``logits`` (B, L, V): where the
    bounded model predicts from its banks, what the whole context predicts."""
    teacher, _ = unbounded_twin(model)(inputs)
    target = jax.nn.log_softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=-1)
    student = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(target) * (target - student), axis=-1)                # (B, L)
    past = (jnp.arange(inputs.shape[1]) >= model.spec.bank.window).astype(jnp.float32)
    return jnp.sum(kl * past) / jnp.maximum(jnp.sum(past) * inputs.shape[0], 1.0)


def loss_fn(cfg: TrainConfig, model: CausalLM, tokens: jax.Array,
            key: jax.Array | None = None, span: LossSpan | None = None,
            write_targets: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens`` (B, L + 1), over the counted
    spans only when ``span`` is given (plus ``data.plain_text_loss`` x the mean
    over the rows that hold no span start, where that weight is set); ``key``
    draws the active bank sizes in phase 2 (none: the banks' initial sizes);
    ``write_targets`` (B, L + 1), in phase 2, adds ``phase2.write_gate_loss`` x
    :func:`write_gate_loss`; ``phase2.distill`` adds that weight x
    :func:`self_distillation`."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    aux_terms = jnp.float32(0.0)
    if cfg.stage == "phase2":
        state = model.init_state(inputs.shape[0], jnp.dtype(cfg.optim.compute_dtype),
                                 mem_init="zeros")
        if key is not None:
            state = random_active_sizes(state, model.spec.bank, key)
        lengths = jnp.full((inputs.shape[0],), inputs.shape[1], jnp.int32)
        out = model.prefill_segment(inputs, lengths, state, block_size=cfg.phase2.block_size,
                                    training=True, unroll=1, remat=cfg.phase2.remat,
                                    write_logits=write_targets is not None)
        logits = out[0]
        if write_targets is not None:
            aux_terms = cfg.phase2.write_gate_loss * write_gate_loss(
                out[2], write_targets[:, :-1].astype(jnp.float32))
        if cfg.phase2.distill:
            aux_terms += cfg.phase2.distill * self_distillation(model, inputs, logits)
    else:
        logits, _ = model(inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if span is None:
        return nll.mean() + aux_terms
    weights = span_weights(tokens, span)
    loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0) + aux_terms
    if cfg.data.plain_text_loss:
        plain = jnp.broadcast_to(~start_ends(tokens, span).any(axis=1, keepdims=True),
                                 nll.shape).astype(jnp.float32)
        loss += (cfg.data.plain_text_loss * jnp.sum(nll * plain)
                 / jnp.maximum(jnp.sum(plain), 1.0))
    return loss


def _cast_loss(cfg: TrainConfig, graphdef: Any, params: Any, tokens: jax.Array,
               key: jax.Array | None = None, span: LossSpan | None = None,
               write_targets: jax.Array | None = None) -> jax.Array:
    """The loss with the float32 master weights cast to ``compute_dtype`` (their
    gradients flow back through the cast in float32)."""
    compute = jnp.dtype(cfg.optim.compute_dtype)

    def cast(path, a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        # Frozen weights are constants of the loss: no weight-gradient matmuls are
        # traced for them, and their zero gradients leave the clipping norm alone.
        if _group_at(path, cfg.optim.trainable) == "frozen":
            a = jax.lax.stop_gradient(a)
        return a.astype(compute)

    return loss_fn(cfg, nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, params)),
                   tokens, key, span, write_targets)


def make_train_step(cfg: TrainConfig, graphdef: Any, tx: optax.GradientTransformation,
                    span: LossSpan | None = None) -> Callable:
    """``step(params, opt_state, tokens, key, write_targets=None) -> (params,
    opt_state, loss, grad_norm)``, compiled; one microbatch (an optimizer update
    every ``grad_accum`` calls); ``key`` draws phase 2's active bank sizes;
    ``write_targets`` are the phase 2 write-gate targets (:func:`loss_fn`)."""
    loss_of = functools.partial(_cast_loss, cfg, graphdef, span=span)

    @jax.jit
    def step(params, opt_state, tokens, key, write_targets=None):
        loss, grads = jax.value_and_grad(loss_of)(params, tokens, key,
                                                  write_targets=write_targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return step


def make_eval_loss(cfg: TrainConfig, graphdef: Any) -> Callable:
    """``loss(params, tokens)`` compiled, no gradient (held-out loss)."""

    return jax.jit(functools.partial(_cast_loss, cfg, graphdef))


def trainable_count(cfg: TrainConfig, params: Any) -> int:
    """Parameters the optimizer updates."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return int(sum(np.prod(leaf.shape) for path, leaf in flat
                   if _group_at(path, cfg.optim.trainable)
                   != "frozen"))


def param_dtype(model: nnx.Module) -> Any:
    """The dtype of the model's weights (its states are made in it too)."""
    return jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype


def rebuilt(model: CausalLM, spec: AttentionSpec) -> CausalLM:
    """``model``'s weights in a model whose attention is built from ``spec``
    (weights the new attention lacks are dropped; new ones are initialised)."""
    dtype = param_dtype(model)
    twin = CausalLM(model.cfg, attention=spec, reference_compat=model.reference_compat,
                    param_dtype=dtype, rngs=nnx.Rngs(0))
    copy_matching_params(model, twin)
    return twin


def unbounded_twin(model: CausalLM) -> CausalLM:
    """The same weights with unbounded attention (kind ``coda``) for a bounded model;
    the model itself otherwise."""
    if model.attention != "coda_bounded":
        return model
    return rebuilt(model, dataclasses.replace(model.spec, kind="coda", bank=None))


def with_bank(model: CausalLM, **changes: Any) -> CausalLM:
    """A bounded model's weights under another bank configuration (for example
    ``collect_metrics=True``, or fewer landmarks)."""
    model.require_bounded()
    for which in ("exact", "summary"):  # a new size resets the range derived from the old
        if f"num_landmarks_{which}" in changes:
            changes.setdefault(f"min_landmarks_{which}", None)
            changes.setdefault(f"max_landmarks_{which}", None)
    bank = dataclasses.replace(model.spec.bank, **changes)
    return rebuilt(model, dataclasses.replace(model.spec, bank=bank))
