"""pytest setup shared by all tests: CPU only, float32 matmuls at full precision."""

import os
import sys
from pathlib import Path

# The tests' shared helpers (oracle, pairwise, attention_inputs) live in tests/.
sys.path.insert(0, str(Path(__file__).parent / "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where JAX sees a GPU (JAX_PLATFORMS=cuda)."""
    import pytest

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
