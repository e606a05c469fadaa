"""The README's attention_pool example runs as written (the generation one needs a real Wan model)."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "attention_pool(" in b]
    assert blocks, "README.md has no attention_pool example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["maps"].shape == (1, 21, 15, 26, 2)
    assert scope["q"].grad is not None and scope["q"].grad.abs().sum() > 0
