"""The bundled default model and ``coda-db demo``.

The bundled model's own tests skip while the package has no bundle (the
trained model is bundled with ``python -m train.bundle``); the bundler, the
package data, the demo and the demo documents' generator are tested on tiny
random models and corpora.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from coda_jax import CausalLM, DecoderConfig
from convert import smollm2
from coda_db import NeuralDatabase, bundled, demo
from coda_db.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_WRONG_ANSWERS, main
from coda_db.library import Library
from train import bundle, data, demo_documents
from train.retention import FACTS, load_pools

from database_fixtures import BANKS, CFG, SETTINGS, TEXT, snapshot

ROOT = Path(__file__).resolve().parents[2]
NO_BUNDLE = "this installation has no bundled default model (python -m train.bundle makes one)"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """What train.default_model writes as OUT/export, for a tiny random model."""
    from convert.model_export import export_model

    model = CausalLM(DecoderConfig(**CFG), attention="coda_bounded", attention_options=BANKS,
                     rngs=nnx.Rngs(3))
    export = export_model(model, tmp_path_factory.mktemp("export") / "export")
    data.train_tokenizer([TEXT], CFG["vocab_size"], export / "tokenizer.json")
    (export / "card.json").write_text(json.dumps({"name": "tiny", "database": SETTINGS,
                                                  "retention_quick": []}))
    return export


@pytest.fixture(scope="module")
def tiny_bundle(export_dir, tmp_path_factory) -> Path:
    return bundle.bundle(export_dir, tmp_path_factory.mktemp("bundle") / "default_model",
                         log=lambda _: None)


@pytest.fixture
def no_bundle(monkeypatch, tmp_path):
    """An installation without a bundled model, whatever this checkout holds."""
    monkeypatch.setattr(bundled, "BUNDLE_DIR", tmp_path / "no_default_model")
    monkeypatch.delenv("CODA_DB_MODEL", raising=False)


def _tiny_documents(path: Path) -> Path:
    """Three short documents in the demo's format (the tiny model answers them wrongly)."""
    docs = [{"name": f"tiny-{i}", "text": TEXT[:n],
             "questions": [{"question": "How many gulls did the keeper count?", "answer": "12"},
                           {"question": "Where did the storm come from?", "answer": "the west"}]}
            for i, n in enumerate((150, 400, 900))]
    path.write_text(json.dumps({"format": bundled.DEMO_FORMAT, "documents": docs}))
    return path


# ---------------------------------------------------------------- the bundler
def test_a_bundle_opens_as_the_export_with_its_fingerprints_and_settings(export_dir,
                                                                         tiny_bundle):
    from convert.model_export import load_export

    card = bundled.read_card(tiny_bundle)
    assert card is not None and bundled.is_bundle(tiny_bundle) and card["name"] == "tiny"
    opened = NeuralDatabase(tiny_bundle, library=tiny_bundle.parent / "lib").opened
    assert opened.model_sha256 == card["weights_sha256"]
    assert opened.tokenizer_sha256 == card["tokenizer_sha256"]
    assert opened.settings.sampling.max_new_tokens == SETTINGS["max_new_tokens"]
    assert opened.settings.block_size == SETTINGS["block_size"]
    assert str(opened.model.embed_tokens.embedding[...].dtype) == "bfloat16"
    exported = load_export(export_dir)
    for a, b in zip(*(jax_leaves(m) for m in (exported, opened.model))):
        assert np.array_equal(a, b)
    # a previous bundle is replaced (atomically); the fingerprint is the same
    again = bundle.bundle(export_dir, tiny_bundle, log=lambda _: None)
    assert bundled.read_card(again)["weights_sha256"] == card["weights_sha256"]


def _results(path: Path, weights: str) -> Path:
    """A retention study's results file in its shape (two cells), for weights ``weights``."""
    path.write_text(json.dumps({
        "device": {"kind": "cpu"}, "model": {"weights_sha256": weights},
        "config": {"lengths": [1024], "depths": [0.5], "facts": [1], "caches": ["bounded"],
                   "count": 2},
        "summaries": [{"cache": "bounded", "length": 1024, "facts": 1, "correct": 1,
                       "total": 2, "accuracy": 0.5}],
        "goals": {"one_fact_met": False}, "state_bytes": {"bounded": {"model_cache_bytes": 9}}}))
    return path


