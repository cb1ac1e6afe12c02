"""benchmarks/bench_database.py and bench_decode.py --tiny run on CPU and write their JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_database.py"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_database_benchmark_runs_tiny(tmp_path):
    bench = _bench("bench_database")
    out = tmp_path / "db.json"
    assert bench.main(["--tiny", "--out", str(out), "--repeats", "1", "--batches", "1,3",
                       "--ingest-tokens", "256", "--new-tokens", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["device"]["platform"] == "cpu" and result["versions"]["jax"]
    assert [r["batch"] for r in result["results"]["query_many"]] == [1, 3]
    assert result["results"]["batched_prefill"]["rows"] == 3
    assert result["results"]["ingest"]["tokens_per_s"] > 0


def test_the_decode_benchmark_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # it imports bench_database
    bench = _bench("bench_decode")
    out = tmp_path / "decode.json"
    assert bench.main(["--tiny", "--out", str(out), "--repeats", "1", "--batches", "1,2",
                       "--doc-lengths", "64", "--steps", "2,4"]) == 0
    result = json.loads(out.read_text())
    assert result["results"]["copy_ceiling"]["bytes_per_s"] > 0
    (document,) = result["results"]["documents"]
    assert document["tokens"] == 64 and document["engine_prefill"]["tokens_per_s"] > 0
    assert [d["batch"] for d in document["decode"]] == [1, 2]
    # One more row reads one more state: the bound grows by exactly that.
    one, two = (d["bytes_per_step"] for d in document["decode"])
    assert two - one == document["state_bytes_per_row"] + result["config"]["model"][
        "hidden_size"] * 4
    assert [q["batch"] for q in result["results"]["query_many"]] == [1, 2]
