"""The package rules: no import cycle between top-level packages, no import upwards."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from check_floors import FLOORS, breaches, package_imports  # noqa: E402


def test_the_floors_hold_in_this_repository():
    assert breaches(ROOT) == []
    arrows = package_imports(ROOT)
    assert not [b for a, b in arrows if a == "pallas_kernels"]  # imports nothing of ours
    assert not [b for a, b in arrows if a == "coda_jax" and b != "pallas_kernels"]


def _tree(tmp_path: Path, imports: dict[str, str]) -> Path:
    for package in FLOORS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(imports.get(package, ""))
    return tmp_path


def test_an_upward_import_and_a_cycle_are_caught(tmp_path):
    root = _tree(tmp_path, {"coda_jax": "def f():\n    from convert import x\n",
                            "convert": "import coda_jax.decoder\n"})
    problems = breaches(root)
    assert any("coda_jax imports convert" in p for p in problems)
    assert any(p.startswith("import cycle: coda_jax -> convert -> coda_jax") for p in problems)
