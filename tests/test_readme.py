"""The README's usage examples run as written."""

import pathlib
import re

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def _block(heading: str) -> str:
    return re.search(rf"{re.escape(heading)}\s+```python\n(.*?)```", README, re.S).group(1)


def test_readme_usage_example_runs(capsys):
    block = _block("## Usage")
    assert len(block.splitlines()) <= 25
    exec(compile(block, "README.md", "exec"), {})
    assert "bytes per document" in capsys.readouterr().out


def test_readme_model_example_runs(capsys):
    block = _block("### Models, checkpoints and generation")
    assert len(block.splitlines()) <= 25
    exec(compile(block, "README.md", "exec"), {})
    assert "state position" in capsys.readouterr().out
