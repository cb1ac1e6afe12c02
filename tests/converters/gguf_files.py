"""Tiny GGUF model files for the converter tests, written with ``gguf.GGUFWriter``.

Quantised tensors are random blocks of the type's own layout, with their
float16 scale fields set to small finite values (random bytes there could be
NaN or Inf): every type the ``gguf`` package dequantises can be written this
way, K-quants included, whether or not the package can quantise to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# Byte offsets of each block's float16 scale fields (llama.cpp's block structs).
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}
QUANTISED_TYPES = tuple(F16_FIELDS)
PLAIN_TYPES = ("F32", "F16", "BF16")
ALL_TYPES = PLAIN_TYPES + QUANTISED_TYPES
BLOCK = 256  # rows of every matrix are a multiple of the largest block (K-quants)

TINY = dict(hidden=256, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=320)
# transformers reads no head size from a Qwen3 file and assumes Qwen3's 128 (every
# released Qwen3 has it): the oracle's Qwen3 files need head_dim=128.
QWEN3_HEAD_DIM = 128


def tensor_bytes(values: np.ndarray, type_name: str, rng: np.random.Generator,
                 scale: float = 0.05) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for ``GGUFWriter.add_tensor``: ``values`` (float32) as they
    are for plain types; for quantised ones, random blocks of that type whose
    dequantised values have a spread of about ``scale``."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32), None
    if type_name == "F16":
        return values.astype(np.float16), None
    if type_name == "BF16":
        return quants.quantize(values.astype(np.float32), qtype), qtype
    block_elems, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    blocks = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    fields = [np.s_[..., o:o + 2] for o in F16_FIELDS[type_name]]
    for field in fields:
        blocks[field] = np.float16(1.0).reshape(1).view(np.uint8)
    spread = float(np.std(quants.dequantize(blocks.reshape(rows, -1), qtype)))
    for field in fields:
        factors = rng.uniform(0.5, 1.5, blocks.shape[:2]).astype(np.float16) * np.float16(
            scale / max(spread, 1e-6))
        blocks[field] = factors[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1), qtype


def default_vocabulary(size: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of ``size`` tokens and its merges: three control
    tokens, letters, digits and the space (``Ġ``), then two-letter merges."""
    singles = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + ["Ġ"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + singles
    merges = []
    pairs = ((a, b) for a in "Ġetaoinsrhldcumfp" for b in "etaoinsrhldcumfpgwybvk")
    while len(tokens) < size:
        a, b = next(pairs)
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    return tokens, merges


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's reordering of Q/K rows (what the reader undoes)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_model(path: Path, *, arch: str = "llama", types: Sequence[str] = ("F32",),
                tied: bool = False, seed: int = 0, tokens: Sequence[str] | None = None,
                metadata: dict | None = None, skip: Sequence[str] = (),
                extra_tensors: dict | None = None, **dims: int) -> Path:
    """A tiny decoder of ``arch`` (llama, qwen2, qwen3) as a GGUF file.

    The matrices take ``types`` in turn, so a file holds several types; norms
    are F32. ``metadata`` overrides or adds metadata keys (a value of None
    removes one); ``skip`` leaves tensors out; ``extra_tensors`` adds named
    (data, raw_dtype) pairs.
    """
    import gguf

    d = TINY | dims
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv = d["hidden"], d["intermediate"], d["heads"], d["kv_heads"]
    head_dim = d.get("head_dim", hidden // heads)
    vocab = d["vocab"]
    tokens, merges = (list(tokens), []) if tokens is not None else default_vocabulary(vocab)
    meta = {
        f"{arch}.block_count": ("uint32", d["layers"]),
        f"{arch}.context_length": ("uint32", 2048),
        f"{arch}.embedding_length": ("uint32", hidden),
        f"{arch}.feed_forward_length": ("uint32", inter),
        f"{arch}.attention.head_count": ("uint32", heads),
        f"{arch}.attention.head_count_kv": ("uint32", kv),
        f"{arch}.rope.freq_base": ("float32", 50_000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
        f"{arch}.rope.dimension_count": ("uint32", head_dim),
        f"{arch}.vocab_size": ("uint32", vocab),
        # llama.cpp's converter writes the head size for Qwen3 (its head_dim is free).
        **({f"{arch}.attention.key_length": ("uint32", head_dim),
            f"{arch}.attention.value_length": ("uint32", head_dim)} if arch == "qwen3" else {}),
        "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.pre": ("string", "gpt2"),
        "tokenizer.ggml.tokens": ("strings", tokens),
        "tokenizer.ggml.token_type": ("ints", [3, 3, 3] + [1] * (len(tokens) - 3)),
        "tokenizer.ggml.merges": ("strings", merges),
        "tokenizer.ggml.bos_token_id": ("uint32", 1),
        "tokenizer.ggml.eos_token_id": ("uint32", 2),
    }
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in meta.items():
        if key == "general.architecture":
            continue
        if kind == "uint32":
            writer.add_uint32(key, value)
        elif kind == "float32":
            writer.add_float32(key, value)
        elif kind == "string":
            writer.add_string(key, value)
        elif kind == "strings":
            writer.add_array(key, list(value))
        elif kind == "ints":
            writer.add_array(key, [int(v) for v in value])
        else:
            raise ValueError(kind)

    order = list(types)
    counter = [0]

    def next_type() -> str:  # the matrices take the types in turn
        name = order[counter[0] % len(order)]
        counter[0] += 1
        return name

    def add(name: str, values: np.ndarray, type_name: str = "F32") -> None:
        if name in skip:
            return
        data, raw = tensor_bytes(values, type_name, rng)
        writer.add_tensor(name, data, raw_dtype=raw)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 0.05, (rows, cols)).astype(np.float32)

    permuted = arch == "llama"
    add("token_embd.weight", matrix(vocab, hidden), next_type())
    for i in range(d["layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + 0.3 * rng.normal(size=hidden).astype(np.float32))
        add(p + "ffn_norm.weight", 1 + 0.3 * rng.normal(size=hidden).astype(np.float32))
        q, k = matrix(heads * head_dim, hidden), matrix(kv * head_dim, hidden)
        add(p + "attn_q.weight", permute_rows(q, heads) if permuted else q, next_type())
        add(p + "attn_k.weight", permute_rows(k, kv) if permuted else k, next_type())
        add(p + "attn_v.weight", matrix(kv * head_dim, hidden), next_type())
        add(p + "attn_output.weight", matrix(hidden, heads * head_dim), next_type())
        if arch == "qwen2":
            for name, rows in (("attn_q", heads * head_dim), ("attn_k", kv * head_dim),
                               ("attn_v", kv * head_dim)):
                add(p + f"{name}.bias", 0.3 * rng.normal(size=rows).astype(np.float32))
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", 1 + 0.3 * rng.normal(size=head_dim).astype(np.float32))
            add(p + "attn_k_norm.weight", 1 + 0.3 * rng.normal(size=head_dim).astype(np.float32))
        add(p + "ffn_gate.weight", matrix(inter, hidden), next_type())
        add(p + "ffn_up.weight", matrix(inter, hidden), next_type())
        add(p + "ffn_down.weight", matrix(hidden, inter), next_type())
    add("output_norm.weight", 1 + 0.3 * rng.normal(size=hidden).astype(np.float32))
    if not tied:
        add("output.weight", matrix(vocab, hidden), next_type())
    for name, (data, raw) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
