"""The README's usage example runs as written."""

import pathlib
import re


def test_readme_usage_example_runs(capsys):
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Usage\s+```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.splitlines()) <= 25
    exec(compile(block, "README.md", "exec"), {})
    assert "bytes per document" in capsys.readouterr().out
