"""Tiny bounded models with tokenizers, made once per test session (CPU, seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coda_db import NeuralDatabase
from database_fixtures import make_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, model_dir) -> Path:
    """Same shapes and tokenizer, other weights."""
    root = make_model_dir(tmp_path_factory.mktemp("models") / "other", seed=1)
    shutil.copy(model_dir / "tokenizer.json", root / "tokenizer.json")
    return root


@pytest.fixture(scope="session")
def opened(model_dir):
    return NeuralDatabase(model_dir, library=model_dir.parent / "unused").opened


@pytest.fixture
def db(opened, tmp_path) -> NeuralDatabase:
    return NeuralDatabase(opened, library=tmp_path / "library")
