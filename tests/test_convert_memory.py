"""Converting a sharded checkpoint never holds a second copy of the model in host memory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from convert_memory import measure  # noqa: E402


def test_small_checkpoint_conversion_adds_well_under_half_a_copy():
    result = measure(2e8, shard_bytes=100 << 20)
    assert result["shards"] > 1
    assert result["peak_net_of_baseline_over_one_copy"] < 1.5


@pytest.mark.slow
def test_one_billion_parameter_checkpoint_peaks_under_one_and_a_half_copies():
    result = measure(1e9)
    assert result["parameters"] > 1e9 and result["shards"] > 1
    assert result["peak_over_one_copy"] < 1.5
