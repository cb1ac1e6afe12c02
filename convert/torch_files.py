"""Reading PyTorch files without running them: torch's tensors-only loader, our messages.

Adapter files and the reference's saved neural states both come through
:func:`safe_torch_load`; nothing in such a file can build an object beyond
tensors, plain containers and the classes a caller allows.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable

from coda_jax import safe_paths

_ZIP_MAGIC = b"PK\x03\x04"


def _refusal_detail(message: str) -> tuple[str | None, str]:
    """What torch's safe loader stopped at (a class name, if it was one), without
    repeating its advice."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return found.group(1), found.group(1)
    found = re.search(r"[Uu]nsupported operand (\d+)", message)
    if found:
        return None, f"pickle instruction {found.group(1)}"
    return None, "an instruction it does not accept"


def safe_torch_load(path: str | os.PathLike, what: str, *, allowed: Iterable[Any] = ()) -> Any:
    """``torch.load`` with torch's tensors-only loader, errors in our own words.

    ``ValueError`` "PATH is not a WHAT (...)" for empty, foreign or damaged
    files, "PATH refused: it holds objects other than tensors (...)" for a
    pickle that would build anything else; such a file is never run.
    ``allowed`` extends what may be built (``torch.serialization.safe_globals``).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    if path.is_dir():
        raise ValueError(f"{path} is {safe_paths.describe_path(path)}, not a {what} (a file)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path} is not a {what} (it is empty)")
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip and not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise ValueError(f"{path} is not a {what} (neither a torch archive nor a pickle)")
    # torch's own messages advise loading unsafely: they are replaced, and the
    # error is raised outside the handler so that it does not carry them along.
    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        global_name, detail = _refusal_detail(str(err))
        if global_name is None:
            problem = (f"{path} refused: it is not a plain file of tensors (the tensors-only "
                       f"loader stopped at {detail}); nothing in it was run")
        else:
            problem = (f"{path} refused: it holds objects other than tensors ({detail}); "
                       "nothing in it was run")
    except EOFError:
        problem = f"{path} is not a {what} (it ends early: truncated?)"
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError,
            struct.error, UnicodeDecodeError, OverflowError, OSError) as err:
        kind = "a damaged or truncated torch archive" if is_zip else "a damaged pickle"
        problem = f"{path} is not a {what} ({kind}: {type(err).__name__})"
    raise ValueError(problem)
