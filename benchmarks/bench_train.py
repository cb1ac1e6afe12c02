"""Training throughput: our phase-1 and phase-2 steps against the reference's, same run.

    python benchmarks/bench_train.py --out train_h200.json [--shapes small,7b4]

Shapes: ``small`` (8 layers, D=512, H=8, Hkv=2, vocab 16K, sequence 2048, batch
2) and ``7b4`` (four layers of the Mistral-7B shape, sequence 4096, batch 1).
Both sides train the CoDA attention parameters only, bf16 compute: ours with
float32 master weights and optax AdamW (``train.steps``), the reference with
its ``LlamaCoDAAdapter`` swapped into a ``transformers`` Llama in bf16 and
``torch.optim.AdamW``, unbounded for phase 1 and bounded (training mode:
stateless chunked prefill, block 128) for phase 2, as its training script runs
them. Each step is timed to completion (our jit result ready; torch
synchronised) as the median of ``--steps`` after warm-up.

MFU counts model FLOPs per token as 2 * N (forward matmuls of every parameter)
+ 2 * N (the backward's activation gradients, needed through every layer) +
2 * N_trainable (weight gradients of the trained parameters only), plus the
attention's score and value matmuls (4 * L * D per token per layer forward,
x3 with the backward; twice for CoDA's two streams), against 989 TFLOP/s
(H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

PEAK = 989e12
SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                  num_kv_heads=2, head_dim=64, vocab_size=16384, seq_len=2048, batch=2),
    "7b4": dict(hidden_size=4096, intermediate_size=14336, num_layers=4, num_heads=32,
                num_kv_heads=8, head_dim=128, vocab_size=32768, seq_len=4096, batch=1),
}
BANKS = dict(window=256, num_landmarks_exact=64, num_landmarks_summary=64)


def model_flops(shape: dict, n_total: int, n_train: int, streams: int) -> float:
    tokens = shape["batch"] * shape["seq_len"]
    attn = 3 * streams * 4 * shape["seq_len"] * shape["num_heads"] * shape["head_dim"] \
        * shape["num_layers"] / 2  # causal: half the score matrix
    return tokens * (4 * n_total + 2 * n_train + attn)


def ours(shape: dict, stage: str, steps: int, implementation: str | None = None) -> dict:
    from train.config import TrainConfig
    from train.steps import build_model, make_optimizer, make_train_step, trainable_count

    model_fields = {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "num_kv_heads", "head_dim",
                                          "vocab_size")}
    kind = "coda" if stage == "phase1" else "coda_bounded"
    options = (BANKS if kind == "coda_bounded" else {}) | (
        {"implementation": implementation} if implementation else {})
    cfg = TrainConfig.from_dict(dict(
        stage=stage, model=model_fields, attention=dict(kind=kind, options=options),
        data=dict(seq_len=shape["seq_len"]),
        optim=dict(steps=1000, batch_size=shape["batch"], grad_accum=1,
                   trainable="attention", compute_dtype="bfloat16"),
        phase2=dict(block_size=128)))
    model, _ = build_model(cfg)
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg, params)
    opt_state = tx.init(params)
    step = make_train_step(cfg, graphdef, tx)
    tokens = jax.random.randint(jax.random.key(0), (shape["batch"], shape["seq_len"] + 1), 0,
                                shape["vocab_size"])
    key = jax.random.key(1)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        params, opt_state, loss, _ = step(params, opt_state, tokens, key)
        jax.block_until_ready(loss)
        if i >= 3:
            times.append(time.perf_counter() - start)
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return dict(seconds=statistics.median(times), loss=float(loss), n_total=n_total,
                n_train=trainable_count(cfg, params))


def reference(shape: dict, stage: str, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import coda_gqa_l

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
        vocab_size=shape["vocab_size"])).to("cuda", torch.bfloat16)
    kwargs = dict(BANKS, block_size=128) if stage == "phase2" else {}
    adapters = coda_gqa_l.LlamaCoDAAdapter.swap_llama_layers(hf, bounded=stage == "phase2",
                                                             **kwargs)
    for p in hf.parameters():
        p.requires_grad_(False)
    train = [p for a in adapters for p in a.parameters()]
    for p in train:
        p.requires_grad_(True)
    hf.to("cuda", torch.bfloat16).train()
    opt = torch.optim.AdamW(train, lr=5e-5, weight_decay=0.01)
    tokens = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]),
                           device="cuda")
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = hf(tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), loss=float(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="small,7b4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--implementation", choices=["pallas", "cudnn", "xla"],
                        help="our attention implementation (default: the library's choice)")
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        tokens = shape["batch"] * shape["seq_len"]
        for stage in ("phase1", "phase2"):
            row = dict(shape=name, stage=stage, implementation=args.implementation or "default",
                       **shape)
            try:
                o = ours(shape, stage, args.steps, args.implementation)
                row["ours_tokens_per_s"] = tokens / o["seconds"]
                row["ours_mfu"] = model_flops(shape, o["n_total"], o["n_train"], 2) \
                    / o["seconds"] / PEAK
                row |= {f"ours_{k}": v for k, v in o.items()}
            except Exception as err:  # noqa: BLE001  (a failed variant is reported)
                row["ours_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            if not args.skip_reference:
                try:
                    r = reference(shape, stage, max(3, args.steps // 2))
                    row["reference_tokens_per_s"] = tokens / r["seconds"]
                    row["reference_seconds"] = r["seconds"]
                    if "ours_tokens_per_s" in row:
                        row["ratio"] = row["ours_tokens_per_s"] / row["reference_tokens_per_s"]
                except Exception as err:  # noqa: BLE001
                    row["reference_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in row.items() if k.startswith(("shape", "stage", "ours_t",
                                                                       "ours_m", "ref", "ratio",
                                                                       "ours_e"))}), flush=True)
    import torch

    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
               torch=torch.__version__, flops_note=__doc__.split("MFU counts")[1].strip(),
               rows=rows)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
