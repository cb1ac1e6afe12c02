"""Differential attention on one GPU: our fused Pallas kernel vs cuDNN and the reference.

B=1, H=32, Hkv=8, Dh=128, causal, bf16, L in (2048, 8192, 32768). For each:
ms and TFLOP/s (both streams counted: forward 2 x 4*B*H*L^2*Dh / 2,
forward+backward 3.5x that) of
  ours          pallas_kernels.diff_flash_attention as it runs by default: the Hopper
                (Mosaic GPU) forward and backward kernels
  ours_portable_bwd  the Hopper forward with the portable (Triton-lowered) backward
  ours_portable the portable forward and backward
  cudnn_two     two jax.nn.dot_product_attention(implementation="cudnn") + epilogue
  cudnn_stacked q and q_noise as 2H query heads in one cuDNN call + epilogue
  ref_triton    the reference's fused Triton kernel (forward only)
  ref_sdpa      the reference's fallback: two torch SDPA calls + epilogue (forward only)
and the relative error of ours against cudnn_two. The variants take turns in
every timing round (``time_interleaved``); ours and ours_portable_bwd run the
same forward kernel, so their forward figures show the run's noise.

    python benchmarks/bench_diff_attention.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench_layer import rel_err
from pallas_kernels.diff_flash import diff_flash_attention

B, H, HKV, DH = 1, 32, 8, 128
LENGTHS = (2048, 8192, 32768)


def epilogue(sig, noise, lam, w, eps=1e-6):
    o = sig.astype(jnp.float32) - lam[..., None].astype(jnp.float32) * noise.astype(jnp.float32)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + eps) * w.astype(jnp.float32)
    return o.astype(sig.dtype)


def cudnn_two(q, qn, k, v, lam, w):
    attn = lambda x: jax.nn.dot_product_attention(x, k, v, is_causal=True,  # noqa: E731
                                                  implementation="cudnn")
    return epilogue(attn(q), attn(qn), lam, w)


def cudnn_stacked(q, qn, k, v, lam, w):
    b, length, h, dh = q.shape
    g = h // k.shape[2]
    both = jnp.concatenate([q.reshape(b, length, -1, g, dh), qn.reshape(b, length, -1, g, dh)],
                           axis=3)
    out = jax.nn.dot_product_attention(both.reshape(b, length, 2 * h, dh), k, v, is_causal=True,
                                       implementation="cudnn").reshape(b, length, -1, 2 * g, dh)
    return epilogue(out[:, :, :, :g].reshape(q.shape), out[:, :, :, g:].reshape(q.shape), lam, w)


def ours(q, qn, k, v, lam, w):
    return diff_flash_attention(q, qn, k, v, lam, norm_weight=w, interpret=False)


def ours_portable_bwd(q, qn, k, v, lam, w):
    return diff_flash_attention(q, qn, k, v, lam, norm_weight=w, interpret=False,
                                backward="portable")


def ours_portable(q, qn, k, v, lam, w):
    return diff_flash_attention(q, qn, k, v, lam, norm_weight=w, interpret=False,
                                kernel="portable")


def time_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 7,
                     target_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each fn (no arguments), ``rounds`` times, the fns taking turns
    within every round (so drifting clocks hit them alike). Each timing runs
    enough back-to-back calls to last about ``target_s``, then waits once: it
    measures the GPU's pace, not one call's dispatch."""
    calls = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())
        start = time.perf_counter()
        jax.block_until_ready(fn())
        calls[name] = max(1, round(target_s / (time.perf_counter() - start)))
    seconds = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                out = fn()
            jax.block_until_ready(out)
            seconds[name].append((time.perf_counter() - start) / calls[name])
    return seconds


