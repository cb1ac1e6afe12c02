"""Library entries as tar archives (download and upload), extracted safely.

An archive holds one entry's files under ``entry/`` (``entry/entry.json``,
``entry/state/...``), uncompressed. Extraction reads members one by one and
writes only regular files and directories below the target: absolute names,
``..``, links, devices, duplicate names, too many members and too many bytes
are refused before anything is written, and nothing is unpickled. The result
is then checked like any saved entry (sidecar format, state checksums) before
the library installs it.
"""

from __future__ import annotations

import io
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

from .errors import RefusedError

ROOT = "entry"
MAX_MEMBERS = 10_000
MAX_BYTES = 16 << 30
_COPY = 1 << 20


def pack(entry_dir: Path, out: BinaryIO) -> None:
    """Write the entry at ``entry_dir`` to the binary stream ``out`` as a tar."""
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for path in sorted(entry_dir.rglob("*")):
            if path.is_symlink():
                continue
            tar.add(path, arcname=posixpath.join(ROOT, path.relative_to(entry_dir).as_posix()),
                    recursive=False)


def _member_path(name: str) -> str:
    """The member's path below ``entry/``; ``RefusedError`` for anything else."""
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise RefusedError(f"the archive holds an unsafe name {name!r}")
    norm = posixpath.normpath(name)
    parts = norm.split("/")
    if ".." in parts or parts[0] != ROOT:
        raise RefusedError(f"the archive holds {name!r}, outside {ROOT}/: not a coda-db entry")
    return "/".join(parts[1:])


def unpack(data: BinaryIO, target: Path, *, max_bytes: int = MAX_BYTES) -> None:
    """Extract an archive made by :func:`pack` from ``data`` into the new directory
    ``target`` (which must not exist); ``RefusedError`` for an archive that is not
    one (nothing is left behind: ``target`` is removed on failure)."""
    target.mkdir()
    try:
        _extract(data, target, max_bytes)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _extract(data: BinaryIO, target: Path, max_bytes: int) -> None:
    seen: set[str] = set()
    total = 0
    try:
        tar = tarfile.open(fileobj=data, mode="r|")
    except tarfile.TarError as err:
        raise RefusedError(f"the upload is not a coda-db entry archive (a tar): {err}") from None
    with tar:
        try:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise RefusedError(f"the archive holds more than {MAX_MEMBERS} members")
                relative = _member_path(member.name)
                if relative in seen:
                    raise RefusedError(f"the archive holds {member.name!r} twice")
                seen.add(relative)
                if member.isdir():
                    (target / relative).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile() or not relative:
                    raise RefusedError(f"the archive member {member.name!r} is not a regular "
                                       "file or directory (links and devices are refused)")
                total += member.size
                if total > max_bytes:
                    raise RefusedError(f"the archive holds more than {max_bytes:,} bytes")
                dest = target / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with open(dest, "xb") as out:
                    shutil.copyfileobj(source or io.BytesIO(), out, _COPY)
        except (tarfile.TarError, EOFError) as err:
            raise RefusedError(f"the archive is truncated or damaged: {err}") from None
    if not seen:
        raise RefusedError("the archive is empty")
