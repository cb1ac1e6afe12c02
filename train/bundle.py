"""The default model's export made into the package's bundled model.

    python -m train.bundle EXPORT_DIR [--out coda_db/default_model]
                           [--retention RESULTS.json]

``EXPORT_DIR`` is what ``python -m train.default_model`` writes as
``OUT/export``: the weights as bf16 safetensors shards (``export.json``), the
model card (``card.json``) and the corpus's ``tokenizer.json``. The bundle is
the model as a coda_jax checkpoint in bf16 (what ``coda-db`` opens; the card's
recommended query settings go into its metadata, ``"database"``), the
tokenizer, and the card plus ``bundle`` (the format marker), ``weights_sha256``
(the fingerprint of the weights as saved, read back from the bundle:
``coda_jax.checkpoint.weights_fingerprint``, what the database records with
every state) and ``tokenizer_sha256``. ``--retention`` adds the measured
retention to the card (``"retention"``: the file, device, cells, per-length
summaries, the issue's goals and state sizes) from a results file of
``python -m train.evaluation retention`` run on these very weights (its fingerprint
must be the bundle's).

Refused, with nothing written or replaced: an ``EXPORT_DIR`` that is not such
an export, a bundle over ``MAX_BUNDLE_BYTES`` (the issue's 50 MB for the model,
tokenizer and card together), an ``--out`` that exists and is not a previous
bundle. The bundle is built beside ``--out`` and swapped in whole.
Exit codes: 0 done, 2 not found, 3 refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .cli import run_reporting_errors

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "coda_db" / "default_model"
MAX_BUNDLE_BYTES = 50_000_000
EXPORT_FILES = ("export.json", "card.json", "tokenizer.json")


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _read_export(export: Path) -> tuple[Any, dict[str, Any]]:
    """The export's model (bf16, checksums verified) and card; refused when it is not
    an export of ``train.default_model``."""
    from convert.model_export import is_model_export, load_export

    if not export.is_dir():
        raise FileNotFoundError(f"no export directory at {export}")
    missing = [f for f in EXPORT_FILES if not (export / f).is_file()]
    if missing or not is_model_export(export):
        raise ValueError(f"{export} is not an export of python -m train.default_model "
                         f"(export.json, card.json, tokenizer.json; missing {missing or 'none'}"
                         f"{'' if missing else ', export.json is not a model export'})")
    try:
        card = json.loads((export / "card.json").read_text())
    except ValueError as err:
        raise ValueError(f"{export / 'card.json'} is not readable JSON: {err}") from None
    if not isinstance(card, dict) or not isinstance(card.get("database", {}), dict):
        raise ValueError(f"{export / 'card.json'} is not a model card (a JSON object with "
                         "the recommended 'database' settings)")
    model = load_export(export)
    if model.attention != "coda_bounded":
        raise ValueError(f"the model at {export} has attention={model.attention!r}: the "
                         "bundled model must be bounded (coda_bounded)")
    return model, card


def retention_card(results_path: str | Path) -> dict[str, Any]:
    """What a model card quotes of a retention study's results file."""
    path = Path(results_path)
    try:
        results = json.loads(path.read_text())
        config = results["config"]
        return {"results": path.name, "device": results["device"]["kind"],
                "weights_sha256": results["model"]["weights_sha256"],
                "cells": {k: config[k] for k in ("lengths", "depths", "facts", "caches")}
                | {"documents_per_cell": [config.get("count"),
                                          config.get("count_max", config.get("count"))]},
                "summaries": results["summaries"], "goals": results["goals"],
                "state_bytes": results["state_bytes"]}
    except OSError as err:
        raise FileNotFoundError(f"cannot read the retention results {path}: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results file of python -m train.evaluation retention "
                         f"({type(err).__name__}: {err})") from None


def bundle(export_dir: str | Path, out: str | Path = DEFAULT_OUT, *,
           retention: str | Path | None = None, max_bytes: int | None = None,
           log=print) -> Path:
    """Write the bundle of ``export_dir`` at ``out`` (see the module's description),
    with ``retention`` (a retention study's results file of the same weights) in its
    card; returns ``out``."""
    from coda_jax import load_model, safe_paths, save_model
    from coda_jax.checkpoint import weights_fingerprint
    from coda_db.bundled import BUNDLE_FORMAT, CARD_FILE, is_bundle
    from coda_db.model_source import load_tokenizer, tokenizer_fingerprint
    from coda_db.settings import QuerySettings

    limit = MAX_BUNDLE_BYTES if max_bytes is None else max_bytes
    export, out = Path(export_dir).absolute(), Path(out).absolute()
    safe_paths.refuse_overlap(out, [export])
    # Refuse a foreign --out before any work (write_atomically checks again).
    safe_paths.check_replaceable(out, overwrite=True, is_ours=is_bundle,
                                 what="default-model bundle")
    model, card = _read_export(export)
    tok = load_tokenizer(export / "tokenizer.json")
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(f"the export's tokenizer has {tok.get_vocab_size()} ids, more than "
                         f"the model's vocabulary of {model.cfg.vocab_size}")
    settings = card.get("database", {})
    QuerySettings.from_metadata({"database": settings})  # refuse bad settings now
    measured = retention_card(retention) if retention is not None else None

    def write(staging: Path) -> None:
        save_model(staging, model, extra_meta={"database": settings})
        shutil.copy(export / "tokenizer.json", staging / "tokenizer.json")
        saved = load_model(staging)
        fingerprint = weights_fingerprint([saved])
        if fingerprint != weights_fingerprint([model]):
            raise ValueError("the saved bundle's weights differ from the export's")
        if measured is not None and measured["weights_sha256"] != fingerprint:
            raise ValueError(f"the retention results {retention} were measured on other "
                             f"weights ({measured['weights_sha256'][:12]}, this bundle's "
                             f"are {fingerprint[:12]}); nothing was written")
        stamped = dict(card) | {
            "bundle": {"format": BUNDLE_FORMAT, "export": str(export),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "dtype": str(saved.embed_tokens.embedding[...].dtype)},
            "weights_sha256": fingerprint,
            "tokenizer_sha256": tokenizer_fingerprint(load_tokenizer(staging))}
        if measured is not None:
            stamped["retention"] = measured
        (staging / CARD_FILE).write_text(json.dumps(stamped, indent=1))
        total = _tree_bytes(staging)
        if total > limit:
            raise ValueError(f"the bundle would be {total:,} bytes, over the limit of "
                             f"{limit:,} (model, tokenizer and card); nothing was written")
        log(f"bundle: {total / 1e6:.1f} MB, weights {fingerprint[:12]}")

    return safe_paths.write_atomically(out, write, overwrite=True, is_ours=is_bundle,
                                       what="default-model bundle")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="OUT/export of python -m train.default_model")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="the bundle's directory (default: %(default)s)")
    parser.add_argument("--retention", metavar="RESULTS.json",
                        help="a retention study's results on these weights, quoted in the card")
    args = parser.parse_args(argv)

    def run() -> int:
        out = bundle(args.export, args.out, retention=args.retention)
        print(f"wrote {out}")
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
