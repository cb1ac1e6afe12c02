"""The library on disk: one directory per saved document state, under its label.

    LIBRARY/
      .lock                   fcntl lock: saves and deletes take it exclusively,
                              listing shares it
      LABEL/entry.json        the sidecar: label, time saved, the document's metadata
                              (source, tokens read, model and tokenizer fingerprints,
                              bank config), bytes in memory, bank fill
      LABEL/state/            the bank states of every layer (coda_jax.save_state: Orbax,
                              checksummed, fingerprinted against the model)

An entry is built beside its final name and swapped in whole
(:mod:`coda_jax.safe_paths`), so a crash at any point leaves the old entry (or
none) intact; a duplicate label is refused unless ``replace``, and replacing
is the same atomic swap. Only directories with our ``entry.json`` are ever
replaced or deleted. ``entries()`` reports what it cannot read (damaged
entries, leftovers of interrupted saves) instead of failing on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator

from coda_jax import orbax_io, safe_paths
from coda_jax.checkpoint import load_state, read_state_metadata, save_state
from .documents import DocumentState
from .errors import NotFoundError, RefusedError
from .model_source import OpenModel

ENTRY_FORMAT = "coda_db_entry/1"
ENTRY_FILE = "entry.json"
STATE_DIR = "state"
LOCK_FILE = ".lock"
MAX_LABEL = 100
_LABEL = re.compile(r"[\w][\w .,+@()=-]*")
_LEFTOVER = re.compile(r"\.(.+)\.(saving|replaced|deleting)-[0-9a-f]{8}")


def default_root() -> Path:
    """``$CODA_DB_LIBRARY``, else ``$XDG_DATA_HOME/coda-db``, else ``~/.local/share/coda-db``."""
    if os.environ.get("CODA_DB_LIBRARY"):
        return Path(os.environ["CODA_DB_LIBRARY"])
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(data) / "coda-db"


def check_label(label: Any) -> str:
    """``label`` if it can name an entry: 1 to 100 letters, digits, spaces and
    ``_ . , + @ ( ) = -``, starting with a letter, digit or ``_``, without ``..``
    or trailing spaces/dots; ``RefusedError`` naming the problem otherwise."""
    if not isinstance(label, str) or not label:
        raise RefusedError(f"a label must be a non-empty string, got {label!r}")
    bad = [c for c in label if unicodedata.category(c).startswith("C")]
    if bad:
        raise RefusedError(f"the label {label!r} holds control characters {bad!r}")
    if "/" in label or "\\" in label or os.sep in label:
        raise RefusedError(f"the label {label!r} holds a path separator")
    if ".." in label:
        raise RefusedError(f"the label {label!r} holds '..'")
    if len(label) > MAX_LABEL:
        raise RefusedError(f"the label is {len(label)} characters long; at most {MAX_LABEL}")
    if not _LABEL.fullmatch(label) or label[-1] in " .":
        raise RefusedError(f"the label {label!r} may hold only letters, digits, spaces and "
                           "_ . , + @ ( ) = -, start with a letter, digit or _, and not end "
                           "with a space or dot")
    return label


@dataclasses.dataclass(frozen=True)
class Entry:
    """One thing found in the library: ``status`` is ``"ok"``, ``"damaged"`` (an entry
    whose sidecar or state is unreadable: ``problem`` says what) or
    ``"incomplete"`` (the leftover of a save or delete that was interrupted)."""

    label: str
    path: Path
    status: str
    meta: dict[str, Any]
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``coda-db list --json`` prints per entry)."""
        doc = self.meta.get("document", {})
        return {"label": self.label, "status": self.status, "problem": self.problem,
                "saved": self.meta.get("saved"), "source": doc.get("source"),
                "tokens": doc.get("tokens"), "state_bytes": doc.get("bytes"),
                "model": doc.get("model", {}).get("name"), "path": str(self.path)}


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == ENTRY_FORMAT else None


