"""How long building the bundled model abstractly takes on this CPU:
``nnx.eval_shape`` against ``coda_jax.abstract_model`` (the same model, tracers'
origin messages left empty), each timed three times in this process, alternating.

    python benchmarks/abstract_model_cpu.py --out benchmarks/results/abstract_model_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from coda_db.bundled import bundled_model_path
from coda_jax import AttentionSpec, CausalLM, DecoderConfig
from coda_jax.abstract_model import abstract_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    meta = json.loads((bundled_model_path() / "export.json").read_text())

    def make() -> CausalLM:
        return CausalLM(DecoderConfig.from_dict(meta["config"]),
                        attention=AttentionSpec.from_dict(meta["attention_spec"]),
                        reference_compat=meta["reference_compat"], param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))

    seconds: dict[str, list[float]] = {"nnx.eval_shape": [], "abstract_model": []}
    for _ in range(3):
        for name, build in (("nnx.eval_shape", nnx.eval_shape), ("abstract_model", abstract_model)):
            start = time.perf_counter()
            build(make)
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(times) for name, times in seconds.items()}
    result = {"what": __doc__.splitlines()[0] + " " + __doc__.splitlines()[1].strip(),
              "device": f"CPU: {platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "jax": jax.__version__,
              "model": "the bundled default model's architecture (SmolLM2-135M, 30 layers, "
                       "bounded CoDA attention), float32",
              "seconds": seconds, "best_s": best,
              "speedup": best["nnx.eval_shape"] / best["abstract_model"]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(best), f"{result['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
