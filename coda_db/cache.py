"""coda-db's cache directory, and JAX's compilation cache in it.

``coda-db`` compiles its programs (reading a document, answering questions) anew in
every process: on a 2-core CPU that is most of a short command's time. With
JAX's persistent compilation cache a later process loads what an earlier one
compiled. ``coda-db``'s commands turn it on (:func:`enable_compilation_cache`) in
``$XDG_CACHE_HOME/coda-db/jax`` (``~/.cache/coda-db/jax``); the Python API leaves
the choice to the caller. JAX treats the cache as trusted code, so the directory
is made readable and writable by its owner only.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

SWITCH_ENV = "CODA_DB_COMPILATION_CACHE"   # "off": coda-db leaves JAX's cache alone
MAX_BYTES = 2 << 30                        # older programs are dropped beyond this


def cache_dir() -> Path:
    """coda-db's cache: ``$XDG_CACHE_HOME/coda-db``, else ``~/.cache/coda-db``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "coda-db"


def enable_compilation_cache() -> Path | None:
    """Turn JAX's persistent compilation cache on in ``cache_dir() / "jax"`` (at most
    ``MAX_BYTES``), before anything is compiled. A cache the user has set already
    (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept; with
    ``CODA_DB_COMPILATION_CACHE=off`` nothing is changed. Returns the cache in use,
    or None (off, or the directory could not be made: a warning says why)."""
    import jax

    if os.environ.get(SWITCH_ENV, "").lower() == "off":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)
    except OSError as err:
        warnings.warn(f"no compilation cache: cannot make {path} ({err}); programs are "
                      "compiled in every process", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def child_environment() -> dict[str, str]:
    """This process's environment for a Python child process, naming this process's
    compilation cache (if any), so that the child loads what this one compiled."""
    import jax

    env = dict(os.environ)
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
        env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(jax.config.jax_compilation_cache_max_size)
    return env
