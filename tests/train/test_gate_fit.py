"""Write gates fitted to content marks before phase 2 (train/gate_fit.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from coda_jax import AttentionSpec, CausalLM, DecoderConfig
from train import gate_fit, loop
from train.config import TrainConfig

VOCAB, MARKED = 40, (3, 17)  # these token ids are the "facts" wherever they occur


def _bounded(seed: int = 0) -> CausalLM:
    cfg = DecoderConfig(family="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    spec = AttentionSpec.from_options("coda_bounded", dict(
        window=8, num_landmarks_exact=4, num_landmarks_summary=4))
    return CausalLM(cfg, attention=spec, rngs=nnx.Rngs(seed))


def _marked_tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint32)
    return tokens, np.isin(tokens, MARKED).astype(np.uint8)


def test_the_logistic_fit_separates_what_a_direction_separates():
    rng = np.random.default_rng(0)
    layers, n, dim = 3, 600, 16
    direction = rng.normal(size=(layers, dim))
    x = rng.normal(size=(layers, n, dim)).astype(np.float32)
    y = (rng.random(n) < 0.1).astype(np.float32)  # 10% marked: the balance matters
    x += 4.0 * (y[None, :, None] - 0.5) * direction[:, None, :] / np.linalg.norm(
        direction, axis=-1)[:, None, None]
    kernel, bias = gate_fit.fit_balanced_logistic(x, y, np.zeros((layers, dim)),
                                                  np.full(layers, -2.0))
    rates = gate_fit.gate_rates(x, y, kernel, bias, 0.5)
    assert min(rates["recall"]) > 0.9 and max(rates["false_positives"]) < 0.1
    start = gate_fit.gate_rates(x, y, np.zeros((layers, dim)), np.full(layers, -2.0), 0.5)
    assert max(start["recall"]) == 0  # sigmoid(-2) = 0.12: nothing passes at first


def test_the_cap_lowers_each_bias_until_few_unmarked_tokens_pass():
    rng = np.random.default_rng(1)
    layers, n, dim = 2, 4000, 8
    x = rng.normal(size=(layers, n, dim)).astype(np.float32)
    y = (rng.random(n) < 0.05).astype(np.float32)
    x[..., 0] += 1.5 * y  # overlapping classes: a balanced fit lets many unmarked pass
    kernel, bias = gate_fit.fit_balanced_logistic(x, y, np.zeros((layers, dim)),
                                                  np.full(layers, -2.0))
    balanced = gate_fit.gate_rates(x, y, kernel, bias, 0.5)
    assert min(balanced["false_positives"]) > 0.1
    capped = gate_fit.cap_false_positives(x, y, kernel, bias, 0.5, 0.02)
    rates = gate_fit.gate_rates(x, y, kernel, capped, 0.5)
    assert max(rates["false_positives"]) <= 0.02 and min(rates["false_positives"]) > 0.015
    assert (capped < bias).all() and min(rates["recall"]) > 0.02
    # A layer already under the cap is left alone.
    assert np.array_equal(gate_fit.cap_false_positives(x, y, kernel, capped, 0.5, 0.5), capped)
    with pytest.raises(ValueError, match=r"threshold in \(0, 1\)"):
        gate_fit.cap_false_positives(x, y, kernel, bias, 0.0, 0.02)


def test_fitted_gates_pass_the_marked_tokens_of_sequences_never_seen():
    model = _bounded()
    tokens, marks = _marked_tokens(33 * 32, seed=1)  # some sequences hold no mark
    report = gate_fit.fit_write_gates(model, tokens, marks, seq_len=32, count=16,
                                      block_size=8, seed=0)
    assert report["sequences"] == 16 and report["held_out"] == 4
    # The first layer reads the embeddings alone, where the marked ids are separable
    # exactly; the second reads them mixed with their context by the first.
    assert report["after"]["recall"][0] == 1 and report["after"]["false_positives"][0] == 0
    assert min(report["after"]["recall"]) >= 0.8
    assert max(report["after"]["false_positives"]) < 0.1
    assert report["before"] != report["after"]  # measured on the same held-out rows
    # The model itself now carries the gates: on a fresh sequence its gate logits
    # are positive on the marked ids and negative elsewhere.
    fresh, fresh_marks = _marked_tokens(32, seed=7)
    x = gate_fit.layer_inputs(model, fresh, np.arange(32), block_size=8)
    proj = model.layers.self_attn.write_proj
    logits = np.einsum("lnd,ld->ln", x, np.asarray(proj.kernel[...])[..., 0]) \
        + np.asarray(proj.bias[...])
    assert ((logits > 0) == fresh_marks.astype(bool)[None]).mean() > 0.9


def test_too_few_marked_sequences_are_refused():
    tokens, _ = _marked_tokens(33 * 4, seed=2)
    marks = np.zeros_like(tokens, dtype=np.uint8)
    marks[5] = 1  # one marked sequence
    with pytest.raises(ValueError, match="at least 2 sequences with marks"):
        gate_fit.fit_write_gates(_bounded(), tokens, marks, seq_len=32, count=4,
                                 block_size=8, seed=0)


def _phase2_config(tmp_path, **phase2) -> TrainConfig:
    tokens, marks = _marked_tokens(33 * 24, seed=3)
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "marks.npy", marks)
    return TrainConfig.from_dict(dict(
        stage="phase2", seed=0, log_every=1,
        model=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8),
        attention=dict(kind="coda_bounded", options=dict(
            window=8, num_landmarks_exact=4, num_landmarks_summary=4)),
        data=dict(train=str(tmp_path / "tokens.npy"), write_targets=str(tmp_path / "marks.npy"),
                  seq_len=32),
        optim=dict(steps=2, lr=1e-3, lr_gates=1e-3, warmup_steps=1, batch_size=2,
                   trainable="attention", compute_dtype="float32"),
        phase2=dict(block_size=8, write_gate_loss=1.0) | phase2,
        checkpoint=dict(every=2, keep=1)))


def test_a_phase2_run_fits_its_gates_first_and_records_it(tmp_path):
    run_dir = tmp_path / "run"
    loop.run(_phase2_config(tmp_path, fit_write_gates=8, fit_write_gates_false_positives=0.05),
             run_dir, progress=False)
    fitted = json.loads((run_dir / "gate_fit.json").read_text())
    assert fitted["sequences"] == 8 and min(fitted["after"]["recall"]) > 0.8
    assert fitted["max_false_positives"] == 0.05


def test_fit_write_gates_needs_phase2_write_targets(tmp_path):
    cfg = _phase2_config(tmp_path).to_dict()
    cfg["phase2"]["fit_write_gates"] = 4
    cfg["phase2"]["write_gate_loss"] = 0.0
    cfg["data"]["write_targets"] = ""
    with pytest.raises(ValueError, match="fit_write_gates"):
        TrainConfig.from_dict(cfg)
    cfg = _phase2_config(tmp_path).to_dict()
    cfg["phase2"]["fit_write_gates"] = -1
    with pytest.raises(ValueError, match="integer >= 0"):
        TrainConfig.from_dict(cfg)
    cfg["phase2"]["fit_write_gates"] = 0
    cfg["phase2"]["fit_write_gates_false_positives"] = 0.01
    with pytest.raises(ValueError, match="needs phase2.fit_write_gates"):
        TrainConfig.from_dict(cfg)
    cfg["phase2"]["fit_write_gates"] = 4
    cfg["phase2"]["fit_write_gates_false_positives"] = 1.5
    with pytest.raises(ValueError, match=r"share in \[0, 1\)"):
        TrainConfig.from_dict(cfg)
