"""What coda-db's compilation cache (``coda_db.cache``) saves a command on this CPU.

Each ``coda-db`` command below runs in a fresh process (wall time, imports and the
model's open included) against a temporary ``$XDG_CACHE_HOME`` and library, the
assembled model cached first, so the user's caches are neither read nor touched:

- ``ingest`` of the first bundled demo document and ``query`` of its first question
  with ``CODA_DB_COMPILATION_CACHE=off`` (every program compiled: as before);
- the same with the cache on, twice: the first fills it, the second loads from it.

    python benchmarks/compile_cache_cpu.py --out benchmarks/results/smollm2/compile_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coda_db.bundled import read_demo_documents, demo_documents_for, bundled_model_path


def _timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    document = read_demo_documents(demo_documents_for(bundled_model_path()))["documents"][0]
    cli = [sys.executable, "-m", "coda_db.cli"]
    seconds: dict[str, dict[str, float]] = {"ingest": {}, "query": {}}
    with tempfile.TemporaryDirectory(prefix="coda-compile-cache-") as tmp:
        root = Path(tmp)
        text = root / "document.txt"
        text.write_text(document["text"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
        env |= {"XDG_CACHE_HOME": str(root / "cache"), "CODA_DB_LIBRARY": str(root / "lib")}
        subprocess.run([sys.executable, "-c", "from coda_db.model_source import open_model; "
                        "open_model(None)"], env=env, capture_output=True, check=True)
        question = document["questions"][0]["question"]
        for run, switch in (("cache off", "off"), ("cache on, first", "on"),
                            ("cache on, second", "on")):
            run_env = env | {"CODA_DB_COMPILATION_CACHE": switch}
            label = f"doc-{len(seconds['ingest'])}"
            seconds["ingest"][run] = _timed(cli + ["ingest", "--label", label, str(text)],
                                            run_env)
            seconds["query"][run] = _timed(cli + ["query", label, question], run_env)
            print(run, {k: round(v[run], 1) for k, v in seconds.items()}, flush=True)
        cache_bytes = sum(f.stat().st_size for f in (root / "cache" / "coda-db" / "jax").rglob("*")
                          if f.is_file())
    import jax

    result = {"what": __doc__.splitlines()[0], "device": f"CPU: {platform.machine()}, "
              f"{os.cpu_count()} cores", "python": platform.python_version(),
              "jax": jax.__version__, "document": document["name"],
              "document_tokens": document["tokens"], "question": question,
              "wall_s": seconds, "compilation_cache_bytes": cache_bytes,
              "saved_share": {cmd: 1 - runs["cache on, second"] / runs["cache off"]
                              for cmd, runs in seconds.items()}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["saved_share"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
