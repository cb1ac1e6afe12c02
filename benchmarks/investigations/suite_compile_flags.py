"""How long XLA takes to compile a tiny bounded model's programs on this CPU, under
the flags ``tests/conftest.py`` gives the suite and under XLA's defaults.

Each setting runs in a fresh process (XLA reads ``XLA_FLAGS`` once): the first call
of ``generate`` (5 tokens) and of ``prefill`` (32 tokens) of a 2-layer, D=32 bounded
model, which is compile time almost entirely. Written with the suite's times:

    python benchmarks/investigations/suite_compile_flags.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.evaluation.retention_workers import write_json  # noqa: E402

SETTINGS = {"xla_defaults": "",
            "suite": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"}

CHILD = """
import json, time, jax, jax.numpy as jnp
from flax import nnx
from coda_jax import CausalLM, DecoderConfig, generate
cfg = DecoderConfig(family="llama", vocab_size=320, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
model = CausalLM(cfg, attention="coda_bounded", attention_options=dict(
    window=8, num_landmarks_exact=4, num_landmarks_summary=4), rngs=nnx.Rngs(0))
times = {}
start = time.perf_counter()
jax.block_until_ready(generate(model, model.init_state(2, key=jax.random.key(0)),
                               jnp.zeros((2, 320)), max_new_tokens=5))
times["generate_first_call_s"] = time.perf_counter() - start
start = time.perf_counter()
jax.block_until_ready(model.prefill(jnp.ones((2, 32), jnp.int32),
                                    model.init_state(2, key=jax.random.key(0)), block_size=8))
times["prefill_first_call_s"] = time.perf_counter() - start
print(json.dumps(times))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    results = {}
    for name, flags in SETTINGS.items():
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(root))
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                              text=True, check=True)
        results[name] = {"xla_flags": flags, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(name, results[name], flush=True)
    write_json(args.out, {"what": " ".join(__doc__.split("\n\n")[1].split()),
                          "cpus": os.cpu_count(), "settings": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