def test_a_bundle_quotes_the_retention_measured_on_its_weights(export_dir, tiny_bundle,
                                                               tmp_path):
    weights = bundled.read_card(tiny_bundle)["weights_sha256"]
    results = _results(tmp_path / "retention.json", weights)
    card = bundled.read_card(bundle.bundle(export_dir, tiny_bundle, retention=results,
                                           log=lambda _: None))
    assert card["retention"]["results"] == "retention.json"
    assert card["retention"]["summaries"][0]["accuracy"] == 0.5
    assert card["retention"]["cells"]["documents_per_cell"] == [2, 2]
    # results of other weights, or not results at all, are refused and change nothing
    before = snapshot(tiny_bundle)
    other = _results(tmp_path / "other.json", "0" * 64)
    with pytest.raises(ValueError, match="other weights"):
        bundle.bundle(export_dir, tiny_bundle, retention=other, log=lambda _: None)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a results file"):
        bundle.bundle(export_dir, tiny_bundle, retention=tmp_path / "bad.json",
                      log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="cannot read"):
        bundle.bundle(export_dir, tiny_bundle, retention=tmp_path / "none.json",
                      log=lambda _: None)
    assert snapshot(tiny_bundle) == before


def jax_leaves(model):
    import jax

    return [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(nnx.state(model,
                                                                              nnx.Param))]


def test_a_bundle_over_the_size_limit_is_refused_and_nothing_changes(export_dir, tiny_bundle,
                                                                     monkeypatch, tmp_path):
    before = snapshot(tiny_bundle)
    monkeypatch.setattr(bundle, "MAX_BUNDLE_BYTES", 10_000)
    for out in (tiny_bundle, tmp_path / "new"):
        with pytest.raises(ValueError, match="over the limit of 10,000"):
            bundle.bundle(export_dir, out, log=lambda _: None)
    assert snapshot(tiny_bundle) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging left behind


def test_refusals_name_the_problem_and_touch_nothing(export_dir, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "card.json").write_text(json.dumps({"name": "someone else's"}))
    before = snapshot(foreign)
    cases = [((str(export_dir), "--out", str(foreign)), 3, "refusing to overwrite"),
             ((str(tmp_path / "missing"), "--out", str(tmp_path / "b")), 2, "no export"),
             ((str(foreign), "--out", str(tmp_path / "b")), 3, "not an export"),
             ((str(export_dir), "--out", str(export_dir / "inside")), 3, "inside the input")]
    for argv, code, message in cases:
        assert bundle.main(list(argv)) == code, argv
        assert message in capsys.readouterr().err, argv
    assert snapshot(foreign) == before and not (tmp_path / "b").exists()


def test_the_package_data_patterns_ship_a_bundle_and_the_demo_documents(tiny_bundle, tmp_path):
    """A wheel built from the project (non-editable) holds every file of the bundle
    and both demo documents files."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "coda_db" in config["package-data"]
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name if src.exists() else _mkdir(src) / name)
    for package in ("coda_jax", "convert", "coda_db", "pallas_kernels", "train"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "default_model",
                                                      "demo_documents.json"))
    shutil.copytree(tiny_bundle, src / "coda_db" / "default_model")
    _tiny_documents(src / "coda_db" / "demo_documents.json")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"coda_db/default_model/{p.relative_to(tiny_bundle)}"
              for p in tiny_bundle.rglob("*") if p.is_file()}
    assert wanted - names == set()
    assert {"coda_db/demo_documents.json", "coda_db/demo_documents_v2.json"} <= names


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- the default model
def test_without_a_bundle_the_commands_ask_for_a_model(no_bundle, capsys, tmp_path):
    assert bundled.bundled_model_path() is None and bundled.bundled_card() is None
    doc = tmp_path / "d.txt"
    doc.write_text(TEXT[:200])
    code, _, err = _run(capsys, "demo", "--library", tmp_path / "lib")
    assert code == EXIT_NOT_FOUND and "no bundled default model" in err and "--model" in err
    code, _, err = _run(capsys, "ingest", doc, "--label", "d", "--library", tmp_path / "lib")
    assert code == 1 and "no model" in err and "no bundled default model" in err
    assert not (tmp_path / "lib").exists() or not Library(tmp_path / "lib").entries()


def test_the_bundled_model_is_the_default(tiny_bundle, model_dir, monkeypatch, tmp_path):
    from coda_db import cli

    monkeypatch.setattr(bundled, "BUNDLE_DIR", tiny_bundle)
    monkeypatch.delenv("CODA_DB_MODEL", raising=False)
    assert bundled.bundled_model_path() == tiny_bundle
    assert bundled.bundled_card()["weights_sha256"] == NeuralDatabase(
        library=tmp_path / "lib").opened.model_sha256
    assert demo.resolve_model(None) == str(tiny_bundle)
    args = cli.build_parser().parse_args(["ingest", "d.txt", "--label", "d"])
    assert cli._model_path(args) == str(tiny_bundle)
    # --model, then $CODA_DB_MODEL, then (query) the entry's model come first
    assert cli._model_path(args, recorded="/recorded") == "/recorded"
    monkeypatch.setenv("CODA_DB_MODEL", str(model_dir))
    assert cli._model_path(args, recorded="/recorded") == str(model_dir)
    assert demo.resolve_model(None) == str(model_dir)


# ---------------------------------------------------------------- coda-db demo
LINE = re.compile(r"^  (✓|✗) (.+\?)  expected: (.+)  answer: (.*)$")
SUMMARY = re.compile(r"^demo: (\d+)/(\d+) correct \| ([\d,]+) tokens read \| state "
                     r"[\d.]+ [KM]B per document, [\d.]+ [KM]B saved \| [\d.]+ s ")


def test_demo_runs_end_to_end_on_any_bounded_model(model_dir, tmp_path, capsys):
    """Ingest, save, a new process loads the states and answers; the tiny random
    model answers wrongly: the output's form and the exit code for wrong answers."""
    docs = _tiny_documents(tmp_path / "docs.json")
    lib = tmp_path / "lib"
    code, out, err = _run(capsys, "demo", "--model", model_dir, "--documents", docs,
                          "--library", lib)
    assert code == EXIT_WRONG_ANSWERS, err
    lines = out.splitlines()
    assert lines[0].startswith("model: ") and "bank 8 recent + 4 exact + 4 summary" in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "[1/3] read tiny-0", "[2/3] read tiny-1", "[3/3] read tiny-2"]
    assert "a new process loads the 3 saved states" in lines[4]
    answers = [LINE.match(line) for line in lines if line.startswith("  ")]
    assert len(answers) == 6 and all(answers), out
    assert [m.group(3) for m in answers] == ["12", "the west"] * 3
    summary = SUMMARY.match(lines[-1])
    assert summary, lines[-1]
    correct = sum(m.group(1) == "✓" for m in answers)
    assert (int(summary.group(1)), int(summary.group(2))) == (correct, 6) and correct < 6
    assert Library(lib).entries() == []  # the demo's entries are removed without --keep


