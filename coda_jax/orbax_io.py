"""Orbax directories of one pytree plus JSON metadata, written atomically.

Shared by saved states and saved models: a save goes to a staging directory
beside the target and replaces an existing checkpoint only once complete
(and only with ``overwrite=True``); a read checks the format tag first.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def write(path: str | os.PathLike, tree: Any, meta: dict[str, Any], *,
          overwrite: bool) -> Path:
    """Save ``tree`` under ``path/tree`` and ``meta`` under ``path/meta``."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    staging = path.with_name(f".{path.name}.saving-{uuid.uuid4().hex[:8]}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(staging, ocp.args.Composite(
            tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    if path.exists():  # only now that the new checkpoint is complete
        shutil.rmtree(path)
    staging.rename(path)
    return path


def read_meta(path: str | os.PathLike, fmt: str, what: str) -> dict[str, Any]:
    """The metadata of a checkpoint written by :func:`write` with format tag ``fmt``."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no saved {what} at {path}")
    if not (path / "meta").is_dir() or not (path / "tree").is_dir():
        raise ValueError(f"{path} is not a saved coda_jax {what} (no meta/ and tree/ inside)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        meta = checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} is not a saved coda_jax {what} (format {found!r})")
    return meta


def read_tree(path: str | os.PathLike, abstract: Any | None) -> Any:
    """Restore the tree of a checkpoint into the structure/shapes of ``abstract``
    (None: as saved, for plain nested dicts)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(Path(path).absolute(), ocp.args.Composite(
            tree=ocp.args.StandardRestore(abstract))).tree
