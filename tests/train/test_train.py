"""Training stages on the CPU: loss falls, resume is exact, bad input fails fast."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import load_model
from train import loop, steps
from train.__main__ import main
from train.config import TrainConfig, load_config

VOCAB = 48
BANKS = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4)


def _corpus(path: Path, n: int = 6000, seed: int = 0) -> Path:
    """Tokens of a noisy cycle: learnable in a few dozen updates."""
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) * 5 + rng.integers(0, 2, n)) % VOCAB
    np.save(path, ids.astype(np.uint32))
    return path


def _config(tmp_path: Path, **sections) -> TrainConfig:
    base = dict(
        stage="pretrain", seed=0, log_every=1,
        model=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8),
        attention=dict(kind="gqa"),
        data=dict(train=str(_corpus(tmp_path / "tokens.npy")), seq_len=32),
        optim=dict(steps=24, lr=1e-2, lr_gates=1e-2, warmup_steps=2, batch_size=2,
                   grad_accum=2, trainable="all", compute_dtype="float32"),
        phase2=dict(block_size=8),
        checkpoint=dict(every=4, keep=2), mesh=dict(data=-1, fsdp=1))
    for key, value in sections.items():
        base[key] = base[key] | value if isinstance(value, dict) else value
    return TrainConfig.from_dict(base)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text()
            .splitlines()]


def _falls(losses: list[float]) -> bool:
    """The last four updates' mean loss is clearly below the first four's."""
    return np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1


def test_loss_falls_in_every_stage(tmp_path):
    base = _config(tmp_path)
    loop.run(base, tmp_path / "base", progress=False)
    assert _falls(_losses(tmp_path / "base"))
    later = dict(lr=5e-3, lr_gates=5e-3)
    phase1 = _config(tmp_path, stage="phase1", init=str(tmp_path / "base" / "model"),
                     attention=dict(kind="coda"), optim=later)
    loop.run(phase1, tmp_path / "p1", progress=False)
    record = json.loads((tmp_path / "p1" / "config.json").read_text())
    assert "layers.self_attn.q_proj.kernel" in record["weights_from"]["init"]
    assert "layers.self_attn.theta" in record["weights_from"]["new"]
    assert _falls(_losses(tmp_path / "p1"))
    # Phase 2 from the base too (the ablation's "no phase 1" arm): a phase-1 model of
    # this tiny task has little left to learn in 24 updates.
    phase2 = _config(tmp_path, stage="phase2", init=str(tmp_path / "base" / "model"),
                     attention=dict(kind="coda_bounded", options=BANKS), optim=later)
    loop.run(phase2, tmp_path / "p2", progress=False)
    assert _falls(_losses(tmp_path / "p2"))
    record = json.loads(Path(tmp_path / "p2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(record)


def test_a_stopped_and_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    cfg = _config(tmp_path, optim=dict(steps=10))
    loop.run(cfg, tmp_path / "whole", progress=False)
    first = loop.run(cfg, tmp_path / "split", progress=False, stop_after=6)
    assert first["step"] == 6 and first["model"] is None
    last = loop.run(cfg, tmp_path / "split", progress=False)  # resumes from 6 to 10
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    # Run again once finished: nothing trains, the summary keeps the last loss.
    again = loop.run(cfg, tmp_path / "split", progress=False)
    assert again["step"] == 10 and again["loss"] == last["loss"] == _losses(tmp_path / "whole")[-1]
    a = nnx.state(load_model(tmp_path / "whole" / "model"))
    b = nnx.state(load_model(tmp_path / "split" / "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_phase2_gradients_reach_the_write_gate_and_summary_eta(tmp_path):
    cfg = _config(tmp_path, stage="phase2", attention=dict(kind="coda_bounded",
                                                           options=BANKS))
    model, _ = steps.build_model(cfg)
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, VOCAB)
    # Compiled as a whole (as the training step is), not op by op.
    grads = jax.jit(jax.grad(lambda p: steps.loss_fn(cfg, nnx.merge(graphdef, p), tokens)))(
        params)
    attn = grads["layers"]["self_attn"]
    for name in ("write_proj", "summary_eta_logit"):
        leaves = jax.tree.leaves(attn[name])
        assert any(float(jnp.abs(g).max()) > 0 for g in leaves), name
    # With evictions detached, no gradient reaches the summary bank's learning rate.
    detached = _config(tmp_path, stage="phase2", attention=dict(kind="coda_bounded",
                                                                options=BANKS),
                       phase2=dict(detach_evicted=True))
    model, _ = steps.build_model(detached)
    graphdef, params = nnx.split(model)
    grads = jax.jit(jax.grad(lambda p: steps.loss_fn(detached, nnx.merge(graphdef, p),
                                                     tokens)))(params)
    assert float(jnp.abs(grads["layers"]["self_attn"]["write_proj"]["kernel"][...]).max()) == 0


def test_frozen_weights_get_no_weight_gradient_matmuls(tmp_path):
    """Training the attention only must not compute (and clip by) gradients of the
    frozen weights: fewer matmuls than training everything, and zero gradients."""
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, VOCAB)

    def grads_and_dots(trainable):
        cfg = _config(tmp_path, stage="phase1", attention=dict(kind="coda"),
                      optim=dict(trainable=trainable))
        model, _ = steps.build_model(cfg)
        graphdef, params = nnx.split(model)
        loss = lambda p: steps.make_eval_loss(cfg, graphdef)(p, tokens)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        return jax.grad(loss)(params), jaxpr.count("dot_general")

    attention_grads, attention_dots = grads_and_dots("attention")
    mlp_grads, mlp_dots = grads_and_dots("attention_mlp")
    _, all_dots = grads_and_dots("all")
    assert attention_dots < mlp_dots < all_dots
    for name in ("embed_tokens", "lm_head", "norm"):
        for grads in (attention_grads, mlp_grads):
            assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[name]))
    assert float(jnp.abs(attention_grads["layers"]["mlp"]["up_proj"]["kernel"][...]).max()) == 0
    for proj in ("gate_proj", "up_proj", "down_proj"):  # attention_mlp: the MLPs train too
        assert float(jnp.abs(mlp_grads["layers"]["mlp"][proj]["kernel"][...]).max()) > 0
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert float(jnp.abs(mlp_grads["layers"][norm]["weight"][...]).max()) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_compute_reaches_every_layer_in_bf16(tmp_path, monkeypatch, tied):
    """float32 master weights cast to bf16 must run the layers in bf16 (an embedding
    promoted back to float32 once sent every attention call to float32 kernels)."""
    import coda_jax.projections as projections

    seen = []
    real = projections.differential_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, kwargs["q_noise"].dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(projections, "differential_attention", spy)
    cfg = _config(tmp_path, stage="phase1", attention=dict(kind="coda"),
                  optim=dict(compute_dtype="bfloat16"))
    model, _ = steps.build_model(cfg)
    graphdef, params = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    if tied:
        model.lm_head = None
    logits, _ = model(jnp.zeros((1, 8), jnp.int32))
    assert seen and all(d == jnp.bfloat16 for row in seen for d in row), seen
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_the_attention_mask_trains_only_attention(tmp_path):
    cfg = _config(tmp_path, stage="phase1", attention=dict(kind="coda"),
                  optim=dict(trainable="attention", steps=2, grad_accum=1))
    model, _ = steps.build_model(cfg)
    graphdef, params = nnx.split(model)
    tx = steps.make_optimizer(cfg, params)
    step = steps.make_train_step(cfg, graphdef, tx)
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, VOCAB)
    key = jax.random.key(0)
    new, opt_state, _, _ = step(params, tx.init(params), tokens, key)  # warmup: lr 0 first
    new, _, _, _ = step(new, opt_state, tokens, key)
    np.testing.assert_array_equal(np.asarray(new["embed_tokens"]["embedding"][...]),
                                  np.asarray(params["embed_tokens"]["embedding"][...]))
    assert not np.array_equal(np.asarray(new["layers"]["self_attn"]["q_proj"]["kernel"][...]),
                              np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][...]))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_configs_and_paths_fail_before_any_compute(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("stage: pretrain\noptim:\n  lrr: 1\n")
    assert main([str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r")]) == 3
    assert "unknown config field(s) ['optim.lrr']" in capsys.readouterr().err
    assert main([str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "ok.yaml").write_text("data:\n  train: nowhere/tokens.npy\n")
    assert main([str(tmp_path / "ok.yaml"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main([str(tmp_path / "ok.yaml"), "--out", str(tmp_path / "r"),
                 "--set", "optim.steps=-1"]) == 3
    assert "optim.steps must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="must be a multiple of phase2.block_size"):
        _config(tmp_path, stage="phase2", attention=dict(kind="coda_bounded"),
                data=dict(seq_len=30))


def test_a_corpus_outside_the_vocabulary_is_refused(tmp_path):
    np.save(tmp_path / "big.npy", np.array([1, 2, VOCAB + 5] * 100, np.uint32))
    cfg = _config(tmp_path, data=dict(train=str(tmp_path / "big.npy")))
    with pytest.raises(ValueError, match=f"token id {VOCAB + 5}, outside the model's vocab"):
        loop.run(cfg, tmp_path / "r", progress=False)


def test_resuming_a_run_of_another_config_is_refused_and_changes_nothing(tmp_path):
    loop.run(_config(tmp_path, optim=dict(steps=4)), tmp_path / "r", progress=False)
    before = _snapshot(tmp_path / "r")
    with pytest.raises(ValueError, match=r"another config \(differs in \['optim.lr'\]\)"):
        loop.run(_config(tmp_path, optim=dict(steps=4, lr=0.5)), tmp_path / "r",
                 progress=False)
    assert _snapshot(tmp_path / "r") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no training run"):
        loop.run(_config(tmp_path), tmp_path / "mine", progress=False)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = steps.make_train_step
    calls = {"n": 0}

    def poisoned(cfg, graphdef, tx, span=None):
        step = real(cfg, graphdef, tx, span)

        def wrapped(params, opt_state, tokens, key, write_targets=None):
            calls["n"] += 1
            out = step(params, opt_state, tokens, key, write_targets)
            return out if calls["n"] < 11 else (out[0], out[1], jnp.float32(jnp.nan), out[3])
        return wrapped

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    cfg = _config(tmp_path, optim=dict(steps=10))
    with pytest.raises(loop.NonFiniteLoss, match="last good checkpoint \\(update 4\\)"):
        loop.run(cfg, tmp_path / "r", progress=False)
    monkeypatch.undo()
    loop.run(cfg, tmp_path / "r", progress=False)  # resumes from update 4
    assert [json.loads(x)["step"] for x in
            (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_restorable(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    cfg = _config(tmp_path, optim=dict(steps=8))
    real_save = ocp.CheckpointManager.save

    def crash_at_8(self, step, *args, **kwargs):
        if step == 8:
            raise OSError("killed mid-save (simulated)")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", crash_at_8)
    with pytest.raises(OSError, match="simulated"):
        loop.run(cfg, tmp_path / "r", progress=False)
    monkeypatch.undo()
    loop.run(cfg, tmp_path / "r", progress=False)
    whole = _config(tmp_path, optim=dict(steps=8))
    loop.run(whole, tmp_path / "w", progress=False)
    assert _losses(tmp_path / "r") == _losses(tmp_path / "w")


def test_the_tiny_config_is_valid():
    cfg = load_config(Path(__file__).parents[2] / "train" / "configs" / "tiny.yaml")
    assert cfg.stage == "pretrain" and cfg.optim.steps > 0


def test_four_devices_give_the_losses_of_one(tmp_path):
    """The same run on a 2 x 2 (data, fsdp) mesh of forced CPU devices (a process of
    its own: the device count is fixed when JAX starts) and on one device (this
    process, which conftest.py starts with one CPU device, as the run was)."""
    import os
    import subprocess
    import sys

    script = f"""
