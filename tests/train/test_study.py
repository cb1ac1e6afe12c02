"""The 2x2 study chained end to end at CPU size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from text_corpus import text_corpus
from train import study


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("study"))


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