def test_demo_exit_codes_and_keep(model_dir, tmp_path, capsys, monkeypatch):
    """All answers right: exit 0; --keep keeps the states (the new process faked here:
    the real one is the test above)."""
    docs = _tiny_documents(tmp_path / "docs.json")
    expected = {d["name"]: d["questions"] for d in json.loads(docs.read_text())["documents"]}
    seen = {}

    def fake(model, library, documents, labels, **_):
        seen["entries"] = sorted(e.label for e in Library(library).entries())
        return {label: [{"answer": f" {q['answer']}\n"} for q in expected[label]]
                for label in labels}

    monkeypatch.setattr(demo, "_ask_in_new_process", fake)
    code, out, _ = _run(capsys, "demo", "--model", model_dir, "--documents", docs, "--keep")
    assert code == EXIT_OK and "demo: 6/6 correct" in out
    assert seen["entries"] == ["tiny-0", "tiny-1", "tiny-2"]
    kept = Path(out.strip().splitlines()[-1].removeprefix("kept the states in "))
    assert sorted(e.label for e in Library(kept).entries()) == seen["entries"]
    shutil.rmtree(kept)
    # an entry of the same label that the demo did not make is never replaced
    lib = tmp_path / "lib"
    NeuralDatabase(model_dir, library=lib).save("tiny-0", NeuralDatabase(
        model_dir, library=lib).ingest("someone's own document"))
    before = snapshot(lib)
    code, _, err = _run(capsys, "demo", "--model", model_dir, "--documents", docs,
                        "--library", lib)
    assert code == 3 and "did not make" in err and snapshot(lib) == before


def test_the_bundled_demo_documents_are_well_formed():
    doc_set = bundled.read_demo_documents()
    docs = doc_set["documents"]
    assert len(docs) == 3 and all(2 <= len(d["questions"]) <= 4 for d in docs)
    assert [d["length"] for d in docs] == [1500, 3000, 6000]
    for d in docs:
        for q in d["questions"]:
            assert q["answer"] in d["text"] and q["question"].endswith("?")