def time_torch(fn, repeats: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def reference_timings(arrays) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from coda_gqa_l.triton_diff_flash import diff_flash_attn

    q, qn, k, v, lam, w = (torch.from_numpy(np.asarray(a, np.float32)).cuda().to(torch.bfloat16)
                           for a in arrays)
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731  (B, H, L, Dh)
    q, qn, k, v = t(q), t(qn), t(k), t(v)
    lam = lam.transpose(1, 2).unsqueeze(-1).contiguous()
    g = H // HKV
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)

    def sdpa():
        with torch.no_grad():
            sig = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
            noise = F.scaled_dot_product_attention(qn, kr, vr, is_causal=True)
            o = (sig - lam * noise).float()
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
            return o.to(torch.bfloat16)

    def triton():
        with torch.no_grad():
            return diff_flash_attn(q, qn, k, v, lam, rms_weight=w, is_causal=True)

    return {"ref_triton": time_torch(triton, repeats=5), "ref_sdpa": time_torch(sdpa)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--skip", nargs="*", default=[],
                        help="variants to leave out (e.g. one not yet checked on this GPU)")
    args = parser.parse_args()
    results = {"what": __doc__.split("\n\n")[0], "device": jax.devices()[0].device_kind,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "jax": jax.__version__, "shape": dict(B=B, H=H, Hkv=HKV, Dh=DH), "lengths": []}
    for length in args.lengths:
        keys = jax.random.split(jax.random.key(length), 7)
        q = jax.random.normal(keys[0], (B, length, H, DH), jnp.bfloat16)
        qn = jax.random.normal(keys[1], (B, length, H, DH), jnp.bfloat16)
        k = jax.random.normal(keys[2], (B, length, HKV, DH), jnp.bfloat16)
        v = jax.random.normal(keys[3], (B, length, HKV, DH), jnp.bfloat16)
        lam = jax.nn.sigmoid(jax.random.normal(keys[4], (B, length, H))).astype(jnp.bfloat16)
        w = (1 + 0.1 * jax.random.normal(keys[5], (DH,))).astype(jnp.bfloat16)
        cot = jax.random.normal(keys[6], q.shape, jnp.bfloat16)
        flops = 2 * 4 * B * H * length ** 2 * DH / 2
        entry = {"L": length, "forward": {}, "forward_backward": {}}
        results["lengths"].append(entry)

        def save():  # after every figure: a later hang (a new kernel) loses nothing
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

        for name, sec in reference_timings((q, qn, k, v, lam, w)).items():
            entry["forward"][name] = {"ms": sec * 1e3, "tflops": flops / sec / 1e12}
        fns = {"cudnn_two": cudnn_two, "cudnn_stacked": cudnn_stacked, "ours": ours,
               "ours_portable_bwd": ours_portable_bwd, "ours_portable": ours_portable}
        fns = {name: fn for name, fn in fns.items() if name not in args.skip}
        args_ = (q, qn, k, v, lam, w)
        outputs, forward, forward_backward = {}, {}, {}
        for name, fn in fns.items():
            try:  # one failing variant must not lose the others' figures
                forward[name] = jax.jit(fn)
                outputs[name] = np.asarray(forward[name](*args_), np.float32)
                forward_backward[name] = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(
                    fn(*a).astype(jnp.float32) * cot.astype(jnp.float32)), argnums=range(6)))
                jax.block_until_ready(forward_backward[name](*args_))
            except Exception as err:  # noqa: BLE001  (recorded in the results file)
                forward.pop(name, None)
                forward_backward.pop(name, None)
                entry.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:2000]
                print(name, "failed:", entry["errors"][name], flush=True)
        for kind, compiled, scale in (("forward", forward, 1.0),
                                      ("forward_backward", forward_backward, 3.5)):
            for name, secs in time_interleaved(
                    {n: functools.partial(f, *args_) for n, f in compiled.items()}).items():
                sec = statistics.median(secs)
                entry[kind][name] = {"ms": sec * 1e3, "tflops": scale * flops / sec / 1e12,
                                     "rounds_ms": [s * 1e3 for s in secs]}
            save()
        best = min(entry["forward"]["cudnn_two"]["ms"], entry["forward"]["cudnn_stacked"]["ms"])
        best_fb = min(entry["forward_backward"]["cudnn_two"]["ms"],
                      entry["forward_backward"]["cudnn_stacked"]["ms"])
        entry["ratios"] = {}
        for name in ("ours", "ours_portable_bwd", "ours_portable"):
            if name in entry["forward_backward"]:
                fwd_ms = entry["forward"][name]["ms"]
                entry["ratios"][name] = {
                    "forward_vs_best_cudnn": best / fwd_ms,
                    "forward_vs_ref_triton": entry["forward"]["ref_triton"]["ms"] / fwd_ms,
                    "fwd_bwd_vs_best_cudnn": best_fb / entry["forward_backward"][name]["ms"],
                    # Per round, against that round's faster cuDNN: the spread of the ratio.
                    "forward_vs_best_cudnn_per_round": [
                        min(a, b) / o for a, b, o in zip(
                            entry["forward"]["cudnn_two"]["rounds_ms"],
                            entry["forward"]["cudnn_stacked"]["rounds_ms"],
                            entry["forward"][name]["rounds_ms"])]}
        ref = outputs["cudnn_two"]
        for name in ("ours", "ours_portable"):
            if name in outputs:
                entry[f"{name}_rel_err_vs_cudnn_two"] = rel_err(outputs[name], ref)
        save()
        print(json.dumps(entry, indent=1), flush=True)

if __name__ == "__main__":
    main()
