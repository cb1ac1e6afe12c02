"""Orbax directories of one pytree plus JSON metadata: atomic, checksummed, never clobbering.

Shared by saved states, saved models and adapter checkpoints. A checkpoint
directory holds ``tree/`` (the pytree, Orbax), ``meta/`` (JSON with a
``format`` tag saying what it is) and ``checksums.json`` (sha256 of every
file, written last). A save is built beside its target and swapped in only
once complete (:mod:`coda_jax.safe_paths`); it replaces only a checkpoint of
the same format, and only when asked to. A read verifies the checksums of
the part it reads first, so damage is reported by name instead of surfacing
as garbage numbers or a storage-layer message.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from . import safe_paths

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 22


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def _part(relative: str) -> str:
    """Which part of a checkpoint a file belongs to, in words."""
    first, _, rest = relative.partition("/")
    if first == "meta":
        return "the metadata"
    if first == "tree":
        return "the array data" if "/d/" in f"/{rest}" else "the array index"
    return "the checkpoint record"


def _format_of(path: Path) -> str | None:
    """The format tag of a checkpoint directory, or None if it is not one of ours."""
    try:
        meta = json.loads((path / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def write(path: str | os.PathLike, tree: Any, meta: dict[str, Any], *, overwrite: bool,
          what: str = "checkpoint", extra_files: dict[str, bytes] | None = None) -> Path:
    """Save ``tree`` and ``meta`` (whose ``format`` names the kind) to the directory ``path``.

    ``extra_files`` (plain file names -> contents, e.g. a ``tokenizer.json``) are
    written beside ``tree/`` and ``meta/`` in the same atomic swap, and checksummed.

    An existing ``path`` is replaced only with ``overwrite`` and only if it is
    a coda_jax checkpoint of the same kind; otherwise ``FileExistsError`` or
    ``ValueError`` naming what is there, and nothing is touched.
    """
    fmt = meta["format"]
    kind = fmt.split("/")[0]

    def is_ours(existing: Path) -> bool:
        found = _format_of(existing) if existing.is_dir() else None
        return found is not None and found.split("/")[0] == kind

    extra_files = dict(extra_files or {})
    for name in extra_files:
        if not name or "/" in name or "\\" in name or name in ("tree", "meta", CHECKSUMS) \
                or name.startswith("."):
            raise ValueError(f"{name!r} cannot be an extra file of a checkpoint")

    def save(staging: Path) -> None:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(staging, ocp.args.Composite(
                tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        for name, content in extra_files.items():
            (staging / name).write_bytes(content)
        sums = {name: _digest(staging / name) for name in _files(staging)}
        (staging / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1))

    return safe_paths.write_atomically(path, save, overwrite=overwrite, is_ours=is_ours,
                                       what=f"saved {what}")


def verify(path: str | os.PathLike, what: str, *, parts: tuple[str, ...] = ("meta", "tree")
           ) -> bool:
    """Check the files under ``parts`` against ``checksums.json``.

    Returns False for a checkpoint without checksums (written before they
    existed); raises ``ValueError`` naming the damaged part and file.
    """
    path = Path(path).absolute()
    record = path / CHECKSUMS
    if not record.exists():
        return False
    try:
        sums = json.loads(record.read_text())["sha256"]
        if not isinstance(sums, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the saved {what} at {path} is damaged: {CHECKSUMS} is unreadable "
                         f"({type(err).__name__})") from err
    for name, expected in sorted(sums.items()):
        if name.split("/")[0] not in parts and name.split("/")[0] in ("meta", "tree"):
            continue
        file = path / name
        if not file.is_file():
            raise ValueError(f"the saved {what} at {path} is damaged: {_part(name)} "
                             f"is incomplete ({name} is missing)")
        if _digest(file) != expected:
            raise ValueError(f"the saved {what} at {path} is damaged: {_part(name)} "
                             f"does not match its checksum ({name})")
    return True


def read_meta(path: str | os.PathLike, fmt: str, what: str, *,
              accepted: tuple[str, ...] = ()) -> dict[str, Any]:
    """The metadata of a checkpoint written by :func:`write` with format tag ``fmt``
    (or one of the ``accepted`` older tags), its checksums verified."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no saved {what} at {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not a saved coda_jax "
                         f"{what} (a directory)")
    if not (path / "meta").is_dir() or not (path / "tree").is_dir():
        raise ValueError(f"{path} is not a saved coda_jax {what}: it is "
                         f"{safe_paths.describe_path(path)}, without meta/ and tree/")
    checked = verify(path, what, parts=("meta",))
    try:
        meta = json.loads((path / "meta" / "metadata").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"the saved {what} at {path} is damaged: the metadata is "
                         f"unreadable ({type(err).__name__})") from err
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != fmt and found not in accepted:
        raise ValueError(f"{path} is not a saved coda_jax {what} (format {found!r}, "
                         f"expected {fmt!r})")
    if not checked:
        if found == fmt:  # today's format always has them
            raise ValueError(f"the saved {what} at {path} is damaged: {CHECKSUMS} "
                             "is missing")
        warnings.warn(f"{path} was saved without checksums (format {found}); its data "
                      "cannot be verified", stacklevel=3)
    return meta


def _placed(abstract: Any, sharding: jax.sharding.Sharding) -> Any:
    """``abstract`` with every unplaced array leaf placed by ``sharding``.

    Orbax otherwise restores each array onto the device it was saved from, and
    refuses ("Topology mismatch") when that device is absent: a model saved on
    a CPU could not be read on a GPU machine, nor a GPU's state on a laptop.
    """
    def place(leaf: Any) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        return leaf

    return jax.tree.map(place, abstract)


def read_tree(path: str | os.PathLike, abstract: Any | None, what: str = "checkpoint") -> Any:
    """Restore the tree of a checkpoint into the structure/shapes of ``abstract``
    (None: as saved, for plain nested dicts) on this machine's default device,
    whatever device wrote it, after verifying its checksums."""
    path = Path(path).absolute()
    verify(path, what, parts=("tree",))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore = (ocp.args.StandardRestore(fallback_sharding=device) if abstract is None
               else ocp.args.StandardRestore(_placed(abstract, device)))
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            return checkpointer.restore(path, ocp.args.Composite(tree=restore)).tree
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        # Reached only without checksums (older saves) or with a structure mismatch.
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"the saved {what} at {path} cannot be read as expected: "
                         f"{first[:300]}") from err
