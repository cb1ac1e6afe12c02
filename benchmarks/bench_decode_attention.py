"""Bounded decode attention on one GPU: the Pallas kernel against XLA.

One query token per sequence over a bank of Lbuf slots (384 = W 256 + Me 64 +
Ms 64, and 768), H=32, Hkv=8, Dh=128, bf16, a key mask with holes, batch 1 to
256. Each timing is the median over repeats of a compiled, unrolled chain of
``INNER`` dependent calls divided by ``INNER`` (so neither host dispatch nor a
device loop's per-iteration predicate read-back is what is measured).
Achieved bandwidth counts the K and V bytes each call must read, against two
ceilings measured in the same run: a device-to-device copy (bytes read and
written per second) and a read-only sum over the same 2 GiB, through PyTorch
(its copy is cudaMemcpy) where it sees the GPU, and through XLA.

    python benchmarks/bench_decode_attention.py --out results.json
    python benchmarks/bench_decode_attention.py --out ab.json --baseline baselines.OLD

``--baseline PACKAGE`` also times that package's ``decode_attention`` (an older
copy of ``pallas_kernels``) in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import statistics
import time

import jax
import jax.numpy as jnp

from coda_jax.attention_math import differential_attention
from pallas_kernels.decode_attention import decode_attention

H, HKV, DH = 32, 8, 128
BATCHES = (1, 4, 16, 64, 256)
SLOTS = (384, 768)
INNER = 20
CEILING_BYTES = 2 << 30


def xla(q, qn, k, v, lam, mask, w):
    return differential_attention(q, k, v, q_noise=qn, lam=lam, key_mask=mask, norm_weight=w)


def pallas(q, qn, k, v, lam, mask, w):
    return decode_attention(q, qn, k, v, lam, mask, norm_weight=w, interpret=False)


def decode_inputs(batch: int, slots: int, *, seed: int) -> tuple[jax.Array, ...]:
    """(q, q_noise, k, v, lambda, key mask with holes, norm weight) of one decode
    token per sequence over ``slots`` bank slots, bf16."""
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, 1, H, DH), jnp.bfloat16)
    qn = jax.random.normal(keys[1], (batch, 1, H, DH), jnp.bfloat16)
    k = jax.random.normal(keys[2], (batch, slots, HKV, DH), jnp.bfloat16)
    v = jax.random.normal(keys[3], (batch, slots, HKV, DH), jnp.bfloat16)
    lam = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, 1, H))).astype(jnp.bfloat16)
    mask = jax.random.uniform(keys[5], (batch, slots)) > 0.2
    return q, qn, k, v, lam, mask, jnp.ones((DH,), jnp.bfloat16)


def kv_bytes_read(inputs: tuple[jax.Array, ...]) -> int:
    """The K and V bytes one call must read."""
    k = inputs[2]
    return 2 * k.size * k.dtype.itemsize


def per_call_seconds(fn, *args, repeats: int = 7) -> float:
    q = args[0]

    @jax.jit
    def loop(*a):
        def body(_, carry):  # each call depends on the last: nothing is hoisted
            out = fn(q + carry, *a[1:])
            return (out[0, 0, 0, 0] * 0).astype(q.dtype)
        return jax.lax.fori_loop(0, INNER, body, jnp.zeros((), q.dtype), unroll=True)

    jax.block_until_ready(loop(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / INNER


def ceilings_gbs(copy, read, seconds) -> dict[str, float]:
    """GB/s of ``copy`` (2 GiB read and written) and ``read`` (2 GiB read), each
    timed by ``seconds(fn)``, best of 10 after a warm-up."""
    def best(fn):
        fn()
        return min(seconds(fn) for _ in range(10))
    return {"copy": 2 * CEILING_BYTES / best(copy) / 1e9,
            "read": CEILING_BYTES / best(read) / 1e9}


def torch_ceilings_gbs() -> dict[str, float]:
    """The ceilings through PyTorch: cudaMemcpy and a sum, timed with CUDA events;
    empty without a CUDA PyTorch."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    x = torch.ones(CEILING_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)

    def seconds(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return ceilings_gbs(lambda: y.copy_(x), lambda: x.sum(dtype=torch.float32), seconds)


def xla_ceilings_gbs() -> dict[str, float]:
    """The ceilings through XLA: an elementwise add and a sum, wall clock."""
    x = jnp.ones((CEILING_BYTES // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))

    def seconds(fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start
    return ceilings_gbs(lambda: copy(x), lambda: read(x), seconds)


def memory_ceilings_gbs() -> dict[str, float]:
    """The copy and read ceilings of this GPU: PyTorch's where it runs, else XLA's;
    both sets recorded."""
    xla_ceilings = xla_ceilings_gbs()
    ceilings = torch_ceilings_gbs() or dict(xla_ceilings)
    ceilings.update({f"xla_{name}": gbs for name, gbs in xla_ceilings.items()})
    return ceilings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--baseline", help="package holding an older decode_attention module")
    args = parser.parse_args()
    variants = {"pallas": pallas, "xla": xla}
    if args.baseline:
        old = importlib.import_module(f"{args.baseline}.decode_attention").decode_attention

        def baseline(q, qn, k, v, lam, mask, w):
            return old(q, qn, k, v, lam, mask, norm_weight=w, interpret=False)
        variants["baseline"] = baseline
    results = {"what": __doc__.split("\n\n")[0], "device": jax.devices()[0].device_kind,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "jax": jax.__version__, "shape": dict(H=H, Hkv=HKV, Dh=DH, tokens=1),
               "runs": []}
    ceilings = memory_ceilings_gbs()
    results["ceilings_GBs"] = ceilings
    print(json.dumps(ceilings), flush=True)
    for slots in SLOTS:
        for batch in BATCHES:
            inputs = decode_inputs(batch, slots, seed=batch * slots)
            kv_bytes = kv_bytes_read(inputs)
            entry = {"slots": slots, "batch": batch, "kv_bytes": kv_bytes}
            for name, fn in variants.items():
                sec = per_call_seconds(fn, *inputs)
                entry[name] = {"us": sec * 1e6, "GBs": kv_bytes / sec / 1e9}
            entry["pallas_vs_xla"] = entry["xla"]["us"] / entry["pallas"]["us"]
            if args.baseline:
                entry["pallas_vs_baseline"] = entry["baseline"]["us"] / entry["pallas"]["us"]
            for name in ("copy", "read"):
                entry[f"pallas_fraction_of_{name}_ceiling"] = (entry["pallas"]["GBs"]
                                                               / ceilings[name])
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
