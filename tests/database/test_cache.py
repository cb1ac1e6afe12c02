"""coda-db's compilation cache (coda_db.cache): where it goes, what it leaves alone,
and that a later process loads what an earlier one compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from coda_db import cache

PROGRAM = ("from coda_db.cache import enable_compilation_cache\n"
           "print(enable_compilation_cache())\n"
           "import jax, jax.numpy as jnp\n"
           "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).block_until_ready()\n")


@pytest.fixture
def no_cache(monkeypatch, tmp_path):
    """No compilation cache configured (this run's is put back after), coda-db's
    cache directory under ``tmp_path``."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cache.SWITCH_ENV, raising=False)
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_the_cache_goes_in_coda_dbs_cache_directory_owner_only(no_cache):
    path = cache.enable_compilation_cache()
    assert path == no_cache / "coda-db" / "jax" == cache.cache_dir() / "jax"
    assert jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_compilation_cache_max_size == cache.MAX_BYTES
    assert path.stat().st_mode & 0o777 == 0o700
    child = cache.child_environment()
    assert child["JAX_COMPILATION_CACHE_DIR"] == str(path)
    assert child["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(cache.MAX_BYTES)


def test_a_users_cache_or_the_switch_is_left_alone(no_cache, monkeypatch):
    monkeypatch.setenv(cache.SWITCH_ENV, "off")
    assert cache.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert cache.child_environment() == dict(os.environ)  # no cache: the environment as is
    monkeypatch.delenv(cache.SWITCH_ENV)
    theirs = no_cache / "theirs"
    jax.config.update("jax_compilation_cache_dir", str(theirs))
    assert cache.enable_compilation_cache() == theirs
    assert jax.config.jax_compilation_cache_dir == str(theirs)
    assert not (no_cache / "coda-db").exists()


def test_a_cache_directory_that_cannot_be_made_warns(no_cache, monkeypatch):
    blocker = no_cache / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="no compilation cache"):
        assert cache.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert blocker.read_text() == "not a directory"


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env |= {"XDG_CACHE_HOME": str(home), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=True)


def test_a_later_process_loads_what_an_earlier_one_compiled(tmp_path):
    first = _run(["-c", PROGRAM], tmp_path)
    assert first.stdout.strip() == str(tmp_path / "coda-db" / "jax")
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit__lambda'" in first.stderr
    second = _run(["-c", PROGRAM], tmp_path)
    assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr


def test_coda_db_commands_turn_it_on(tmp_path):
    _run(["-m", "coda_db.cli", "list", "--library", str(tmp_path / "lib")], tmp_path)
    assert (tmp_path / "coda-db" / "jax").is_dir()