def is_entry(path: Path) -> bool:
    """Whether ``path`` is a library entry (a directory with our ``entry.json``)."""
    return path.is_dir() and not path.is_symlink() and _read_sidecar(path) is not None


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class Library:
    """Saved document states under one root directory (created on first save)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root if root is not None else default_root()).absolute()
        if self.root.exists() and not self.root.is_dir():
            raise RefusedError(f"the library {self.root} is "
                               f"{safe_paths.describe_path(self.root)}, not a directory")

    @contextlib.contextmanager
    def locked(self, *, shared: bool = False) -> Iterator[None]:
        """Hold the library's lock (exclusive for writers, shared for readers)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def path(self, label: str) -> Path:
        """Where the entry ``label`` lives (checked label; it need not exist)."""
        return self.root / check_label(label)

    # ---------------------------------------------------------------- writing
    def install(self, label: str, write: Callable[[Path], None], *, replace: bool) -> Path:
        """Build an entry with ``write(directory)`` beside ``LIBRARY/label`` and swap it in.

        ``RefusedError`` for a taken label without ``replace``, or for a path that
        is not one of our entries."""
        target = self.path(label)
        with self.locked():
            try:
                return safe_paths.write_atomically(target, write, overwrite=replace,
                                                   is_ours=is_entry, what="library entry")
            except FileExistsError:
                raise RefusedError(f"the label {label!r} is taken (saved "
                                   f"{self._saved(target)}); choose another label or replace "
                                   "it (--replace)") from None

    def _saved(self, path: Path) -> str:
        meta = _read_sidecar(path) or {}
        stamp = meta.get("saved")
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "?"

    def save(self, label: str, document: DocumentState, opened: OpenModel, *,
             replace: bool = False) -> Entry:
        """Save ``document`` (read by ``opened``) under ``label``."""
        check_label(label)
        sidecar = {"format": ENTRY_FORMAT, "label": label, "saved": time.time(),
                   "document": document.meta, **document.describe_state()}

        def write(staging: Path) -> None:
            staging.mkdir()
            save_state(staging / STATE_DIR, document.state, opened.model)
            (staging / ENTRY_FILE).write_text(json.dumps(sidecar, indent=1))

        path = self.install(label, write, replace=replace)
        return Entry(label=label, path=path, status="ok", meta=sidecar)

    def delete(self, label: str) -> None:
        """Remove the entry ``label`` (only one of ours: damaged ones included)."""
        path = self.path(label)
        with self.locked():
            if not (path.exists() or path.is_symlink()):
                raise NotFoundError(f"no entry {label!r} in the library {self.root}")
            if not is_entry(path):
                raise RefusedError(f"refusing to delete {path}: it is "
                                   f"{safe_paths.describe_path(path)}, not a library entry "
                                   f"(no readable {ENTRY_FILE})")
            aside = safe_paths.staging_path(path, "deleting")
            os.rename(path, aside)
            shutil.rmtree(aside)

    # ---------------------------------------------------------------- reading
    def entries(self) -> list[Entry]:
        """Every entry, newest first, then the damaged and incomplete ones."""
        if not self.root.is_dir():
            return []
        with self.locked(shared=True):
            found = [self._inspect(p) for p in sorted(self.root.iterdir())
                     if p.name != LOCK_FILE]
        found = [e for e in found if e is not None]
        ok = sorted((e for e in found if e.status == "ok"),
                    key=lambda e: -float(e.meta.get("saved") or 0))
        return ok + [e for e in found if e.status != "ok"]

    def _inspect(self, path: Path) -> Entry | None:
        leftover = _LEFTOVER.fullmatch(path.name)
        if leftover:
            action = {"saving": "save", "replaced": "replace", "deleting": "delete"}
            return Entry(label=leftover.group(1), path=path, status="incomplete", meta={},
                         problem=f"left by an interrupted {action[leftover.group(2)]} "
                                 "(remove it by hand once no coda-db process runs)")
        if path.name.startswith(".") or not path.is_dir():
            return None  # not ours: neither an entry nor a leftover
        meta = _read_sidecar(path)
        if meta is None:
            return Entry(label=path.name, path=path, status="damaged", meta={},
                         problem=f"no readable {ENTRY_FILE}")
        try:
            read_state_metadata(path / STATE_DIR)
            # Every array file against its checksum: a truncated or flipped state is
            # reported here, not when a question is asked (it reads each state once).
            orbax_io.verify(path / STATE_DIR, "document state", parts=("tree",))
        except (OSError, ValueError) as err:
            return Entry(label=path.name, path=path, status="damaged", meta=meta,
                         problem=str(err))
        return Entry(label=path.name, path=path, status="ok", meta=meta)

    def entry(self, label: str) -> Entry:
        """The entry ``label`` (``NotFoundError`` when there is none)."""
        path = self.path(label)
        if not path.exists():
            raise NotFoundError(f"no entry {label!r} in the library {self.root}")
        return self._inspect(path) or Entry(label=label, path=path, status="damaged", meta={},
                                            problem="not a directory")

    def load(self, label: str, opened: OpenModel) -> DocumentState:
        """The document state saved under ``label``, for the model ``opened``.

        ``RefusedError`` when the entry is damaged or was made by another model,
        bank config or tokenizer (never a state that would give garbage)."""
        entry = self.entry(label)
        if entry.status != "ok":
            raise RefusedError(f"the entry {label!r} is {entry.status}: {entry.problem}")
        document = entry.meta["document"]
        check_compatible(document, opened, f"the entry {label!r}")
        try:
            state = load_state(entry.path / STATE_DIR, opened.model)
        except ValueError as err:
            raise RefusedError(str(err)) from None
        return DocumentState(state=state, meta=document)


def check_compatible(document: dict[str, Any], opened: OpenModel, what: str) -> None:
    """``RefusedError`` unless a document's metadata names ``opened``'s model,
    tokenizer and bank config."""
    saved = document.get("model", {})
    now = json.loads(json.dumps(opened.describe()))  # as saved: tuples become lists
    for key, words in (("weights_sha256", "model weights"), ("tokenizer_sha256", "tokenizer"),
                       ("bank", "bank config"), ("block_size", "prefill block size")):
        if saved.get(key) != now[key]:
            raise RefusedError(
                f"{what} was read by another model: its {words} differ (saved with "
                f"{saved.get('name')!r}, now {now['name']!r}); load it with the model that "
                "made it")
