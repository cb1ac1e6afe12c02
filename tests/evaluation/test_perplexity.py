"""python -m train.evaluation perplexity: unbounded and bounded perplexity of a saved
bounded model, and the command's exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from coda_jax import CausalLM, DecoderConfig, load_model, save_model
from train.evaluation import perplexity as evaluation
from train.steps import unbounded_twin

VOCAB = 48
BANKS = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny bounded model with random weights and 6,000 tokens of held-out data."""
    root = tmp_path_factory.mktemp("ppl")
    cfg = DecoderConfig(family="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    model = CausalLM(cfg, attention="coda_bounded", attention_options=BANKS, rngs=nnx.Rngs(0))
    save_model(root / "model", model)
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", ((np.arange(6000) * 5 + rng.integers(0, 2, 6000)) % VOCAB
                                  ).astype(np.uint32))
    return root


def _main(root, extra):
    return evaluation.main([str(root / "model"), "--data", str(root / "tokens.npy"), *extra])


def test_evaluation_unbounded_and_bounded(saved, capsys):
    model = load_model(saved / "model")
    tokens = np.load(saved / "tokens.npy")
    twin = unbounded_twin(model)
    assert twin.attention == "coda"
    np.testing.assert_array_equal(np.asarray(twin.layers.self_attn.theta[...]),
                                  np.asarray(model.layers.self_attn.theta[...]))
    # A context inside the window: bounded equals unbounded (nothing is evicted yet).
    short = [evaluation.score_perplexity(model, tokens, context=8, bounded=b, block_size=8,
                                         max_sequences=4) for b in (False, True)]
    assert abs(short[0]["nll"] - short[1]["nll"]) < 1e-4
    assert _main(saved, ["--contexts", "32", "--block-size", "8", "--max-sequences", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["bounded"] for r in report["results"]] == [False, True]
    assert all(np.isfinite(r["ppl"]) and r["tokens_scored"] == 4 * 31
               for r in report["results"])


def test_the_exit_codes(saved, tmp_path, capsys):
    assert _main(saved, ["--contexts", "100000"]) == 3  # longer than the held-out text
    assert "shorter than one context" in capsys.readouterr().err
    assert evaluation.main([str(tmp_path / "nowhere"), "--data",
                            str(saved / "tokens.npy")]) == 2
    with pytest.raises(SystemExit) as usage:  # --data is required
        evaluation.main([str(saved / "model")])
    assert usage.value.code == 1
