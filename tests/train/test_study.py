"""The 2x2 study chained end to end at CPU size, and the passkey samples it scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from text_corpus import text_corpus
from train import data, retrieval, study


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("study"))


def test_passkey_samples_bury_the_key_and_mark_its_answer(built):
    tok = data.load_tokenizer(built / "tokenizer.json")
    filler = data.read_tokens(built / "heldout")
    for depth in (0.0, 0.5, 1.0):
        samples, masks, keys = retrieval.passkey_samples(tok, filler, length=200, depth=depth,
                                                         count=3, seed=4)
        assert samples.shape == masks.shape == (3, 200)
        for row, mask, key in zip(samples, masks, keys):
            answer = tok.encode(retrieval.ANSWER.format(key=key)).ids
            needle = tok.encode(retrieval.NEEDLE.format(key=key)).ids
            # The positions marked are those whose next token is an answer token.
            assert row[1:][mask[:-1]].tolist() == answer and mask.sum() == len(answer)
            starts = [i for i in range(200 - len(needle)) if
                      row[i:i + len(needle)].tolist() == needle]
            assert len(starts) == 1
            filler_len = 200 - len(needle) - len(answer) - len(tok.encode(retrieval.QUESTION).ids)
            assert starts[0] == round(depth * filler_len)
    with pytest.raises(ValueError, match="depth"):
        retrieval.passkey_samples(tok, filler, length=200, depth=1.5, count=1)
    with pytest.raises(ValueError, match="cannot hold"):
        retrieval.passkey_samples(tok, filler, length=10, depth=0.5, count=1)


def test_the_study_runs_every_stage_and_evaluation(built, tmp_path):
    out = tmp_path / "out"
    assert study.main(["--corpus", str(built), "--out", str(out), "--tiny", "--no-progress",
                       "--export-base"]) == 0
    report = json.loads((out / "study.json").read_text())
    assert list(report["stages"]) == ["base", "gqa-phase1", "gqa-phase2", "coda-phase1",
                                      "coda-phase2"]
    for stage in report["stages"].values():
        assert stage["summary"]["model"] and stage["metrics"]
    base_losses = [m["loss"] for m in report["stages"]["base"]["metrics"]]
    assert base_losses[-1] < base_losses[0]
    table = report["headline"]
    for arm in ("gqa", "coda"):
        assert all(np.isfinite(table[arm][k]) for k in ("unbounded", "bounded", "penalty",
                                                        "no_phase2_bounded", "window_only"))
        rows = report["evaluations"][arm]["ppl"]
        window = [r for r in rows if r["weights"] == "window_only"][0]
        assert window["bank_per_sequence"]["exact_inserts"] == 0  # the banks are gone
        phase2 = [r for r in rows if r["weights"] == "phase2" and r["bounded"]][0]
        assert phase2["bank_per_sequence"]["total_evictions"] > 0
        assert report["evaluations"][arm]["passkey"]
    assert (out / "losses.png").stat().st_size > 0 and (out / "ppl.png").stat().st_size > 0
    assert (out / "base" / "export.json").is_file()
    # The GQA arm is differential=False: no reference adapters; the CoDA arm has them.
    assert not (out / "runs" / "gqa-phase2" / "coda_adapters.pt").exists()
    assert (out / "runs" / "coda-phase2" / "coda_adapters.pt").is_file()


def test_a_corpus_without_its_parts_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert study.main(["--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                       "--tiny"]) == 2
    assert "train.corpus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
