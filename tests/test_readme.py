"""The documentation's Python examples run as written: the README's, and those of the
docs pages the reference material moved to (each the first ```python block of the
section under its heading)."""

from markdown_pages import ROOT, python_block


def _run(page: str, heading: str) -> None:
    block = python_block((ROOT / page).read_text(), heading)
    assert len(block.splitlines()) <= 25, f"the example of {page} {heading!r} grew too long"
    exec(compile(block, page, "exec"), {})


def test_readme_database_example_runs(capsys):
    _run("README.md", "## In Python")
    out = capsys.readouterr().out
    # The bundled chat model answers in its own words: the facts are in its replies.
    code, born = (line for line in out.splitlines() if " -> " in line)
    assert code.startswith("What is the access code of Alec Simon? -> ") and "ZD-3492" in code
    assert born.startswith("When was Derrick Jordan born? -> ") and "1952" in born


def test_layer_usage_example_runs(capsys):
    _run("docs/layers.md", "## Usage")
    assert "bytes per document" in capsys.readouterr().out


def test_model_example_runs(capsys):
    _run("docs/models-and-conversion.md", "## Models, checkpoints and generation")
    assert "state position" in capsys.readouterr().out