import json, sys
sys.path[:0] = {[str(Path(__file__).parents[1]), str(Path(__file__).parent)]!r}
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from pathlib import Path
import test_train as t
from train import loop
mesh = dict(data=int(sys.argv[1]), fsdp=int(sys.argv[2]))
cfg = t._config(Path(sys.argv[3]), optim=dict(steps=3, batch_size=4, grad_accum=1), mesh=mesh)
loop.run(cfg, Path(sys.argv[3]) / "run", progress=False)
print(json.dumps(t._losses(Path(sys.argv[3]) / "run")), len(jax.devices()))
"""
    runs = {}
    out = tmp_path / "d4"
    out.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", script, "2", "2", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    losses, count = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert int(count) == 4
    runs[4] = json.loads(losses)
    assert len(jax.devices()) == 1 and jax.config.jax_default_matmul_precision == "highest"
    (tmp_path / "d1").mkdir()
    cfg = _config(tmp_path / "d1", optim=dict(steps=3, batch_size=4, grad_accum=1),
                  mesh=dict(data=1, fsdp=1))
    loop.run(cfg, tmp_path / "d1" / "run", progress=False)
    runs[1] = _losses(tmp_path / "d1" / "run")
    np.testing.assert_allclose(runs[4], runs[1], rtol=1e-5)


def test_exported_adapters_load_into_the_reference_and_give_our_logits(tmp_path):
    """Phase 1 from a HF Llama: the run's coda_adapters.pt, loaded with strict=True into
    the reference's own swap of that Llama, gives the trained model's logits."""
    import coda_gqa_l
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from coda_jax import save_model
    from convert import load_hf_model

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB))
    hf.save_pretrained(tmp_path / "hf")
    save_model(tmp_path / "base", load_hf_model(tmp_path / "hf", dtype=jnp.float32,
                                                progress=False))
    cfg = _config(tmp_path, stage="phase1", init=str(tmp_path / "base"),
                  attention=dict(kind="coda"),
                  optim=dict(steps=3, grad_accum=1, trainable="attention"))
    summary = loop.run(cfg, tmp_path / "p1", progress=False)
    original_q = hf.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapters = coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers(hf, bounded=False)
    saved = torch.load(summary["adapters"], weights_only=True)
    assert not torch.equal(saved["layer_0"]["coda.q_proj.weight"], original_q)  # trained
    for i, adapter in enumerate(adapters):
        adapter.load_state_dict(saved[f"layer_{i}"], strict=True)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf.eval()(tokens, use_cache=False).logits.numpy()
    got, _ = load_model(tmp_path / "p1" / "model")(jnp.asarray(tokens.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_phase2_draws_active_bank_sizes_when_expansion_is_configured(tmp_path):
    options = BANKS | dict(min_landmarks_exact=1, min_landmarks_summary=2)
    cfg = _config(tmp_path, stage="phase2", attention=dict(kind="coda_bounded", options=options))
    model, _ = steps.build_model(cfg)
    state = model.init_state(64, mem_init="zeros")
    drawn = steps.random_active_sizes(state, model.spec.bank, jax.random.key(3))
    assert set(np.unique(np.asarray(drawn.active_exact)).tolist()) == {1, 2, 3, 4}
    assert set(np.unique(np.asarray(drawn.active_summary)).tolist()) == {2, 3, 4}
    fixed = steps.random_active_sizes(state, steps.build_model(_config(
        tmp_path, stage="phase2", attention=dict(kind="coda_bounded", options=BANKS)))[0]
        .spec.bank, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(fixed.active_exact), np.asarray(state.active_exact))


def test_the_loss_can_count_answer_spans_only(tmp_path):
    """With data.loss_start the loss covers only what follows the marker up to and
    including the next stop token."""
    span = steps.LossSpan(start=(7, 8), stop=(9,))
    tokens = jnp.array([[1, 7, 8, 4, 5, 9, 3, 7, 8, 6, 9, 2]])
    weights = steps.span_weights(tokens, span)
    # targets are tokens[1:]: 4 5 9 (after the first 7 8) and 6 9 (after the second)
    np.testing.assert_array_equal(np.asarray(weights[0]),
                                  [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0])
    cfg = _config(tmp_path, stage="pretrain")
    model, _ = steps.build_model(cfg)
    graphdef, params = nnx.split(model)
    batch = jax.random.randint(jax.random.key(2), (2, 33), 10, VOCAB)  # no 7, 8 or 9
    batch = batch.at[:, 10:12].set(jnp.array([7, 8])).at[:, 15].set(9)
    only = steps.loss_fn(cfg, nnx.merge(graphdef, params), batch, span=span)
    logits, _ = nnx.merge(graphdef, params)(batch[:, :-1])
    import optax
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    np.testing.assert_allclose(float(only), float(nll[:, 11:15].mean()), rtol=1e-5)


def test_phase2_self_distillation_is_the_kl_past_the_window_and_trains_the_attention(tmp_path):
    """phase2.distill: the KL divergence from the same weights' full-attention
    predictions to the bounded ones, averaged over the positions past the window
    (checked against numpy on the two models' logits), added to the loss with its
    weight; its gradient reaches the attention."""
    tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, VOCAB)
    inputs = tokens[:, :-1]

    def built(distill):
        cfg = _config(tmp_path, stage="phase2", attention=dict(kind="coda_bounded",
                                                               options=BANKS),
                      phase2=dict(distill=distill))
        model, _ = steps.build_model(cfg)
        return cfg, *nnx.split(model)

    cfg, graphdef, params = built(0.5)
    model = nnx.merge(graphdef, params)
    bounded = _bounded_logits(cfg, model, inputs)
    full = steps.unbounded_twin(model).forward_logits(inputs)
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(full), log_softmax(bounded)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)           # (B, L)
    past = np.arange(inputs.shape[1]) >= BANKS["window"]
    assert np.all(np.abs(kl[:, ~past]) < 1e-5)  # the window holds every earlier token
    expected = kl[:, past].mean()
    assert expected > 1e-4
    term = float(jax.jit(steps.self_distillation)(model, inputs, bounded))
    assert term == pytest.approx(expected, rel=1e-4)

    loss = lambda c, g: jax.jit(lambda p: steps.loss_fn(c, nnx.merge(g, p), tokens))  # noqa: E731
    cfg0, graphdef0, _ = built(0.0)
    assert float(loss(cfg, graphdef)(params)) == pytest.approx(
        float(loss(cfg0, graphdef0)(params)) + 0.5 * expected, rel=1e-4)
    # The term's own gradient reaches the attention through the bounded logits.
    def term_of(p):
        m = nnx.merge(graphdef, p)
        return steps.self_distillation(m, inputs, _bounded_logits(cfg, m, inputs))

    q = jax.jit(jax.grad(term_of))(params)["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert float(jnp.abs(q).max()) > 0
    with pytest.raises(ValueError, match="phase2.distill teaches"):
        _config(tmp_path, stage="phase1", attention=dict(kind="coda"), phase2=dict(distill=1.0))
    with pytest.raises(ValueError, match="phase2.distill must be a number"):
        _config(tmp_path, stage="phase2", attention=dict(kind="coda_bounded", options=BANKS),
                phase2=dict(distill=-1.0))


def _bounded_logits(cfg, model, inputs):
    """The bounded model's logits as loss_fn computes them in phase 2."""
    return _bounded_logits_jit(model, inputs, block_size=cfg.phase2.block_size)


@functools.partial(jax.jit, static_argnames="block_size")
def _bounded_logits_jit(model, inputs, *, block_size):
    state = model.init_state(inputs.shape[0], jnp.float32, mem_init="zeros")
    lengths = jnp.full((inputs.shape[0],), inputs.shape[1], jnp.int32)
    return model.prefill_segment(inputs, lengths, state, block_size=block_size,
                                 training=True, unroll=1)[0]
