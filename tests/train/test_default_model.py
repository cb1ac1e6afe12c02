"""The default model's retention task and recipe: the facts' content marks, the
write-gate targets they become in phase 2, their loss, and the recipe end to end
at CPU size."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from text_corpus import text_corpus

from coda_jax import CausalLM, DecoderConfig, load_model
from convert.model_export import load_export
from train import data, default_model, retention
from train.config import TrainConfig
from train.steps import write_gate_loss


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("default_model"))


@pytest.fixture(scope="module")
def tok(built):
    return data.load_tokenizer(built / "tokenizer.json")


def _facts(count: int, seed: int) -> list[retention.Fact]:
    return retention.draw_facts(np.random.default_rng(seed), retention.load_pools("train"),
                                count)


def test_marks_cover_the_name_the_value_and_the_full_stop(tok):
    for fact in _facts(12, seed=3):
        ids, marks = retention.sentence_tokens(tok, fact)
        assert ids.tolist() == tok.encode(fact.sentence).ids and marks.shape == ids.shape
        marked = tok.decode(ids[marks == 1].tolist())
        unmarked = tok.decode(ids[marks == 0].tolist())
        assert fact.value.replace(" ", "") in marked.replace(" ", "")
        assert fact.name.split()[-1] in marked and marked.rstrip().endswith(".")
        # The template's own words ("lives in", "access code of", ...) are not marked.
        template = retention.FACTS[fact.kind][0].format(name="", value="")
        longest = max(template.replace(".", " ").split(), key=len)
        assert longest in unmarked


def test_documents_and_sequences_keep_marks_aligned(tok, built):
    filler = data.read_tokens(built / "train")
    rng = np.random.default_rng(0)
    facts = _facts(3, seed=5)
    ids, marks = retention.document_tokens(tok, filler, facts, 300, rng)
    assert ids.shape == marks.shape == (300,)
    expected = [retention.sentence_tokens(tok, f) for f in facts]
    assert int(marks.sum()) == sum(int(m.sum()) for _, m in expected)
    for sentence, _ in expected:  # each sentence is in the document, where its marks are
        n = len(sentence)
        hits = [i for i in range(300 - n + 1) if ids[i:i + n].tolist() == sentence.tolist()]
        assert hits and marks[hits[0]:hits[0] + n].sum() > 0
    rows = list(retention.training_sequences(tok, filler, seq_len=255, count=4, max_facts=2,
                                             seed=1))
    for seq, seq_marks in rows:
        assert seq.shape == seq_marks.shape == (256,)
        answer = seq.tolist().index(tok.encode("\nAnswer:").ids[-1])
        assert seq_marks[answer:].sum() == 0  # nothing marked in the questions


def test_targets_travel_with_their_tokens_through_packing(tok, built, tmp_path):
    filler = data.read_tokens(built / "train")
    rows = list(retention.training_sequences(tok, filler, seq_len=255, count=6, max_facts=2,
                                             seed=2))
    shards, marks = retention.write_training_shards(rows, tmp_path / "p2", meta={})
    tokens, targets = data.read_tokens(shards), data.read_tokens(marks)
    batches = data.PackedBatches(tokens, seq_len=255, batch_size=3, seed=9, targets=targets)
    by_tokens = {seq.tobytes(): m for seq, m in
                 ((np.asarray(s, np.int32), m) for s, m in rows)}
    for position in (0, 3, 6):
        batch, _ = batches.batch(position)
        target = batches.target_batch(position)
        assert target.dtype == np.float32 and target.shape == batch.shape
        for seq, t in zip(batch, target):
            np.testing.assert_array_equal(t, by_tokens[seq.tobytes()])
    with pytest.raises(ValueError, match="align"):
        data.PackedBatches(tokens, seq_len=255, batch_size=3, seed=9, targets=targets[:-1])
    with pytest.raises(ValueError, match="no per-token targets"):
        data.PackedBatches(tokens, seq_len=255, batch_size=3, seed=9).target_batch(0)


def test_write_gate_loss_is_balanced_cross_entropy():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (3, 2, 50))
    targets = (jax.random.uniform(jax.random.key(1), (2, 50)) < 0.1).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, jnp.broadcast_to(targets, logits.shape))
    pos = np.broadcast_to(np.asarray(targets, bool), logits.shape)
    expected = float(np.asarray(bce)[pos].mean() + np.asarray(bce)[~pos].mean())
    assert float(write_gate_loss(logits, targets)) == pytest.approx(expected, rel=1e-5)
    right = jnp.where(targets > 0, 8.0, -8.0)[None]
    assert float(write_gate_loss(right, targets)) < 1e-2 < float(write_gate_loss(-right, targets))
    # No marked token at all: the marked half is empty, not NaN.
    assert np.isfinite(float(write_gate_loss(logits, jnp.zeros((2, 50)))))


def _phase2(**changes) -> dict:
    cfg = {"stage": "phase2", "model": {"vocab_size": 64, "hidden_size": 32,
                                        "intermediate_size": 64, "num_layers": 2,
                                        "num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
           "attention": {"kind": "coda_bounded"},
           "data": {"train": "x", "seq_len": 64, "write_targets": "marks"},
           "phase2": {"block_size": 32, "write_gate_loss": 1.0}}
    for key, value in changes.items():
        section, _, field = key.partition(".")
        cfg[section] = cfg[section] | {field: value} if field else value
    return cfg


@pytest.mark.parametrize("changes, message", [
    ({"phase2.write_gate_loss": -1.0}, "must be a number >= 0"),
    ({"phase2.write_gate_loss": "much"}, "must be a float"),
    ({"phase2.write_gate_loss": float("nan")}, "must be a number >= 0"),
    ({"data.write_targets": ""}, "go together"),
    ({"phase2.write_gate_loss": 0.0}, "go together"),
    ({"stage": "phase1", "attention": {"kind": "coda"}}, "go together"),
])
def test_write_gate_settings_are_checked(changes, message):
    TrainConfig.from_dict(_phase2())  # the base is valid
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(_phase2(**changes))


def test_prefill_segment_returns_every_layers_write_gate_logits():
    cfg = DecoderConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16)
    model = CausalLM(cfg, attention="coda_bounded", rngs=nnx.Rngs(0), attention_options={
        "window": 32, "num_landmarks_exact": 8, "num_landmarks_summary": 8})
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 64)
    lengths = jnp.full((2,), 64, jnp.int32)
    state = model.init_state(2, mem_init="zeros")
    logits, _ = model.prefill_segment(tokens, lengths, state, block_size=32, training=False,
                                      unroll=1)
    logits2, _, gates = model.prefill_segment(tokens, lengths, state, block_size=32,
                                              training=False, unroll=1, write_logits=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
    assert gates.shape == (3, 2, 64) and gates.dtype == jnp.float32
    # The first layer's gates come from the embeddings (the layers are stacked).
    graphdef, stacked = nnx.split(model.layers)
    first = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    np.testing.assert_allclose(np.asarray(gates[0]),
                               np.asarray(first.write_gate_logit(model.embed(tokens))),
                               atol=1e-5)


def test_the_recipe_is_checked(tmp_path):
    recipe = yaml.safe_load(default_model.RECIPE.read_text())
    assert default_model.load_recipe()["stages"] == recipe["stages"]
    bad = [({"stages": []}, "non-empty list"),
           ({"stages": recipe["stages"] + recipe["stages"][:1]}, "unique name"),
           ({"stages": [dict(recipe["stages"][0], max_facts=0)]}, "max_facts"),
           ({"stages": [dict(recipe["stages"][0], config="nope.yaml")]}, "no config"),
           ({"quick_check": {"lengths": [1024]}}, "quick_check"),
           ({"stages": recipe["stages"][:1] + [{"name": "mean", "average": ["phase1_short"]}]},
            "two or more earlier"),
           ({"stages": [{"name": "mean", "average": ["a", "b"]}]}, "two or more earlier")]
    for change, message in bad:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe | change))
        with pytest.raises(ValueError, match=message):
            default_model.load_recipe(path)


def test_stage_data_splits_the_work_between_processes(built, tmp_path):
    shards, marks = default_model.stage_data(built, tmp_path / "stage", seq_len=255, count=5,
                                             max_facts=2, seed=3, workers=2)
    tokens, targets = data.read_tokens(shards), data.read_tokens(marks)
    assert tokens.shape == targets.shape == (5 * 256,) and set(np.unique(targets)) <= {0, 1}
    meta = json.loads((shards / "shards.json").read_text())["meta"]
    assert meta["workers"] == 2 and meta["sequences"] == 5


def test_the_recipe_runs_end_to_end(built, tmp_path, capsys):
    # The recipe's last three stages (two bounded ones training the write gates, then
    # their average) keep it quick; the earlier stages run the same code.
    recipe = default_model.load_recipe()
    recipe["stages"] = recipe["stages"][-3:]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    args = ["--corpus", str(built), "--out", str(out), "--tiny", "--no-progress",
            "--workers", "1", "--recipe", str(path)]
    assert default_model.main(args + ["--checks", "bounded,window_only"]) == 0
    report = json.loads((out / "retention_quick.json").read_text())
    names = ["phase2", "phase2_long"]
    assert list(report["stages"]) == names + ["average"]
    for name in names:
        assert report["stages"][name]["summary"]["step"] == 4
    # Each stage starts from the one before; the last one trains the write gates.
    inits = [report["stages"][n]["config"]["init"] for n in names]
    assert inits == [str(out / "runs" / n / "model") for n in ["base"] + names[:-1]]
    last = report["stages"][names[-1]]["config"]
    marks = Path(last["data"]["write_targets"])
    assert marks.name == names[-1] + retention.MARKS_SUFFIX
    assert data.read_tokens(marks).shape == data.read_tokens(Path(last["data"]["train"])).shape
    assert {r["cache"] for r in report["retention_quick"]} == {"bounded", "window_only"}
    # The exported model is the mean of the two, with the last one's bank.
    parts = [load_model(out / "runs" / n / "model") for n in names]
    final = load_export(out / "export")
    np.testing.assert_allclose(
        np.asarray(final.embed_tokens.embedding[...], np.float32),
        np.mean([np.asarray(p.embed_tokens.embedding[...]) for p in parts], axis=0),
        atol=1e-2)  # the export is bf16
    assert final.spec == parts[-1].spec
    card = json.loads((out / "export" / "card.json").read_text())
    assert card["database"]["prompt"] == retention.PROMPT
    assert card["attention"] == last["attention"]
    assert card["training"]["stages"]["average"] == {n: str(out / "runs" / n / "model")
                                                     for n in names}
    assert (out / "export" / "tokenizer.json").is_file()
    assert default_model.main(["--corpus", str(tmp_path / "none"), "--out", str(out)]) == 2

    # Resumed at the average from the models the stages before made: only it runs.
    resumed = tmp_path / "resumed"
    args[args.index("--out") + 1] = str(resumed)
    assert default_model.main(args + [
        "--checks", "none", "--from-stage", "average", "--base", str(out / "export"),
        "--stage-model", f"phase2={out / 'runs' / 'phase2' / 'model'}"]) == 0
    report = json.loads((resumed / "retention_quick.json").read_text())
    assert list(report["stages"]) == ["average"] and report["from_stage"] == "average"
    assert report["retention_quick"] == []
    assert set(report["stages"]["average"]["average"]) == set(names)
    assert json.loads((resumed / "export" / "card.json").read_text())["training"][
        "from_stage"] == "average"
    with pytest.raises(ValueError, match="no model"):  # phase2's model not given
        default_model.build(default_model.parse_args(args + [
            "--from-stage", "average", "--base", str(out / "export")]))
    with pytest.raises(SystemExit):  # --from-stage without the model it starts from
        default_model.main(args + ["--from-stage", names[-1]])
    with pytest.raises(SystemExit):
        default_model.main(args + ["--checks", "bounded,nope"])
    with pytest.raises(ValueError, match="stages are"):
        default_model.stages_to_run(recipe, "nope")
