"""python -m train.evaluation: one line per command, every command's --help, and the
training command lines' exit codes for usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train.evaluation.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_command_on_one_line():
    done = subprocess.run([sys.executable, "-m", "train.evaluation", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in COMMANDS:
        assert sum(line.split()[:1] == [name] for line in lines) == 1, name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"python -m train.evaluation {command}" in out


def test_usage_errors_exit_1(capsys):
    assert main([]) == 1
    assert "a command is required" in capsys.readouterr().err
    assert main(["perplex"]) == 1
    assert "unknown command 'perplex'" in capsys.readouterr().err
    assert main(["ask", "--no-such-option"]) == 1


def test_a_study_worker_says_how_it_is_called():
    done = subprocess.run([sys.executable, "-m", "train.evaluation.retention_product"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "python -m train.evaluation.retention_product worker SPEC.json" in done.stderr
