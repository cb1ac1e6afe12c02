"""The 2x2 study chained end to end at CPU size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from text_corpus import text_corpus
from train import study


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("study"))


def test_the_study_runs_every_stage_and_evaluation_and_resumes(built, tmp_path):
    """A time limit stops the command (exit 4) with what it did kept; running it
    again finishes every stage and cell, on both held-out sources."""
    out = tmp_path / "out"
    args = ["--corpus", str(built), "--out", str(out), "--tiny", "--no-progress",
            "--export-base", "--heldout2", str(built / "heldout")]
    assert study.main(args + ["--time-limit-s", "0"]) == study.EXIT_STOPPED
    first = json.loads((out / "study.json").read_text())
    assert list(first["stages"]) == ["base"]  # one update, then the limit
    assert first["stages"]["base"]["summary"]["model"] is None
    assert study.main(args) == 0
    report = json.loads((out / "study.json").read_text())
    assert set(report["evaluations"]) == {"corpus", "second"}
    assert list(report["stages"]) == ["base", "gqa-phase1", "coda-phase1",
                                      "gqa-phase2-medium", "coda-phase2-medium"]
    for stage in report["stages"].values():
        assert stage["summary"]["model"] and stage["metrics"]
    base_losses = [m["loss"] for m in report["stages"]["base"]["metrics"]]
    assert base_losses[-1] < base_losses[0]
    cells = report["evaluations"]["corpus"]
    assert set(cells) == {"base", *(f"{arm}/{c}" for arm in ("gqa", "coda")
                                    for c in ("phase1", "phase2", "medium/bounded",
                                              "medium/no_phase2", "medium/window_only"))}
    for name, cell in cells.items():
        assert set(cell["ppl"]) == {"128", "256"} and all(np.isfinite(list(cell["ppl"].values())))
        assert len(cell["row_nll"]["256"]) == 4  # every cell on the same four rows
    assert cells["coda/medium/window_only"]["bank_per_sequence"]["exact_inserts"] == 0
    assert cells["coda/medium/bounded"]["bank_per_sequence"]["total_evictions"] > 0
    stats = report["headline"]["corpus"]["256"]["statistics"]
    for name in ("gqa/medium/penalty", "coda/medium/penalty", "medium/interaction"):
        assert stats[name]["low"] <= stats[name]["value"] <= stats[name]["high"]
    ppl = report["headline"]["corpus"]["256"]["ppl"]
    assert stats["medium/interaction"]["value"] == pytest.approx(
        (ppl["coda/medium/bounded"] - ppl["coda/phase1"])
        - (ppl["gqa/medium/bounded"] - ppl["gqa/phase1"]))
    assert set(report["passkey"]) == {"base", "gqa/medium/bounded", "coda/medium/bounded"}
    bounded_bytes = report["state_bytes"]["coda/medium/bounded"]["any"]
    assert 0 < bounded_bytes < report["state_bytes"]["base"]["256"] * 4
    for figure in ("losses.png", "ppl.png", "penalties.png"):
        assert (out / figure).stat().st_size > 0
    assert (out / "base" / "export.json").is_file()
    # The GQA arm is differential=False: no reference adapters; the CoDA arm has them.
    assert not (out / "runs" / "gqa-phase2-medium" / "coda_adapters.pt").exists()
    assert (out / "runs" / "coda-phase2-medium" / "coda_adapters.pt").is_file()


def test_a_given_base_replaces_pretraining():
    """--base: no pretraining stage; both arms' phase 1 start from that model."""
    base = dict(stage="pretrain", optim=dict(steps=3))
    plan = dict(phase1=dict(steps=2), phase2=dict(steps=2),
                banks=dict(medium=dict(window=32, num_landmarks_exact=8,
                                       num_landmarks_summary=8)))
    given = study.stage_configs(base, plan, Path("out"), base_model=Path("/models/smollm2"),
                                tiny=False)
    assert list(given) == ["gqa-phase1", "coda-phase1", "gqa-phase2-medium",
                           "coda-phase2-medium"]
    assert given["gqa-phase1"]["init"] == given["coda-phase1"]["init"] == "/models/smollm2"
    pretrained = study.stage_configs(base, plan, Path("out"), base_model=None, tiny=False)
    assert list(pretrained)[0] == "base"
    assert pretrained["coda-phase1"]["init"] == str(Path("out") / "runs" / "base" / "model")


def test_a_corpus_without_its_parts_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert study.main(["--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                       "--tiny"]) == 2
    assert "train.corpus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_study_narrows_to_some_banks_and_passkey_lengths(built, tmp_path, capsys):
    config = dict(banks=dict(medium=dict(window=256), large=dict(window=1024),
                             small=dict(window=64)),
                  evaluation=dict(length=2048, passkey_lengths=[2048, 32768]))
    narrow = study.narrowed(config, banks="small,large", passkey_lengths="2048,8192")
    assert list(narrow["banks"]) == ["large", "small"]  # the config's order
    assert narrow["evaluation"] == dict(length=2048, passkey_lengths=[2048, 8192])
    assert list(config["banks"]) == ["medium", "large", "small"]  # unchanged
    assert study.narrowed(config) == config
    with pytest.raises(ValueError, match="the config's banks are medium, large, small"):
        study.narrowed(config, banks="huge")
    with pytest.raises(ValueError, match="positive integers"):
        study.narrowed(config, passkey_lengths="2k")
    # On the command line: refused before anything is written.
    assert study.main(["--corpus", str(built), "--out", str(tmp_path / "o"), "--tiny",
                       "--banks", "huge"]) == 3
    assert "--banks 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

