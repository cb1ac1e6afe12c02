"""Writing outputs without ever losing what was there: overlap checks and atomic swaps.

Every writer of this package (states, models, adapter exports) goes through
these rules: an output may replace only something recognisably ours of the
same kind, never an input of the same command, and the replacement is
atomic (the new one is built beside the old one, then swapped in), so a
crash at any point leaves either the old or the new one whole.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
_AT_FDCWD = -100


def describe_path(path: Path) -> str:
    """What a path holds, in words, for error messages."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if path.is_file():
        return f"a file of {path.stat().st_size:,} bytes"
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            return "an empty directory"
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return f"a directory of {len(entries)} entries ({shown})"
    return "something that is neither a file nor a directory"


def refuse_overlap(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """``ValueError`` when ``output`` is, contains or lies inside one of ``inputs``:
    replacing it would destroy what the command reads."""
    out = Path(output).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            relation = ("is" if out == src else "lies inside" if out.is_relative_to(src)
                        else "contains")
            raise ValueError(f"the output {output} {relation} the input {source}; "
                             "choose an output path outside the input")


def check_replaceable(path: str | os.PathLike, *, overwrite: bool, is_ours: Callable[[Path], bool],
                      what: str) -> Path:
    """The absolute output path, after checking it may be written.

    Free paths pass. An existing one raises ``FileExistsError`` unless
    ``overwrite``, and ``ValueError`` (naming what was found) unless
    ``is_ours(path)`` recognises it as one of our ``what``s.
    """
    path = Path(path).absolute()
    if not (path.exists() or path.is_symlink()):
        if path.parent.exists() and not path.parent.is_dir():
            raise ValueError(f"cannot write {path}: {path.parent} is not a directory")
        return path
    if not overwrite:
        raise FileExistsError(f"{path} already exists ({describe_path(path)}); "
                              "overwriting it was not asked for")
    if path.is_symlink() or not is_ours(path):
        raise ValueError(f"refusing to overwrite {path}: it is {describe_path(path)}, "
                         f"not a {what} written by coda_jax")
    return path


def staging_path(path: Path, tag: str = "saving") -> Path:
    """A fresh hidden sibling of ``path`` to build the new version in."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where
    the system or file system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                            _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def install(staged: Path, path: Path) -> None:
    """Move a complete ``staged`` output to ``path``, replacing what is there atomically.

    With an old version present the two are exchanged in one step, and the old
    one (now at the staging name) is removed. Where the file system cannot
    exchange, the old one is first renamed aside (``.NAME.replaced-*``, whole)
    and removed only after the new one is in place.
    """
    if not (path.exists() or path.is_symlink()):
        os.rename(staged, path)
        return
    if _exchange(staged, path):
        _remove(staged)
        return
    aside = staging_path(path, "replaced")
    os.rename(path, aside)
    try:
        os.rename(staged, path)
    except OSError:
        os.rename(aside, path)
        raise
    _remove(aside)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], *,
                     overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> Path:
    """Call ``write(staging)`` to build the output beside ``path``, then install it.

    The staging copy is removed whatever happens, so a failed write leaves
    neither a half-written output nor a stray staging file or directory.
    """
    path = check_replaceable(path, overwrite=overwrite, is_ours=is_ours, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(path)
    try:
        write(staged)
        install(staged, path)
    finally:
        if staged.exists() or staged.is_symlink():
            _remove(staged)
    return path
