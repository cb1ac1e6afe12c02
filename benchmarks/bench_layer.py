"""One bounded layer, ours vs the PyTorch reference, in the same process on one GPU.

bf16, batch 1, medium cache (W=256, Me=64, Ms=64), L=4096, the two layer
shapes of ``reference-figures.md``. Reports prefill tokens/s (block 256 and
1024; ours through ``layer.prefill_fn()``, and per call also through the
``layer.prefill`` method) and decode tokens/s (ours: per-token ``layer.step``
calls, the same through ``layer.step_fn()``, and a compiled loop of steps,
which is how generation runs; the reference: its ``step``),
plus the fidelity of each bf16 computation against our float32 one. Ours runs
twice: attention through the Pallas kernels (the GPU default) and through cuDNN.

    python benchmarks/bench_layer.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata as md
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [dict(embed_dim=512, num_heads=8, num_kv_heads=2),
          dict(embed_dim=4096, num_heads=32, num_kv_heads=8)]
CACHE = dict(window=256, num_landmarks_exact=64, num_landmarks_summary=64)
LENGTH = 4096
BLOCKS = (256, 1024)
DECODE_STEPS = 256


def random_layer(shape: dict, implementation: str | None = None, package=None):
    """A randomly initialised bf16 bounded layer of ``shape`` with the medium cache,
    an L=LENGTH prompt and a fresh state (the tuning scripts' common set-up);
    ``package`` is another copy of ``coda_jax`` to build it from."""
    from flax import nnx

    if package is None:
        import coda_jax as package
    layer = package.CoDAGQALandmark(**shape, **CACHE, param_dtype=jnp.bfloat16,
                                    implementation=implementation, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, LENGTH, shape["embed_dim"]), jnp.bfloat16)
    return layer, x, layer.init_state(1, jnp.bfloat16, key=jax.random.key(2))


def _warm_up(fn: Callable[[], Any], seconds: float) -> None:
    """Call ``fn`` once (compilation), then for at least ``seconds``: long enough
    for the GPU to leave its idle clocks (bursts of a few ms measured 2.5x apart
    between runs)."""
    fn()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()


def _call_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fn, *, warmup_s: float = 0.3, min_repeats: int = 7,
                    min_total_s: float = 0.5) -> float:
    """Median seconds of one call of ``fn`` (which waits for its result), after
    warming up for ``warmup_s``: at least ``min_repeats`` timed calls and ``min_total_s``."""
    _warm_up(fn, warmup_s)
    times = []
    while len(times) < min_repeats or sum(times) < min_total_s:
        times.append(_call_seconds(fn))
    return statistics.median(times)


def per_call_rounds(fns: dict[str, Callable[[], Any]], *, rounds: int = 7, calls: int = 9,
                    warmup_s: float = 0.3) -> dict[str, list[float]]:
    """Median seconds of one call of each fn (which waits for its result), per round.

    The fns take turns within every round, so clocks that drift (GPU power
    limits, CPU frequency) hit them alike; each is first warmed up for ``warmup_s``.
    """
    for fn in fns.values():
        _warm_up(fn, warmup_s)
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(statistics.median(_call_seconds(fn) for _ in range(calls)))
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fidelity(ref_module, x_np: np.ndarray, y_ref_bf16: np.ndarray) -> dict:
    """bf16 outputs (ours with Pallas, cuDNN and XLA attention, the reference's)
    against our float32 computation at full matmul precision, same weights,
    over the first window (256 tokens: attention and epilogue numerics, before
    any bank routing)."""
    from convert import from_reference

    x = x_np[:, :256]
    with jax.default_matmul_precision("highest"):
        f32 = from_reference(ref_module.float(), implementation="xla")
        y32, _ = f32.prefill(jnp.asarray(x), f32.init_state(1, mem_init="zeros"), block_size=256)
    ref_module.to(dtype=__import__("torch").bfloat16)
    out = {"reference_bf16_vs_f32": rel_err(y_ref_bf16, y32)}
    for impl in ("pallas", "cudnn", "xla"):
        layer = from_reference(ref_module, param_dtype=jnp.bfloat16, implementation=impl)
        y, _ = layer.prefill(jnp.asarray(x, jnp.bfloat16),
                             layer.init_state(1, jnp.bfloat16, mem_init="zeros"), block_size=256)
        out[f"ours_bf16_{impl}_vs_f32"] = rel_err(np.asarray(y, np.float32), y32)
    return out


BACK_TO_BACK = 8  # prefill calls queued before one wait


def ours_layer(ref_module, implementation: str | None):
    from convert import from_reference

    return from_reference(ref_module, param_dtype=jnp.bfloat16, implementation=implementation)


def ours_prefill_calls(layer, x_np: np.ndarray, *, bound: bool = True
                       ) -> dict[str, Callable[[], None]]:
    """Per block size: one prefill call waited for, and BACK_TO_BACK calls queued
    before one wait (the host runs ahead of the GPU, as over many documents).
    ``bound``: through ``layer.prefill_fn()`` (how a loop over documents calls
    it), else ``layer.prefill`` (which walks the module on every call)."""
    x = jnp.asarray(x_np, jnp.bfloat16)
    state0 = layer.init_state(1, jnp.bfloat16, key=jax.random.key(0))
    calls = {}
    for block in BLOCKS:
        if bound:
            one = functools.partial(layer.prefill_fn(block_size=block), x, state0)
        else:
            one = functools.partial(layer.prefill, x, state0, block_size=block)
        calls[f"block{block}"] = lambda one=one: jax.block_until_ready(one())
        calls[f"block{block}_back_to_back"] = lambda one=one: jax.block_until_ready(
            [one() for _ in range(BACK_TO_BACK)])
    return calls


def bench_ours(layer, x_np: np.ndarray, tokens_np: np.ndarray) -> dict:
    """Decode figures and the state size of our layer."""
    x = jnp.asarray(x_np, jnp.bfloat16)
    state0 = layer.init_state(1, jnp.bfloat16, key=jax.random.key(0))
    out = {}
    y_ours, state = layer.prefill(x, state0, block_size=1024)

    tokens = jnp.asarray(tokens_np, jnp.bfloat16)

    def per_call(step):
        st = state
        for t in range(64):
            y, st = step(tokens[:, t:t + 1], st)
        jax.block_until_ready((y, st))
    out["decode_per_call_tokens_per_s"] = 64 / _median_seconds(lambda: per_call(layer.step))
    bound = layer.step_fn()
    out["decode_step_fn_per_call_tokens_per_s"] = 64 / _median_seconds(
        lambda: per_call(bound))

    def compiled():
        jax.block_until_ready(layer.decode(tokens, state))
    out["decode_compiled_loop_tokens_per_s"] = DECODE_STEPS / _median_seconds(compiled)
    out["state_bytes"] = layer.cache_bytes(batch_size=1, dtype=jnp.bfloat16)
    return out


def reference_first_window(ref, x_np: np.ndarray) -> np.ndarray:
    """The reference's bf16 output over the first 256 tokens from a zero bank."""
    import torch

    x = torch.from_numpy(x_np[:, :256]).to("cuda", torch.bfloat16)
    with torch.no_grad():
        st = ref.init_state(batch_size=1, device=x.device, dtype=torch.bfloat16,
                            mem_init="zeros")
        y_ref, _ = ref.prefill_chunked(x, st, block_size=256)
    return y_ref.float().cpu().numpy()


def reference_prefill_calls(ref, x_np: np.ndarray) -> dict[str, Callable[[], None]]:
    """The reference's counterparts of :func:`ours_prefill_calls`."""
    import torch

    x = torch.from_numpy(x_np).to("cuda", torch.bfloat16)
    calls = {}
    for block in BLOCKS:
        def one(block=block):
            with torch.no_grad():
                st = ref.init_state(batch_size=1, device=x.device, dtype=torch.bfloat16)
                return ref.prefill_chunked(x, st, block_size=block)

        def waited(one=one, n=1):
            outs = [one() for _ in range(n)]
            torch.cuda.synchronize()
            return outs

        calls[f"block{block}"] = waited
        calls[f"block{block}_back_to_back"] = lambda waited=waited: waited(n=BACK_TO_BACK)
    return calls


def bench_reference(ref, x_np: np.ndarray, tokens_np: np.ndarray) -> dict:
    """Decode figures and the state size of the reference."""
    import torch

    dev = torch.device("cuda")
    x = torch.from_numpy(x_np).to(dev, torch.bfloat16)
    tokens = torch.from_numpy(tokens_np).to(dev, torch.bfloat16)
    torch.manual_seed(0)

    def sync(fn):
        def wrapped():
            with torch.no_grad():
                fn()
            torch.cuda.synchronize()
        return wrapped

    out = {}
    with torch.no_grad():
        st = ref.init_state(batch_size=1, device=dev, dtype=torch.bfloat16)
        _, st = ref.prefill_chunked(x, st, block_size=1024)

    def decode():
        import copy
        s = copy.deepcopy(st)
        for t in range(64):
            ref.step(tokens[:, t:t + 1], s)
    out["decode_tokens_per_s"] = 64 / _median_seconds(sync(decode))
    out["state_bytes"] = ref.cache_bytes(batch_size=1, dtype=torch.bfloat16)
    return out


def versions() -> dict:
    names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "triton",
             "coda-gqa-l", "transformers"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    import torch
    import coda_gqa_l
    from coda_gqa_l import memory_banks

    # The reference's fused summary-bank kernel crashes when num_kv_heads > 1.
    memory_banks._HAS_TRITON_SUMMARY = False
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fidelity-only", action="store_true",
                        help="only the fidelity figures (no timings)")
    parser.add_argument("--embed-dims", type=int, nargs="*",
                        default=[shape["embed_dim"] for shape in SHAPES],
                        help="the layer shapes to run, by embed_dim")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cudnn_variant", "fidelity"],
                        help="leave out the cuDNN-attention variant or the fidelity figures")
    args = parser.parse_args()
    results = {
        "what": "one bounded CoDA-GQA-L layer, bf16, batch 1, L=4096, "
                "W=256 Me=64 Ms=64; medians of repeated timings after warm-up",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "torch_device": torch.cuda.get_device_name(0),
        "versions": versions(),
        "shapes": [],
    }
    rng = np.random.default_rng(0)
    for shape in (s for s in SHAPES if s["embed_dim"] in args.embed_dims):
        torch.manual_seed(0)
        ref = coda_gqa_l.CoDAGQALandmarkPerf2(**shape, **CACHE).cuda().to(torch.bfloat16).eval()
        with torch.no_grad():  # realistic gates: not all tied at init
            ref.write_proj.weight.normal_(0, 0.05)
        x = rng.standard_normal((1, LENGTH, shape["embed_dim"]), np.float32)
        tokens = rng.standard_normal((1, DECODE_STEPS, shape["embed_dim"]), np.float32)
        y_ref = reference_first_window(ref, x)
        if args.fidelity_only:
            entry = {"shape": shape, "fidelity_rel_l2_error": fidelity(ref, x, y_ref)}
            results["shapes"].append(entry)
            print(json.dumps(entry, indent=1), flush=True)
            continue
        ref_out = bench_reference(ref, x, tokens)
        ours = ours_layer(ref, None)
        ours_out = bench_ours(ours, x, tokens)
        cudnn = None if "cudnn_variant" in args.skip else ours_layer(ref, "cudnn")
        cudnn_out = None if cudnn is None else bench_ours(cudnn, x, tokens)
        # Prefill: ours and the reference take turns in every round (same clocks).
        # "ours" calls prefill_fn(); "ours_prefill_method" (per call only) the
        # method, which walks the module on every call.
        method_out = {}
        method_calls = {mode: fn for mode, fn in ours_prefill_calls(ours, x, bound=False).items()
                        if not mode.endswith("back_to_back")}
        sides = {"ours": (ours_prefill_calls(ours, x), ours_out),
                 "reference": (reference_prefill_calls(ref, x), ref_out),
                 "ours_prefill_method": (method_calls, method_out)}
        if cudnn is not None:
            sides["ours_cudnn"] = (ours_prefill_calls(cudnn, x), cudnn_out)
        ratios = {}
        for mode in [f"block{b}{tail}" for b in BLOCKS for tail in ("", "_back_to_back")]:
            per_call = BACK_TO_BACK if mode.endswith("back_to_back") else 1
            rounds = per_call_rounds({name: calls[mode] for name, (calls, _) in sides.items()
                                      if mode in calls})
            key = f"prefill_{mode}_tokens_per_s"
            for name, (_, out) in sides.items():
                if name in rounds:
                    out[key] = LENGTH * per_call / statistics.median(rounds[name])
            for side, suffix in (("ours", ""), ("ours_prefill_method", "_method")):
                if side in rounds:
                    ratios[f"prefill_{mode}{suffix}"] = sides[side][1][key] / ref_out[key]
                    ratios[f"prefill_{mode}{suffix}_per_round"] = [
                        round(r / o, 3) for o, r in zip(rounds[side], rounds["reference"])]
        ratios["decode_per_call"] = (ours_out["decode_per_call_tokens_per_s"]
                                     / ref_out["decode_tokens_per_s"])
        ratios["decode_step_fn_per_call"] = (ours_out["decode_step_fn_per_call_tokens_per_s"]
                                             / ref_out["decode_tokens_per_s"])
        ratios["decode_compiled_loop"] = (ours_out["decode_compiled_loop_tokens_per_s"]
                                          / ref_out["decode_tokens_per_s"])
        entry = {"shape": shape, "ours": ours_out, "reference": ref_out, "ratios": ratios,
                 "ours_prefill_method": method_out}
        if cudnn_out is not None:
            entry["ours_cudnn_attention"] = cudnn_out
        if "fidelity" not in args.skip:
            entry["fidelity_rel_l2_error"] = fidelity(ref, x, y_ref)
        results["shapes"].append(entry)
        print(json.dumps(entry, indent=1), flush=True)
        with open(args.out, "w") as f:  # after every shape: a time limit loses nothing
            json.dump(results, f, indent=1)
        del ref
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
