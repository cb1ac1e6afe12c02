"""Opening the model a database runs on: a coda_jax model checkpoint, a bundle of
CoDA adapters over a pinned base (:mod:`.adapter_bundle`), or a HuggingFace
directory plus the reference's CoDA adapters (through ``convert``).

Only bounded models (``attention="coda_bounded"``) have a fixed-size state to
save, so anything else is refused before its weights are read. A HF directory
needs its adapter file (``coda_adapters.pt`` beside it, or given): the
reference silently runs untrained adapters when the file is missing; here that
takes ``untrained=True`` and a loud warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from coda_jax.checkpoint import weights_fingerprint
from coda_jax.decoder import CausalLM
from coda_jax.model_config import BOUNDED_DEFAULTS
from coda_jax.model_io import load_model, read_model_metadata
from convert.model_export import INDEX as EXPORT_INDEX
from .bundled import CARD_FILE, bundled_model_path, read_card
from .errors import NotFoundError, RefusedError
from .settings import METADATA_KEY, QuerySettings

TOKENIZER_FILE = "tokenizer.json"
ADAPTER_FILE = "coda_adapters.pt"
# End-of-text tokens of common tokenizers: the default stop tokens when the model says none.
END_OF_TEXT = ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


@dataclasses.dataclass(frozen=True)
class OpenModel:
    """A bounded model ready to read documents: weights, tokenizer, fingerprints, settings."""

    model: CausalLM
    tokenizer: Any  # tokenizers.Tokenizer
    name: str  # what to show people: the model's own name (see display_name)
    path: str  # where it was opened from
    model_sha256: str
    tokenizer_sha256: str
    settings: QuerySettings

    def describe(self) -> dict[str, Any]:
        """What a saved document records about the model that read it."""
        bank = self.model.spec.bank
        return {"name": self.name, "path": self.path, "weights_sha256": self.model_sha256,
                "tokenizer_sha256": self.tokenizer_sha256,
                "layers": self.model.cfg.num_layers,
                "bank": dataclasses.asdict(bank) if bank is not None else None,
                "block_size": self.settings.block_size}


def display_name(root: Path, meta: Mapping[str, Any]) -> str:
    """The model's name for people: the bundled model's card name, a converted
    GGUF model's own name (``general.name``), else its directory's name; never
    a path."""
    if bundled_model_path() is not None and root == bundled_model_path().absolute():
        card = read_card(root) or {}
        return f"{card.get('name', 'default model')} (bundled)"
    source = meta.get("source") if isinstance(meta.get("source"), Mapping) else {}
    return str(source.get("name") or root.name)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (any HF one)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise RefusedError("the neural database needs the 'tokenizers' package: "
                           "pip install tokenizers") from err
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise NotFoundError(f"no tokenizer at {path} (a {TOKENIZER_FILE}); put it in the "
                            "model directory or pass its path")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 (tokenizers raises plain Exceptions)
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise RefusedError(f"{path} is not a readable {TOKENIZER_FILE}: {first[:200]}") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full JSON description (vocabulary, merges, rules)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def end_of_text_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids of the tokenizer's known end-of-text tokens."""
    found = (tokenizer.token_to_id(t) for t in END_OF_TEXT)
    return tuple(sorted({i for i in found if i is not None}))


def _hf_stop_tokens(model_dir: Path) -> tuple[int, ...]:
    """``eos_token_id`` of a HF directory's generation or model config, if any."""
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return tuple(value)
    return ()


def _refuse_unbounded(attention: str, where: str) -> None:
    if attention != "coda_bounded":
        raise RefusedError(
            f"{where} has attention={attention!r}: the neural database needs a bounded model "
            "(attention='coda_bounded'), whose state has a fixed size; convert one with "
            "'python -m convert hf MODEL_DIR OUT --attention coda_bounded --adapters "
            "coda_adapters.pt'")