# ---------------------------------------------------------------- demo documents
def test_demo_documents_are_built_from_held_out_filler(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ("The ferry left at dawn. Gulls followed it past the harbour wall. "
             "Nobody spoke until the island came into view.").split()
    corpus = tmp_path / "corpus"
    tok = data.train_tokenizer([" ".join(words)] * 4, 300, corpus / "tokenizer.json")
    text = " ".join(rng.choice(words, 3000))
    data.write_shards(np.asarray(tok.encode(text).ids), corpus / "heldout")
    out = tmp_path / "demo.json"
    assert demo_documents.main([str(corpus), "--out", str(out), "--lengths", "150,300,600",
                                "--facts", "2,3,4"]) == 0
    assert "wrote" in capsys.readouterr().out
    doc_set = bundled.read_demo_documents(out)
    held_out = load_pools("eval")
    for doc, length, facts in zip(doc_set["documents"], (150, 300, 600), (2, 3, 4)):
        assert abs(doc["tokens"] - length) <= 0.05 * length
        depths = [q["depth"] for q in doc["questions"]]
        assert len(depths) == facts and depths == sorted(depths)
        assert depths[0] < 0.2 and depths[-1] > 0.8
        for q in doc["questions"]:
            first, last = _person(q["question"])
            assert first in held_out["first_names"] and last in held_out["last_names"]
            assert f"{first} {last}" in doc["text"] and q["answer"] in doc["text"]
    assert {q["kind"] for d in doc_set["documents"] for q in d["questions"]} == {
        "place", "code", "number", "date"}
    # the same seed, the same documents; a file that is not ours is not overwritten
    again = tmp_path / "again.json"
    assert demo_documents.main([str(corpus), "--out", str(again), "--lengths", "150,300,600",
                                "--facts", "2,3,4"]) == 0
    assert json.loads(again.read_text())["documents"] == doc_set["documents"]
    (tmp_path / "other.json").write_text("{}")
    assert demo_documents.main([str(corpus), "--out", str(tmp_path / "other.json")]) == 3
    assert (tmp_path / "other.json").read_text() == "{}"


def _person(question: str) -> list[str]:
    """The first and last name a retention question asks about."""
    for _, template in FACTS.values():
        pattern = re.escape(template).replace(re.escape("{name}"), "(.+)")
        found = re.fullmatch(pattern, question)
        if found:
            return found.group(1).split(" ", 1)
    raise AssertionError(f"not a retention question: {question}")


# ---------------------------------------------------------------- the real bundle
@pytest.fixture(scope="module")
def real_bundle() -> Path:
    path = bundled.bundled_model_path()
    if path is None:
        pytest.skip(NO_BUNDLE)
    return path


def test_the_bundled_model_loads_and_its_fingerprints_match_its_card(real_bundle, tmp_path):
    card = bundled.bundled_card()
    opened = NeuralDatabase(library=tmp_path / "lib").opened
    assert opened.path == str(real_bundle.absolute())
    assert opened.name == f"{card['name']} (bundled)"  # a name for people, not a path
    assert opened.model.attention == "coda_bounded"
    assert opened.model_sha256 == card["weights_sha256"]
    assert opened.tokenizer_sha256 == card["tokenizer_sha256"]
    if bundled.is_adapter_bundle(real_bundle):
        # adapters over the pinned base: the card names it and the chat framing
        assert card["base"]["sha256"] == smollm2.SHA256
        assert card["database"]["document_prefix"] and card["database"]["document_suffix"]
    else:
        # the demo's documents were made with the bundled model's tokenizer
        assert bundled.read_demo_documents()["tokenizer_sha256"] == card["tokenizer_sha256"]
    # the card quotes the retention measured on these weights
    assert card["retention"]["weights_sha256"] == card["weights_sha256"]
    assert {"summaries", "goals", "state_bytes", "cells"} <= set(card["retention"])


def test_the_bundled_model_answers_after_a_save_and_a_reload_in_a_fresh_process(real_bundle,
                                                                               tmp_path):
    documents = bundled.read_demo_documents(bundled.demo_documents_for(real_bundle))
    doc = documents["documents"][0]
    # The bundled model answers 4 of the demo's 9 questions (README); the first
    # document's third question is one of them (its first two are not).
    question = doc["questions"][2]
    lib = tmp_path / "lib"
    db = NeuralDatabase(library=lib)
    db.save(doc["name"], db.ingest(doc["text"]))
    run = subprocess.run([sys.executable, "-m", "coda_db.cli", "query", doc["name"],
                          question["question"], "--library", str(lib), "--temperature", "0",
                          "--json"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout)["answer"]
    assert demo.answer_is_right(documents["format"], answer, question), (answer, question)


def test_the_package_data_stays_under_the_size_limit():
    assert bundled.package_data_bytes() < bundled.MAX_PACKAGE_BYTES
    assert bundle.MAX_BUNDLE_BYTES <= bundled.MAX_PACKAGE_BYTES
