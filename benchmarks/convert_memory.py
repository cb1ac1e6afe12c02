"""Peak host memory of converting a checkpoint, against one copy of the model.

Writes a synthetic Llama checkpoint (bf16, sharded safetensors, random values)
of about ``--params`` parameters, or takes a GGUF file (``--gguf``), converts it
to bf16 JAX parameters in a fresh process (CPU), and reports that process's
peak resident memory, also net of the same process's footprint after
importing everything but before converting. One copy is the converted
model's bf16 parameters.

    python benchmarks/convert_memory.py --params 1e9 --out results.json
    python benchmarks/convert_memory.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

tests/test_convert_memory.py runs this script (smaller, with --shard-bytes) and
reads its --out file.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import resource, sys, json
import jax, jax.numpy as jnp
from convert import load_gguf_model, load_hf_model
# The CPU client (its thread pools and allocator) starts before the baseline: its
# size depends on the machine and its load, not on the conversion.
jax.block_until_ready(jnp.ones((8,), jnp.bfloat16) + 1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
load = load_gguf_model if sys.argv[1].endswith(".gguf") else load_hf_model
model = load(sys.argv[1], dtype=jnp.bfloat16, progress=False)
leaves = jax.block_until_ready(jax.tree.leaves(model))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": base, "peak_rss": peak,
                  "model_bytes": sum(x.nbytes for x in leaves)}))
"""


def llama_shapes(params: float) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A Llama config of roughly ``params`` parameters and its tensor shapes."""
    hidden = 2048 if params >= 5e8 else 1024
    inter, heads, kv, vocab = int(hidden * 2.75) // 64 * 64, 32, 4, 32000
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    config = dict(model_type="llama", hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden),
                   p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter),
                   p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return config, shapes


def write_sharded(directory: Path, config: dict, shapes: dict, shard_bytes: int
                  ) -> tuple[int, int]:
    """Write bf16 safetensors shards tensor by tensor; return (tensor bytes, shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        with open(directory / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                count = math.prod(shapes[name])
                # Random 16-bit patterns of small bf16 values (exponent kept sane).
                bits = rng.integers(0x3C00, 0x3E00, count, dtype=np.uint16)
                f.write(bits.tobytes())
                total += 2 * count
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, len(shards)


def _convert_in_child(path: Path) -> dict:
    """Peak and baseline RSS of a fresh process converting ``path``."""
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                         text=True, check=True,
                         env={"PYTHONPATH": repo, "JAX_PLATFORMS": "cpu",
                              "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_gguf(path: Path) -> dict:
    rss = _convert_in_child(path)
    one_copy = rss["model_bytes"]
    return {"gguf": path.name, "file_bytes": path.stat().st_size, "one_copy_bytes": one_copy,
            **rss, "peak_over_one_copy": rss["peak_rss"] / one_copy,
            "peak_net_of_baseline_over_one_copy":
                (rss["peak_rss"] - rss["baseline_rss"]) / one_copy}


def measure(params: float, shard_bytes: int = 500 << 20) -> dict:
    config, shapes = llama_shapes(params)
    with tempfile.TemporaryDirectory() as tmp:
        total, n_shards = write_sharded(Path(tmp) / "ckpt", config, shapes, shard_bytes)
        rss = _convert_in_child(Path(tmp) / "ckpt")
    return {"parameters": sum(math.prod(s) for s in shapes.values()),
            "layers": config["num_hidden_layers"], "one_copy_bytes": total,
            "shards": n_shards, **rss,
            "peak_over_one_copy": rss["peak_rss"] / total,
            "peak_net_of_baseline_over_one_copy": (rss["peak_rss"] - rss["baseline_rss"]) / total}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--shard-bytes", type=int, default=500 << 20,
                   help="the checkpoint's shard size limit")
    p.add_argument("--gguf", type=Path, help="measure this GGUF file's conversion instead")
    p.add_argument("--out")
    a = p.parse_args()
    result = measure_gguf(a.gguf) if a.gguf else measure(a.params, a.shard_bytes)
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