def open_model(path: str | os.PathLike | None, *, tokenizer: str | os.PathLike | None = None,
               adapters: str | os.PathLike | None = None, untrained: bool = False,
               bank_options: Mapping[str, Any] | None = None) -> OpenModel:
    """Open a bounded model for the database.

    ``path`` is a coda_jax model checkpoint (its tokenizer a ``tokenizer.json``
    inside it, or ``tokenizer``; None: the bundled default model,
    :func:`.bundled.bundled_model_path`), a bundle of CoDA adapters over a pinned
    base (:mod:`.adapter_bundle`: its weights' fingerprint checked against its
    card), or a HF model directory (``config.json``,
    safetensors, ``tokenizer.json``) with ``adapters`` (default
    ``path/coda_adapters.pt``; missing: refused unless ``untrained``) and
    ``bank_options`` (window, num_landmarks_exact, ...: adapter files do not
    record them; left out, the defaults are assumed with a warning).
    """
    if path is None:
        path = bundled_model_path()
        if path is None:
            raise NotFoundError("this installation has no bundled default model: give a "
                                "model checkpoint directory or a HuggingFace directory with "
                                "its adapters")
    root = Path(path).absolute()
    if not root.exists():
        raise NotFoundError(f"no model at {root}")
    recorded_weights = None
    if (root / EXPORT_INDEX).is_file() and (root / CARD_FILE).is_file():
        from .adapter_bundle import open_adapter_bundle, read_adapter_card

        card = read_adapter_card(root)
        if adapters is not None or tokenizer is not None:
            raise RefusedError(f"{root} is a bundle of CoDA adapters over its base: its "
                               "adapters and tokenizer come with it (no --adapters or "
                               "--tokenizer)")
        model, tok = open_adapter_bundle(root, card)
        _refuse_unbounded(model.attention, f"the model bundle at {root}")
        meta = {METADATA_KEY: card.get(METADATA_KEY) or {}, "source": {"name": card.get("name")}}
        defaults = end_of_text_ids(tok)
        recorded_weights = card["weights_sha256"]
    elif (root / "meta").is_dir():
        meta = read_model_metadata(root)
        _refuse_unbounded(meta.get("attention"), f"the model at {root}")
        if adapters is not None:
            raise RefusedError(f"{root} is a coda_jax checkpoint (its CoDA weights are inside "
                               "it); adapters apply only to a HuggingFace directory")
        model = load_model(root)
        tok = load_tokenizer(tokenizer if tokenizer is not None else root)
        defaults: tuple[int, ...] = end_of_text_ids(tok)
    elif (root / "config.json").is_file():
        adapters = Path(adapters) if adapters is not None else root / ADAPTER_FILE
        if not adapters.exists():
            if not untrained:
                raise NotFoundError(
                    f"no adapter file at {adapters}: a HuggingFace model needs its trained CoDA "
                    "adapters (give them with --adapters); --untrained runs freshly initialised "
                    "ones, whose answers are noise")
            warnings.warn(f"UNTRAINED: no adapter file at {adapters}; the CoDA attention runs "
                          "with freshly initialised weights and its answers are noise",
                          stacklevel=2)
            adapters = None
        from convert import load_hf_model  # the HF reader lives with the converters

        if bank_options is None:
            warnings.warn(f"{root}: adapter files do not record the bank configuration; "
                          f"assuming {dict(BOUNDED_DEFAULTS)} (pass bank_options, or convert "
                          "with 'python -m convert hf ... --window ...', to choose)",
                          stacklevel=2)
        model = load_hf_model(root, attention="coda_bounded", adapters=adapters,
                              attention_options=dict(bank_options or BOUNDED_DEFAULTS),
                              progress=False)
        tok = load_tokenizer(tokenizer if tokenizer is not None else root)
        meta, defaults = {}, _hf_stop_tokens(root) or end_of_text_ids(tok)
    else:
        raise RefusedError(f"{root} is neither a coda_jax model checkpoint (meta/, tree/), a "
                           f"bundle of adapters ({CARD_FILE}, {EXPORT_INDEX}) nor a "
                           "HuggingFace model directory (config.json)")
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise RefusedError(f"the tokenizer has {tok.get_vocab_size()} ids, more than the "
                           f"model's vocabulary of {model.cfg.vocab_size}: they do not belong "
                           "together")
    settings = QuerySettings.from_metadata(meta, default_stops=defaults)
    # A bundle's weights were checked against its card as they were opened.
    fingerprint = recorded_weights or weights_fingerprint([model])
    return OpenModel(model=model, tokenizer=tok, name=display_name(root, meta), path=str(root),
                     model_sha256=fingerprint, tokenizer_sha256=tokenizer_fingerprint(tok),
                     settings=settings)
