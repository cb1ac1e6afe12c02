"""Command line: HF checkpoints and reference adapters -> Orbax checkpoints, and back.

    python -m convert hf MODEL_DIR OUT [--dtype bfloat16] [--attention coda_bounded]
                                       [--adapters coda_adapters.pt] [--window 256 ...]
    python -m convert adapters IN.pt OUT
    python -m convert export MODEL_CKPT OUT.pt      (or OUT.safetensors)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax.numpy as jnp

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _summary(title: str, items: dict[str, Any]) -> None:
    print(title)
    for key, value in items.items():
        if isinstance(value, int) and key in ("bytes",):
            value = f"{value:,} ({value / 2**30:.2f} GiB)"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"  {key:>12}: {value}")


def cmd_hf(args: argparse.Namespace) -> None:
    from coda_jax.model_io import describe_model, save_model

    from .hf import load_hf_model

    options = {k: v for k, v in (("window", args.window),
                                 ("num_landmarks_exact", args.num_landmarks_exact),
                                 ("num_landmarks_summary", args.num_landmarks_summary))
               if v is not None}
    model = load_hf_model(args.model_dir, attention=args.attention, attention_options=options,
                          adapters=args.adapters, reference_compat=args.reference_compat,
                          dtype=DTYPES[args.dtype])
    path = save_model(args.out, model, overwrite=args.overwrite)
    meta = describe_model(model)
    _summary(f"wrote {path}", {"family": model.cfg.family, "attention": model.attention,
                               "layers": model.cfg.num_layers, "parameters": meta["parameters"],
                               "dtype": meta["dtype"], "bytes": meta["bytes"]})


def cmd_adapters(args: argparse.Namespace) -> None:
    from coda_jax import orbax_io

    from .adapters import ADAPTER_FORMAT, read_adapter_file

    weights = read_adapter_file(args.input)
    count = sum(v.size for sd in weights.values() for v in sd.values())
    nbytes = sum(v.nbytes for sd in weights.values() for v in sd.values())
    meta = {"format": ADAPTER_FORMAT, "layers": len(weights), "parameters": int(count)}
    path = orbax_io.write(args.out, weights, meta, overwrite=args.overwrite)
    dtype = next(iter(next(iter(weights.values())).values())).dtype
    _summary(f"wrote {path}", {"layers": len(weights), "parameters": int(count),
                               "dtype": str(dtype), "bytes": int(nbytes)})


def cmd_export(args: argparse.Namespace) -> None:
    from coda_jax.model_io import load_model

    from .adapters import save_adapters

    model = load_model(args.model)
    path = save_adapters(model, args.out, overwrite=args.overwrite)
    _summary(f"wrote {path}", {"layers": model.cfg.num_layers, "format": path.suffix})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("hf", help="a HuggingFace model directory -> an Orbax model checkpoint")
    hf.add_argument("model_dir")
    hf.add_argument("out")
    hf.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    hf.add_argument("--attention", choices=["gqa", "coda", "coda_bounded"], default="gqa")
    hf.add_argument("--adapters", help="the reference's coda_adapters.pt (or .safetensors)")
    hf.add_argument("--window", type=int)
    hf.add_argument("--num-landmarks-exact", type=int)
    hf.add_argument("--num-landmarks-summary", type=int)
    hf.add_argument("--reference-compat", action=argparse.BooleanOptionalAction, default=None,
                    help="Qwen3: reproduce the reference (no q_norm/k_norm); default: decided "
                         "from the adapter file")
    hf.add_argument("--overwrite", action="store_true")
    hf.set_defaults(run=cmd_hf)
    ad = sub.add_parser("adapters", help="a reference adapter file -> an Orbax checkpoint")
    ad.add_argument("input")
    ad.add_argument("out")
    ad.add_argument("--overwrite", action="store_true")
    ad.set_defaults(run=cmd_adapters)
    ex = sub.add_parser("export", help="an Orbax model checkpoint -> the reference's "
                                       "coda_adapters.pt (or .safetensors)")
    ex.add_argument("model")
    ex.add_argument("out")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(run=cmd_export)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
