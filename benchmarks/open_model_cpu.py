"""How long ``coda-db`` takes to open the bundled default model on this CPU: with
empty caches (the tokenizer converted, the model assembled from the GGUF file and
cached) and then from the caches. Each open runs in a fresh Python process
(imports excluded) against a temporary ``$XDG_CACHE_HOME``, so the user's caches
are neither read nor touched.

    python benchmarks/open_model_cpu.py --out benchmarks/results/smollm2/open_model_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

OPEN = ("import time; from coda_db.model_source import open_model; t = time.perf_counter(); "
        "open_model(None); print(time.perf_counter() - t)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="coda-open-") as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        seconds = []
        for _ in ("empty caches", "from the caches"):
            done = subprocess.run([sys.executable, "-c", OPEN], env=env, capture_output=True,
                                  text=True, check=True)
            seconds.append(float(done.stdout.strip().splitlines()[-1]))
    import jax

    result = {"what": __doc__.splitlines()[0], "device": f"CPU: {platform.machine()}, "
              f"{os.cpu_count()} cores", "jax": jax.__version__,
              "open_s": {"empty caches": seconds[0], "from the caches": seconds[1]}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["open_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
