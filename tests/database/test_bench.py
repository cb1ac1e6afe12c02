"""benchmarks/bench_database.py --tiny runs on CPU and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_database.py"


def test_the_database_benchmark_runs_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_database", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "db.json"
    assert bench.main(["--tiny", "--out", str(out), "--repeats", "1", "--batches", "1,3",
                       "--ingest-tokens", "256", "--new-tokens", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["device"]["platform"] == "cpu" and result["versions"]["jax"]
    assert [r["batch"] for r in result["results"]["query_many"]] == [1, 3]
    assert result["results"]["batched_prefill"]["rows"] == 3
    assert result["results"]["ingest"]["tokens_per_s"] > 0
