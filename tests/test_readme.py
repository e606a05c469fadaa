"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["maps"].shape == (1, 21, 15, 26, 2)
    assert scope["q"].grad is not None and scope["q"].grad.abs().sum() > 0
