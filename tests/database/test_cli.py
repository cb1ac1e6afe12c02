"""coda-db: exit codes, --json, streamed answers, files left untouched on errors."""

from __future__ import annotations

import json

import pytest

from coda_db.cli import main

from database_fixtures import TEXT, make_model_dir, snapshot


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ingest_list_query_info_delete(capsys, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CODA_DB_LIBRARY", str(tmp_path / "lib"))
    doc = tmp_path / "log.txt"
    doc.write_text(TEXT)
    code, out, _ = _run(capsys, "ingest", doc, "--label", "log", "--model", model_dir)
    assert code == 0 and "saved 'log'" in out
    code, out, _ = _run(capsys, "list", "--json")
    [entry] = json.loads(out)
    assert code == 0 and entry["label"] == "log" and entry["source"] == "log.txt"
    # query finds the model recorded with the entry
    code, out, _ = _run(capsys, "query", "log", "Who wrote?", "--temperature", "0", "--json")
    answer = json.loads(out)
    assert code == 0 and len(answer["tokens"]) == 6
    code, text, _ = _run(capsys, "query", "log", "Who wrote?", "--temperature", "0")
    assert code == 0 and text == answer["answer"] + "\n"
    code, out, _ = _run(capsys, "info", "log", "--json")
    info = json.loads(out)
    assert code == 0 and info["tokens"] == entry["tokens"] and info["bytes_on_disk"] > 0
    code, out, _ = _run(capsys, "info", "log")
    assert code == 0 and "fill recent" in out
    assert _run(capsys, "delete", "log")[0] == 0
    assert json.loads(_run(capsys, "list", "--json")[1]) == []


def test_exit_codes_and_messages(capsys, model_dir, tmp_path, monkeypatch):
    from coda_db import bundled

    # 'no model' cases: an installation without a bundled default model
    monkeypatch.setattr(bundled, "BUNDLE_DIR", tmp_path / "no_default_model")
    monkeypatch.delenv("CODA_DB_MODEL", raising=False)
    lib = tmp_path / "lib"
    doc = tmp_path / "log.txt"
    doc.write_text(TEXT[:300])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    common = ("--library", lib)
    assert _run(capsys, "ingest", doc, "--label", "a", "--model", model_dir, *common)[0] == 0
    before = snapshot(lib)
    gqa = make_model_dir(tmp_path / "gqa", attention="gqa")
    cases = [
        (("frobnicate",), 1, "invalid choice"),
        (("ingest", doc, *common), 1, "--label"),
        (("ingest", doc, "--label", "b", *common), 1, "no model"),
        (("ingest", tmp_path / "nope.txt", "--label", "b", "--model", model_dir, *common), 2,
         "no document"),
        (("query", "nope", "q", *common), 2, "no entry 'nope'"),
        (("info", "nope", *common), 2, "no entry"),
        (("delete", "nope", *common), 2, "no entry"),
        (("ingest", doc, "--label", "a", "--model", model_dir, *common), 3, "taken"),
        (("ingest", doc, "--label", "../a", "--model", model_dir, *common), 3, "separator"),
        (("ingest", empty, "--label", "b", "--model", model_dir, *common), 3, "empty"),
        (("ingest", doc, "--label", "b", "--model", gqa, *common), 3, "bounded"),
        (("query", "a", "q", "--top-p", "2", *common), 3, "top_p"),
        (("demo", *common), 2, "no bundled default model"),
    ]
    for argv, code, message in cases:
        got, _, err = _run(capsys, *argv)
        assert (got, message in err) == (code, True), (argv, got, err)
    assert snapshot(lib) == before


def test_a_hf_directory_without_adapters_is_refused_unless_untrained(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from train.data import train_tokenizer

    hf = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    train_tokenizer([TEXT], 320, hf / "tokenizer.json")
    doc = tmp_path / "d.txt"
    doc.write_text(TEXT[:300])
    common = ("--library", tmp_path / "lib", "--model", hf)
    code, _, err = _run(capsys, "ingest", doc, "--label", "x", *common)
    assert code == 2 and "no adapter file" in err and "--untrained" in err
    code, _, err = _run(capsys, "ingest", doc, "--label", "x", "--untrained", *common)
    assert code == 0 and "UNTRAINED" in err
